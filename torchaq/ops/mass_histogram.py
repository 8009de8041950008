"""``torch.ops.torchaq.mass_histogram``: each row's softmax mass by logit, in fixed-width bins, exactly.

``mass_histogram(h (B, d), weight (V, d), bias (V,)?, temperature, top (B,), width, bins)
-> (B, bins) float64``: with ``l = h @ W.T + b`` and ``x_i = (l_i - top) / T``, bin ``j`` holds
``sum exp(x_i)`` over the classes with ``floor(-x_i / width) = j`` (clamped to ``[0, bins - 1]``:
classes above ``top`` fall in bin 0, the far tail in the last bin). Every logit is exact (``B V d``
multiply-adds, no ``(B, V)`` matrix); the masses are summed as integers of ``2^-40`` (a mass is
capped at 16, rounded half up), so the bins are exact to ``V 2^-41`` and their order of summation is irrelevant:
a row's bins are bitwise the same in any batch and at any thread count.

It places the sampler's ``top_p`` nucleus: the bins' running sum, from the top, reaches ``top_p``
times their total (the partition function over ``exp(top / T)``) inside one bin, whose edges bound
the nucleus floor to ``width`` (in ``l / T``). The reference (every other device) is one
``torch.mv`` per row and a ``scatter_add`` of the same integers; its logits come from another
summation order, so a class within rounding of a bin edge may land in the neighbouring bin.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from torchaq.ops.schemas import LIB

UNIT = 2.0 ** 40  # masses are summed as integers of 1 / UNIT
MASS_CAP = 16.0   # a mass above this (a class far above top) is capped: int64 sums never overflow


def check_mass_histogram_args(h: Tensor, weight: Tensor, bias: Optional[Tensor], temperature: float, top: Tensor,
                              width: float, bins: int) -> None:
    """Validate ``mass_histogram``'s arguments (errors name the argument)."""
    torch._check_type(isinstance(h, Tensor) and h.is_floating_point() and h.dim() == 2,
                      lambda: f"h must be a floating-point (B, d) tensor, got shape {tuple(getattr(h, 'shape', ()))}")
    torch._check_type(isinstance(weight, Tensor) and weight.is_floating_point() and weight.dim() == 2,
                      lambda: "weight must be a floating-point (V, d) tensor")
    torch._check_value(weight.shape[1] == h.shape[1], lambda: f"h has d = {h.shape[1]} but weight has d = {weight.shape[1]}")
    if bias is not None:
        torch._check_value(bias.dim() == 1 and bias.shape[0] == weight.shape[0] and bias.is_floating_point(),
                           lambda: f"bias must be a floating-point ({weight.shape[0]},) tensor")
    torch._check_value(tuple(top.shape) == (h.shape[0],) and top.dtype == torch.float32,
                       lambda: f"top must be a float32 ({h.shape[0]},) tensor, got {top.dtype} {tuple(top.shape)}")
    torch._check_value(0 < temperature < math.inf, lambda: f"temperature must be a finite number > 0, got {temperature}")
    torch._check_value(0 < width < math.inf, lambda: f"width must be a finite number > 0, got {width}")
    torch._check_value(bins >= 1, lambda: f"bins must be >= 1, got {bins}")


@torch.library.register_fake("torchaq::mass_histogram")
def _mass_histogram_fake(h, weight, bias, temperature: float, top, width: float, bins: int) -> Tensor:
    check_mass_histogram_args(h, weight, bias, temperature, top, width, bins)
    return h.new_empty((h.shape[0], bins), dtype=torch.float64)


@torch.library.impl(LIB, "mass_histogram", "CompositeExplicitAutograd")
def mass_histogram_reference(h: Tensor, weight: Tensor, bias: Optional[Tensor], temperature: float, top: Tensor,
                             width: float, bins: int) -> Tensor:
    check_mass_histogram_args(h, weight, bias, temperature, top, width, bins)
    if h.numel() and not bool(torch.isfinite(h).all()):
        raise ValueError("mass_histogram: h must be finite")
    if top.numel() and not bool(torch.isfinite(top).all()):
        raise ValueError("mass_histogram: top must be finite")
    w = weight if weight.dtype == torch.float32 else weight.float()
    b = None if bias is None else bias.float()
    out = torch.zeros((h.shape[0], bins), dtype=torch.int64, device=h.device)
    for r in range(h.shape[0]):
        logits = torch.mv(w, h[r].float().clone())
        if b is not None:
            logits = logits + b
        x = (logits - top[r]) / temperature
        idx = torch.floor(-x.double() / width).clamp_(0, bins - 1).long()
        units = (x.exp().clamp(max=MASS_CAP).double() * UNIT + 0.5).long()  # round half up (masses >= 0)
        out[r].scatter_add_(0, idx, units)
    return out.double() / UNIT


def mass_histogram(h: Tensor, weight: Tensor, bias: Optional[Tensor], temperature: float, top: Tensor, width: float,
                   bins: int) -> Tensor:
    """``(B, bins)`` float64: each row's mass ``exp((l - top) / T)`` in bins of ``(top - l) / T`` (module docstring)."""
    with torch.no_grad():
        return torch.ops.torchaq.mass_histogram(h.detach(), weight.detach(), None if bias is None else bias.detach(),
                                                float(temperature), top, float(width), bins)
