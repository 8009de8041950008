"""Registers the Triton kernels as the CUDA kernels of the ``torch.ops.torchaq.*`` ops.

Imported by :func:`torchaq.backends.load_triton_kernels` only when triton imports and CUDA is
available; CPU tensors keep the C++ / reference kernels. ``pack_codes`` / ``unpack_codes`` stay on
the pure-torch reference (pure data movement, run once at prepack time), and so does ``row_topk``
(a stable sort of a ``(B, N)`` matrix already on the GPU: one library call).

The ops keep their fake kernels from :mod:`torchaq.ops`, so ``torch.compile`` traces them as
single opaque nodes that launch these kernels at run time (no graph break).
:func:`register_kernels` is also what the CPU test suite uses to run ``torch.library.opcheck`` on
these kernels under ``TRITON_INTERPRET=1`` (with a scoped library on the CPU key).
"""
from __future__ import annotations

import torch

import torchaq.ops  # noqa: F401  (defines the op schemas this module implements)

from .linear_ce import triton_linear_ce
from .lut import triton_compute_lut
from .scan import triton_lut_topk
from .score import triton_lut_score

__all__ = ["register_kernels"]

# the plain entry points take keyword-only tuning arguments: the ops get the positional part
KERNELS = {
    "compute_lut": lambda queries, codebooks: triton_compute_lut(queries, codebooks),
    "lut_score": lambda lut, packed, num_classes, bias=None: triton_lut_score(lut, packed, num_classes, bias),
    "lut_topk": lambda lut, packed, num_classes, k, bias=None: triton_lut_topk(lut, packed, num_classes, k, bias),
    # on a GPU the float LUT costs what the uint8 one does: exact sums, which the op's contract
    # reports as step 0 (the sampler then adds no rounding allowance)
    "lut_score_quantized": lambda lut, packed, num_classes, bias=None, columns=0: (
        torchaq.ops.widen_scores(triton_lut_score(lut, packed, num_classes, bias), columns),
        lut.new_zeros((lut.shape[0],))),
    # float64 stays on the reference (tl.dot has no float64 tiles)
    "linear_ce": lambda e, *args: (torchaq.ops.linear_ce_reference if e.dtype == torch.float64 else triton_linear_ce)(
        e, *args),
}


def register_kernels(lib: torch.library.Library, dispatch_key: str) -> None:
    """Register the Triton kernels for ``dispatch_key`` in ``lib`` (a ``torchaq`` IMPL library)."""
    for name, fn in KERNELS.items():
        lib.impl(name, fn, dispatch_key)


_LIB = torch.library.Library("torchaq", "IMPL")
register_kernels(_LIB, "CUDA")
