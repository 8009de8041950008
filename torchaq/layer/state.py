"""Loading a :class:`torchaq.QuantizedSoftmax` ``state_dict``: shape adaptation and refusal of bad state.

``load_state_dict`` copies tensors in without looking at them, so a checkpoint with a NaN weight or
a side-list row outside ``[0, V)`` used to load and fail much later (or silently return garbage).
:func:`check` refuses such a state at load time with an error naming the offending key, the way
PyTorch reports a size mismatch. Cost: one pass over each loaded tensor (``O(V d)``).
"""
from __future__ import annotations

import math
from typing import List

import torch
from torch import Tensor

from torchaq.checks import has_data


def adapt(state_dict: dict, prefix: str, num_classes: int, side_rows: Tensor) -> None:
    """Fill in what older checkpoints lack, and give the side list the stored length (it varies)."""
    key = prefix + "side_rows"
    if key not in state_dict:
        state_dict[key] = side_rows
    # inf: unknown until a refresh (a checkpoint without error_scales gets them at load, from its weight and codes)
    for name in ("residual_norms", "error_scales"):
        state_dict.setdefault(prefix + name, torch.full((num_classes,), math.inf))


def check(state_dict: dict, prefix: str, num_classes: int, error_msgs: List[str]) -> None:
    """Append an error naming the key for each bad tensor of a layer's incoming state (module docstring)."""

    def bad(name: str, why: str) -> None:
        error_msgs.append(f"{prefix}{name}: {why}")

    for name in ("weight", "bias"):
        t = state_dict.get(prefix + name)
        if isinstance(t, Tensor) and has_data(t) and t.is_floating_point() and t.numel():
            finite = torch.isfinite(t)
            if not bool(finite.all()):
                where = (~finite).nonzero()[0].tolist()
                bad(name, f"holds NaN or Inf (first at index {where}); refusing to load it")
    rows = state_dict.get(prefix + "side_rows")
    if isinstance(rows, Tensor) and has_data(rows):
        if rows.is_floating_point() or rows.dim() != 1:
            bad("side_rows", f"must be a 1-D integer tensor, got {rows.dtype} {tuple(rows.shape)}")
        elif rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= num_classes):
            bad("side_rows", f"rows must lie in [0, V={num_classes}), got [{int(rows.min())}, {int(rows.max())}]")
        elif rows.numel() != rows.unique().numel():
            bad("side_rows", "rows must not repeat")
    for name in ("residual_norms", "error_scales"):
        res = state_dict.get(prefix + name)
        if isinstance(res, Tensor) and has_data(res) and res.numel() and bool(torch.isnan(res).any() | (res < 0).any()):
            bad(name, "must be >= 0 (inf allowed), got NaN or a negative value")
