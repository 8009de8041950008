"""Registers the Triton kernels as the CUDA kernels of the ``torch.ops.torchaq.*`` ops.

Imported by :func:`torchaq._backends.load_triton_kernels` only when triton imports and CUDA is
available; CPU tensors keep the C++ / reference kernels. ``pack_codes`` / ``unpack_codes`` stay on
the pure-torch reference (pure data movement, run once at prepack time).

The ops keep their fake kernels from :mod:`torchaq.ops`, so ``torch.compile`` traces them as
single opaque nodes that launch these kernels at run time (no graph break).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

import torchaq.ops  # noqa: F401  (defines the op schemas this module implements)

from .lut import triton_compute_lut
from .scan import triton_lut_topk
from .score import triton_lut_score

__all__ = ["triton_compute_lut", "triton_lut_score", "triton_lut_topk"]

_LIB = torch.library.Library("torchaq", "IMPL")


def _compute_lut_cuda(queries: Tensor, codebooks: Tensor) -> Tensor:
    return triton_compute_lut(queries, codebooks)


def _lut_score_cuda(lut: Tensor, packed: Tensor, num_classes: int, bias: Optional[Tensor] = None) -> Tensor:
    return triton_lut_score(lut, packed, num_classes, bias)


def _lut_topk_cuda(
    lut: Tensor, packed: Tensor, num_classes: int, k: int, bias: Optional[Tensor] = None
) -> Tuple[Tensor, Tensor]:
    return triton_lut_topk(lut, packed, num_classes, k, bias)


_LIB.impl("compute_lut", _compute_lut_cuda, "CUDA")
_LIB.impl("lut_score", _lut_score_cuda, "CUDA")
_LIB.impl("lut_topk", _lut_topk_cuda, "CUDA")
