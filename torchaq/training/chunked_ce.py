"""``chunked_cross_entropy``: the earlier name and argument order of the exact fused loss.

A thin alias of :func:`torchaq.linear_cross_entropy` (one implementation: the
``torch.ops.torchaq.linear_ce`` op), kept for ``(h, weight, bias, target)`` callers;
``chunk_size`` is the class block of that op. New code should call ``linear_cross_entropy``,
which also takes ``ignore_index``, ``softcap``, ``label_smoothing`` and ``z_loss``.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from torchaq.checks import is_int
from torchaq.ops.linear_ce import DEFAULT_CLASS_BLOCK
from torchaq.training.conventions import IGNORE_INDEX, check_reduction, check_targets
from torchaq.training.linear_ce import linear_cross_entropy

DEFAULT_CHUNK = DEFAULT_CLASS_BLOCK


def chunked_cross_entropy(
    h: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    target: Tensor,
    chunk_size: int = DEFAULT_CHUNK,
    reduction: str = "mean",
    ignore_index: int = IGNORE_INDEX,
) -> Tensor:
    """``F.cross_entropy(h @ weight.T + bias, target)`` exactly, without the ``(B, V)`` logits:
    ``linear_cross_entropy(h, weight, target, bias, ignore_index, reduction=reduction, class_block=chunk_size)``.

    Args:
        h: ``(..., d)`` floating-point rows.
        weight: ``(V, d)``; bias: optional ``(V,)``.
        target: int64 ``(...)`` class indices in ``[0, V)`` or ``ignore_index``.
        chunk_size: classes per block (positive integer).
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
    """
    if not isinstance(weight, Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"weight must be a floating-point (V, d) tensor, got {getattr(weight, 'shape', type(weight))}")
    num_classes, dim = weight.shape
    if not isinstance(h, Tensor) or not h.is_floating_point() or h.dim() < 1 or h.shape[-1] != dim:
        raise ValueError(f"h must be a floating-point tensor with last dimension d={dim}, got {getattr(h, 'shape', type(h))}")
    if bias is not None and (not isinstance(bias, Tensor) or bias.shape != (num_classes,)):
        raise ValueError(f"bias must have shape ({num_classes},), got {getattr(bias, 'shape', bias)}")
    check_targets(target, h, num_classes, ignore_index=ignore_index)
    if not is_int(chunk_size) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    check_reduction(reduction)
    return linear_cross_entropy(h, weight, target, bias=bias, ignore_index=ignore_index, reduction=reduction,
                                class_block=int(chunk_size))
