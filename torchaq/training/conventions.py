"""The loss conventions every torchaq loss shares: target checks and reductions (as ``F.cross_entropy``)."""
from __future__ import annotations

from torch import Tensor

import torch

REDUCTIONS = ("mean", "sum", "none")


def check_reduction(reduction: str) -> None:
    """``reduction`` is one of :data:`REDUCTIONS` (ValueError naming it otherwise)."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def check_targets(target: Tensor, h: Tensor, num_classes: int) -> None:
    """``target`` holds int64 / int32 class ids in ``[0, V)`` with the shape of ``h`` without its
    last dim, on ``h``'s device (TypeError / ValueError naming ``target``)."""
    if not isinstance(target, Tensor) or target.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"target must be an int64 tensor of class indices, got {getattr(target, 'dtype', type(target))}")
    if target.shape != h.shape[:-1]:
        raise ValueError(f"target must have shape {tuple(h.shape[:-1])} (h without its last dim), got {tuple(target.shape)}")
    if target.device != h.device:
        raise ValueError(f"target is on {target.device} but h is on {h.device}")
    if target.numel() and (int(target.min()) < 0 or int(target.max()) >= num_classes):
        raise ValueError(f"target values must be in [0, V={num_classes}), got range [{int(target.min())}, {int(target.max())}]")


def reduce_loss(loss: Tensor, target: Tensor, reduction: str) -> Tensor:
    """Per-row ``loss`` ``(N,)`` -> ``mean`` / ``sum`` / ``none`` (the shape of ``target``)."""
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss.reshape(target.shape)
