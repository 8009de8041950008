"""Argument checks shared by the quantizer and the layer (errors name the argument)."""
from __future__ import annotations

import numbers
from typing import Optional

import numpy as np
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


def is_int(value) -> bool:
    """``value`` is an integer (``numbers.Integral``: numpy integers too; ``bool`` is not)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def check_int(value, name: str, low: Optional[int] = None, high: Optional[int] = None, what: str = "") -> int:
    """``value`` as a Python int if it is an integer (``numbers.Integral``: numpy integers too, ``bool``
    refused) in ``[low, high]``; else a ``ValueError`` naming ``name``."""
    ok = is_int(value)
    if ok:
        value = int(value)
        ok = (low is None or value >= low) and (high is None or value <= high)
    if not ok:
        bounds = what or (
            f"in [{low}, {high}]" if low is not None and high is not None else f">= {low}" if low is not None else ""
        )
        raise ValueError(f"{name} must be an integer {bounds}".rstrip() + f", got {value!r}")
    return value


def check_real(value, name: str, what: str, ok) -> float:
    """``value`` as a float if it is a real number (``bool`` refused) and ``ok(value)``; else a
    ``ValueError`` naming ``name`` and saying ``what`` it must be."""
    if not isinstance(value, numbers.Real) or isinstance(value, (bool, np.bool_)) or not ok(float(value)):
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return float(value)


def has_data(t: Tensor) -> bool:
    """False for meta tensors and while ``torch.compile`` traces: data-dependent checks skip those."""
    return t.device.type != "meta" and not torch.compiler.is_compiling()
