"""The loss conventions every torchaq loss shares, as ``F.cross_entropy`` has them.

* ``ignore_index`` (default -100, Hugging Face's padding label): an ignored row has loss 0 and
  zero gradient, and leaves the mean: ``mean = sum of the kept rows' losses / number kept``. A
  batch whose every row is ignored gives NaN for ``mean`` (0 / 0) and 0 for ``sum``.
* ``label_smoothing`` eps: ``(1 - eps) (lse - l_t) + eps (lse - mean_c l_c)``.
* ``z_loss`` coefficient zc: ``+ zc lse^2`` per kept row (PaLM's auxiliary loss); the losses can
  return it separately (``return_z_loss``), for logging.
* ``softcap`` s: logits ``s tanh(l / s)`` (Gemma 2) before everything above.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

REDUCTIONS = ("mean", "sum", "none")
IGNORE_INDEX = -100


def check_reduction(reduction: str) -> None:
    """``reduction`` is one of :data:`REDUCTIONS` (ValueError naming it otherwise)."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def check_targets(target: Tensor, h: Tensor, num_classes: int, name: str = "target",
                  ignore_index: Optional[int] = None) -> None:
    """``target`` holds int64 / int32 class ids in ``[0, V)`` (or ``ignore_index``) with the shape of
    ``h`` without its last dim, on ``h``'s device (TypeError / ValueError naming ``name``). The range
    check reads the values (a host sync); it is skipped while ``torch.compile`` traces."""
    if not isinstance(target, Tensor) or target.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name} must be an int64 tensor of class indices, got {getattr(target, 'dtype', type(target))}")
    if target.shape != h.shape[:-1]:
        raise ValueError(f"{name} must have shape {tuple(h.shape[:-1])} (h without its last dim), got {tuple(target.shape)}")
    if target.device != h.device:
        raise ValueError(f"{name} is on {target.device} but h is on {h.device}")
    if not target.numel() or torch.compiler.is_compiling():
        return
    kept = target if ignore_index is None else target[target != ignore_index]
    if kept.numel() and (int(kept.min()) < 0 or int(kept.max()) >= num_classes):
        extra = "" if ignore_index is None else f" (or ignore_index={ignore_index})"
        raise ValueError(f"{name} values must be in [0, V={num_classes}){extra}, got range [{int(kept.min())}, {int(kept.max())}]")


def check_loss_options(softcap: Optional[float], label_smoothing: float, z_loss: float) -> None:
    """``softcap`` is None or a finite number > 0, ``label_smoothing`` in ``[0, 1]``, ``z_loss`` finite >= 0."""
    if softcap is not None and (isinstance(softcap, bool) or not isinstance(softcap, (int, float))
                                or not math.isfinite(softcap) or softcap <= 0):
        raise ValueError(f"softcap must be None or a finite number > 0, got {softcap!r}")
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float)) or not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be a number in [0, 1], got {label_smoothing!r}")
    if isinstance(z_loss, bool) or not isinstance(z_loss, (int, float)) or not math.isfinite(z_loss) or z_loss < 0:
        raise ValueError(f"z_loss must be a finite number >= 0, got {z_loss!r}")


def check_finite(**tensors: Optional[Tensor]) -> None:
    """Every given tensor is finite (ValueError naming the first that is not). One pass over each,
    and a host sync; skipped while ``torch.compile`` traces."""
    if torch.compiler.is_compiling():
        return
    for name, t in tensors.items():
        if t is not None and t.device.type != "meta" and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name} must be finite (it holds inf or nan)")


def softcap_logits(logits: Tensor, softcap: Optional[float]) -> Tensor:
    """``softcap * tanh(logits / softcap)`` (identity for ``softcap=None``)."""
    return logits if softcap is None else softcap * torch.tanh(logits / softcap)


def kept_rows(target: Tensor, ignore_index: Optional[int]) -> Tensor:
    """Boolean mask of the rows that count (``target != ignore_index``)."""
    return torch.ones_like(target, dtype=torch.bool) if ignore_index is None else target != ignore_index


def reduce_loss(loss: Tensor, target: Tensor, reduction: str, ignore_index: Optional[int] = None) -> Tensor:
    """Per-row ``loss`` ``(N,)`` (0 on ignored rows) -> ``mean`` over the kept rows (NaN when none is
    kept, as ``F.cross_entropy``) / ``sum`` / ``none`` (the shape of ``target``)."""
    if reduction == "mean":
        if ignore_index is None:
            return loss.mean()
        return loss.sum() / kept_rows(target, ignore_index).sum().to(loss.dtype)
    if reduction == "sum":
        return loss.sum()
    return loss.reshape(target.shape)
