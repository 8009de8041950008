"""Triton GPU kernels for torchaq (installed as ``torchaq.triton_kernels``).

Plain Python entry points (usable on CPU tensors under ``TRITON_INTERPRET=1``):

* :func:`triton_compute_lut` -- ``LUT[b, m, j] = <q_m, C_m[j]>`` (lut.py)
* :func:`triton_lut_score`   -- dense ``(B, N)`` LUT scores (score.py)
* :func:`triton_lut_topk`    -- LUT scan with fused per-block top-k and a merge (scan.py)
* :func:`triton_linear_ce`   -- fused linear cross-entropy: loss, lse, gradients (linear_ce.py)

``torchaq.triton_kernels.register`` makes them the CUDA kernels of ``torch.ops.torchaq.*``.
"""
from .linear_ce import triton_linear_ce
from .lut import triton_compute_lut
from .scan import triton_lut_topk
from .score import triton_lut_score

__all__ = ["triton_compute_lut", "triton_linear_ce", "triton_lut_score", "triton_lut_topk"]
