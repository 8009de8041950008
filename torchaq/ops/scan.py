"""``torch.ops.torchaq.lut_score`` / ``lut_topk``: ``score[b, n] = sum_m LUT[b, m, code[n, m]] (+ bias[n])``.

The references sum the float LUT exactly, chunk by chunk of classes (never a ``(B, V, M)``
gather); the CPU kernels (``torchaq/csrc/scan*.cpp``) and the Triton kernels quantize the LUT of
4-bit codes (FAISS fast-scan / ScaNN LUT16) for :func:`lut_topk`.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from torchaq.ops.layout import BLOCK, bits_of_lut, check_finite, check_k, check_lut_scan_args
from torchaq.ops.pack import unpack_codes_reference
from torchaq.ops.schemas import LIB


def _chunk_rows(batch: int, num_subspaces: int) -> int:
    # keep the (B, chunk, M) gathered block around 8M floats (32 MB)
    return max(BLOCK, (8 << 20) // max(1, batch * num_subspaces) // BLOCK * BLOCK)


def score_chunks(lut: Tensor, packed: Tensor, num_classes: int, bias: Optional[Tensor]):
    """Yield ``(start, scores)`` with exact float32 LUT sums for consecutive chunks of classes."""
    batch, m, k = lut.shape
    bits = bits_of_lut(lut)
    flat = lut.reshape(batch, m * k)
    offsets = torch.arange(m, device=lut.device) * k
    rows_per_chunk = _chunk_rows(batch, m)
    blocks_per_chunk = rows_per_chunk // BLOCK
    for b0 in range(0, packed.shape[0], blocks_per_chunk):
        start = b0 * BLOCK
        stop = min(num_classes, start + rows_per_chunk)
        chunk = packed[b0 : b0 + blocks_per_chunk]
        codes = unpack_codes_reference(chunk, m, bits, stop - start).long() + offsets
        scores = flat[:, codes].sum(-1)
        if bias is not None:
            scores = scores + bias[start:stop]
        yield start, scores


@torch.library.register_fake("torchaq::lut_score")
def _lut_score_fake(lut: Tensor, packed: Tensor, num_classes: int, bias: Optional[Tensor] = None) -> Tensor:
    check_lut_scan_args(lut, packed, num_classes, bias)
    return lut.new_empty((lut.shape[0], num_classes))


@torch.library.impl(LIB, "lut_score", "CompositeExplicitAutograd")
def lut_score_reference(lut: Tensor, packed: Tensor, num_classes: int, bias: Optional[Tensor] = None) -> Tensor:
    check_lut_scan_args(lut, packed, num_classes, bias)
    out = lut.new_empty((lut.shape[0], num_classes))
    for start, scores in score_chunks(lut, packed, num_classes, bias):
        out[:, start : start + scores.shape[1]] = scores
    return out


@torch.library.register_fake("torchaq::lut_topk")
def _lut_topk_fake(
    lut: Tensor, packed: Tensor, num_classes: int, k: int, bias: Optional[Tensor] = None
) -> Tuple[Tensor, Tensor]:
    check_lut_scan_args(lut, packed, num_classes, bias)
    check_k(k)
    kk = min(k, num_classes)
    return lut.new_empty((lut.shape[0], kk)), lut.new_empty((lut.shape[0], kk), dtype=torch.int64)


@torch.library.impl(LIB, "lut_topk", "CompositeExplicitAutograd")
def lut_topk_reference(
    lut: Tensor, packed: Tensor, num_classes: int, k: int, bias: Optional[Tensor] = None
) -> Tuple[Tensor, Tensor]:
    check_lut_scan_args(lut, packed, num_classes, bias)
    check_k(k)
    check_finite(lut, bias)
    kk = min(k, num_classes)
    batch = lut.shape[0]
    best_v = lut.new_full((batch, 0), -math.inf)
    best_i = torch.zeros((batch, 0), dtype=torch.int64, device=lut.device)
    for start, scores in score_chunks(lut, packed, num_classes, bias):
        idx = torch.arange(start, start + scores.shape[1], device=lut.device).expand(batch, -1)
        v = torch.cat([best_v, scores], dim=1)
        i = torch.cat([best_i, idx], dim=1)
        best_v, pos = v.topk(min(kk, v.shape[1]), dim=1)
        best_i = i.gather(1, pos)
    return best_v.contiguous(), best_i.contiguous()



def lut_score(lut: Tensor, packed: Tensor, num_classes: int, bias: Optional[Tensor] = None) -> Tensor:
    """Scores of all classes, ``(B, N)`` float32: ``sum_m lut[b, m, code[n, m]] + bias[n]``.

    Exact float sums on every backend (no LUT quantization): this is what
    :meth:`torchaq.AnisotropicPQ.score` returns.
    """
    return torch.ops.torchaq.lut_score(lut, packed, num_classes, bias)


def lut_topk(
    lut: Tensor, packed: Tensor, num_classes: int, k: int, bias: Optional[Tensor] = None
) -> Tuple[Tensor, Tensor]:
    """Top-``k`` classes by LUT score, ``(values, indices)`` of shape ``(B, min(k, N))``, best first.

    The reference sums the float LUT exactly; the CPU (C++) and CUDA (Triton) kernels may quantize
    the LUT (4-bit codes: uint8 entries, uint16 sums) and return de-quantized approximate scores,
    which is why callers re-score the returned candidates exactly.
    """
    return torch.ops.torchaq.lut_topk(lut, packed, num_classes, k, bias)

