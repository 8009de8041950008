"""``torch.ops.torchaq.row_topk``: each row's ``k`` best scores, in a fixed order.

``row_topk(scores (B, N), k) -> (values (B, k'), indices (B, k'))`` with ``k' = min(k, N)``: the
``k'`` largest entries of each row, sorted by value descending and, among equal values, by index
ascending (the order of every top-k of this package, :func:`torchaq.ops.lut_topk` included). A
row's answer depends on that row alone, so it is the same in any batch and at any thread count
(``torch.topk`` leaves the order of ties unspecified). NaN is refused.

It serves scores already in memory, such as the sampler's :func:`torchaq.ops.lut_score_quantized`
output, so that their best classes need no second scan. The C++ kernel is the two-pass top-k of
the 4-bit scans on a float matrix: each 32-column block's maximum, a threshold that ``k`` blocks
reach, then only those ~``k`` blocks; cost one read of the ``B N`` scores plus ``O(B k log k)``.
The reference (every other device) is a stable descending sort, ``O(B N log N)``.
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from torchaq.ops.layout import check_k
from torchaq.ops.schemas import LIB


def check_row_topk_args(scores: Tensor, k: int) -> int:
    """Validate ``row_topk``'s arguments; return ``min(k, N)``."""
    torch._check_type(isinstance(scores, Tensor) and scores.dtype == torch.float32,
                      lambda: f"scores must be a float32 tensor, got {getattr(scores, 'dtype', type(scores).__name__)}")
    torch._check_value(scores.dim() == 2, lambda: f"scores must be (B, N), got shape {tuple(scores.shape)}")
    check_k(k)
    return min(k, scores.shape[1])


@torch.library.register_fake("torchaq::row_topk")
def _row_topk_fake(scores: Tensor, k: int) -> Tuple[Tensor, Tensor]:
    kk = check_row_topk_args(scores, k)
    return scores.new_empty((scores.shape[0], kk)), scores.new_empty((scores.shape[0], kk), dtype=torch.int64)


@torch.library.impl(LIB, "row_topk", "CompositeExplicitAutograd")
def row_topk_reference(scores: Tensor, k: int) -> Tuple[Tensor, Tensor]:
    kk = check_row_topk_args(scores, k)
    if scores.numel() and bool(scores.isnan().any()):
        raise ValueError("row_topk: scores must not contain nan")
    values, indices = scores.sort(dim=1, descending=True, stable=True)
    return values[:, :kk].contiguous(), indices[:, :kk].contiguous()


def row_topk(scores: Tensor, k: int) -> Tuple[Tensor, Tensor]:
    """``(values, indices)`` ``(B, min(k, N))``: each row's ``k`` largest scores, value descending then
    index ascending (module docstring)."""
    return torch.ops.torchaq.row_topk(scores, k)
