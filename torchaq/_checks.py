"""Argument checks shared by the quantizer and the layer (errors name the argument)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def check_features(t: Tensor, dim: int, name: str, device: Optional[torch.device] = None, owner: str = "module") -> None:
    """``t`` is a floating-point tensor whose last dimension is ``dim`` (and on ``device``)."""
    if not isinstance(t, Tensor) or t.dim() < 1 or t.shape[-1] != dim:
        shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
        raise ValueError(f"{name} must have last dimension d={dim}, got {shape}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but the {owner} is on {device}")
