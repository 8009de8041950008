"""``torch.ops.torchaq.lut_score_quantized``: every class's score from the uint8-quantized LUT.

The 4-bit scans (FAISS fast-scan / ScaNN LUT16; :func:`torchaq.ops.lut_topk` on CPU) quantize each
query's float LUT to one byte per entry with one scale per query (``torchaq/csrc/lut_quantize.h``)::

    scale  = min(255 / max_m range_m, (65535 - M) / sum_m range_m)      (float64; 1 if all ranges are 0)
    q[m,j] = min(255, trunc((lut[m, j] - min_m) * float32(scale) + 0.5))  (float32 arithmetic)
    score  = float32(sum_m q[m, code_m]) * float32(1 / scale) + (float32(sum_m min_m) + bias)

so each score differs from :func:`torchaq.ops.lut_score`'s exact float sum by a sum of ``M``
rounding errors, each at most ``step / 2`` with ``step = 1 / scale`` (returned per query). The
uint16 sums are exact, so every backend returns the same floats. A query whose median subspace
spans fewer than 4 steps of its scale (its table is set by a few outlying entries) is scored with
the exact float sums instead, and its step is 0; so are 8-bit codes (``K = 256``), which the scans
never quantize. On CUDA the op is the Triton float scan (exact, step 0: a GPU gathers float
entries as fast as bytes). Cost: one pass over the ``(V, M / 2)`` bytes of codes per query, ``O(B V M)``
byte lookups; about a quarter of :func:`lut_score`'s float gathers on AVX-512.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from torchaq.ops.layout import bits_of_lut, check_lut_scan_args
from torchaq.ops.scan import lut_score_reference, score_chunks
from torchaq.ops.schemas import LIB

MIN_MEDIAN_LEVELS = 4.0  # kMinMedianLevels of lut_quantize.cpp


def _sequential_sum(x: Tensor) -> Tensor:
    """float64 sum over the last dimension in index order (the C++ loop's order, so the same double)."""
    return x.double().cumsum(-1)[..., -1]


def quantize_lut_reference(lut: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(q (B, M, 16) uint8, inv_scale (B,), offset (B,), coarse (B,) bool)`` of a finite 4-bit LUT,
    exactly as ``torchaq/csrc/lut_quantize.cpp`` computes them (module docstring)."""
    batch, m, _ = lut.shape
    lo, hi = lut.amin(2), lut.amax(2)
    ranges = hi.double() - lo.double()
    maxr, sumr = ranges.amax(1), _sequential_sum(ranges)
    positive = maxr > 0
    scale = torch.where(positive, torch.minimum(255.0 / maxr.clamp(min=1e-300), (65535 - m) / sumr.clamp(min=1e-300)),
                        torch.ones_like(maxr))
    stride = max(1, m // 16)
    t = lut[:, ::stride].sort(dim=2).values
    trimmed = (t[:, :, 12].double() - t[:, :, 3].double()).sort(dim=1).values
    median = trimmed[:, trimmed.shape[1] // 2]
    coarse = positive & (median * scale < MIN_MEDIAN_LEVELS)
    sf = scale.float().unsqueeze(1).unsqueeze(2)
    q = ((lut - lo.unsqueeze(2)) * sf + 0.5).trunc().clamp_(max=255)
    huge = scale >= 1e37  # the scale overflows float32: the C++ rounds in double there
    if bool(huge.any()):
        qd = ((lut.double() - lo.double().unsqueeze(2)) * scale.unsqueeze(1).unsqueeze(2) + 0.5).clamp(max=255).trunc()
        q = torch.where(huge.unsqueeze(1).unsqueeze(2), qd.float(), q)
    return q.to(torch.uint8), (1.0 / scale).float(), _sequential_sum(lo).float(), coarse


def widen_scores(scores: Tensor, columns: int) -> Tensor:
    """``scores`` ``(B, N)`` as the first ``N`` columns of a ``(B, max(columns, N))`` buffer, zeros after."""
    if columns <= scores.shape[1]:
        return scores
    out = scores.new_zeros((scores.shape[0], columns))
    out[:, :scores.shape[1]] = scores
    return out


def _check_columns(columns: int) -> None:
    torch._check_value(isinstance(columns, int) and columns >= 0, lambda: f"columns must be an int >= 0, got {columns!r}")


@torch.library.register_fake("torchaq::lut_score_quantized")
def _lut_score_quantized_fake(lut: Tensor, packed: Tensor, num_classes: int,
                              bias: Optional[Tensor] = None, columns: int = 0) -> Tuple[Tensor, Tensor]:
    check_lut_scan_args(lut, packed, num_classes, bias)
    _check_columns(columns)
    return lut.new_empty((lut.shape[0], max(columns, num_classes))), lut.new_empty((lut.shape[0],))


@torch.library.impl(LIB, "lut_score_quantized", "CompositeExplicitAutograd")
def lut_score_quantized_reference(lut: Tensor, packed: Tensor, num_classes: int,
                                  bias: Optional[Tensor] = None, columns: int = 0) -> Tuple[Tensor, Tensor]:
    check_lut_scan_args(lut, packed, num_classes, bias)
    _check_columns(columns)
    step = lut.new_zeros((lut.shape[0],))
    if bits_of_lut(lut) != 4 or lut.shape[0] == 0 or num_classes == 0:  # (no class: no step either)
        return widen_scores(lut_score_reference(lut, packed, num_classes, bias), columns), step
    if not bool(torch.isfinite(lut).all()) or (bias is not None and not bool(torch.isfinite(bias).all())):
        raise ValueError("lut_score_quantized needs finite lut entries and bias (got inf or nan)")
    q, inv_scale, offset, coarse = quantize_lut_reference(lut)
    out = lut.new_zeros((lut.shape[0], max(columns, num_classes)))
    shift = offset.unsqueeze(1)
    # integer sums (exact in float32 below 2^24), then the C++ float ops in the same order
    for start, sums in score_chunks(q.float(), packed, num_classes, None):
        add = shift if bias is None else shift + bias[start:start + sums.shape[1]]
        out[:, start:start + sums.shape[1]] = sums * inv_scale.unsqueeze(1) + add
    if bool(coarse.any()):
        out[coarse, :num_classes] = lut_score_reference(lut[coarse], packed, num_classes, bias)
    step = torch.where(coarse, 0.0, inv_scale)
    return out, step


def lut_score_quantized(lut: Tensor, packed: Tensor, num_classes: int,
                        bias: Optional[Tensor] = None, columns: int = 0) -> Tuple[Tensor, Tensor]:
    """``(scores (B, max(columns, N)), step (B,))``: every class's score from the uint8-quantized LUT
    (module docstring), within ``M * step / 2`` of :func:`torchaq.ops.lut_score` (``step`` 0: exact),
    in the first ``N`` columns; the ``columns - N`` after them are 0, room a caller fills in place
    (the sampler writes its proposal weights over the scores without a second buffer)."""
    return torch.ops.torchaq.lut_score_quantized(lut, packed, num_classes, bias, columns)
