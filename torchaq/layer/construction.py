"""How :class:`torchaq.QuantizedSoftmax`'s arguments become its weight and bias parameters.

Two forms, told apart by the type of the first argument:

* ``QuantizedSoftmax(weight, bias=None, ...)``: a ``(V, d)`` floating tensor (an ``nn.Parameter``
  is kept as is, so a tied embedding stays tied) and an optional ``(V,)`` bias. The bias may also
  come second positionally, as it always could.
* ``QuantizedSoftmax(in_features, out_features, bias=True, device=None, dtype=None)``: the
  ``nn.Linear`` signature; the parameters are initialised exactly as ``nn.Linear`` initialises them
  (Kaiming-uniform), and the layer is left unfitted -- it fits on first use or on ``fit()``.

Finiteness of the values is checked only when the layer fits now: a skeleton built from
``torch.empty`` holds garbage until ``load_state_dict`` fills it (which checks then).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from torchaq.checks import check_int, has_data, is_int


def _desc(t) -> str:
    return f"{t.dtype} {tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__


def parameters(weight, out_features, bias, device, dtype, check_finite: bool) -> Tuple[nn.Parameter, Optional[nn.Parameter], bool]:
    """``(weight, bias, from_shape)``: the layer's parameters from either form (module docstring)."""
    if is_int(weight):
        in_features = check_int(weight, "in_features", low=1)
        if not is_int(out_features):
            raise ValueError(f"out_features must be a positive integer when in_features is given, got {_desc(out_features)}")
        out_features = check_int(out_features, "out_features", low=1)
        if bias is None:
            bias = True
        if not isinstance(bias, bool):
            raise ValueError(f"bias must be True or False with QuantizedSoftmax(in_features, out_features), got {_desc(bias)}")
        linear = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        return linear.weight, linear.bias, True
    if out_features is not None:
        if not isinstance(out_features, Tensor):
            raise ValueError(f"out_features is only for QuantizedSoftmax(in_features: int, out_features: int), "
                             f"but weight is a {_desc(weight)}")
        if bias is not None:
            raise ValueError("bias given twice (positionally after weight and as bias=)")
        bias = out_features
    if device is not None or dtype is not None:
        raise ValueError("device= and dtype= are for QuantizedSoftmax(in_features, out_features); move the weight instead")
    if not isinstance(weight, Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"weight must be a floating-point (V, d) tensor or in_features an int, got {_desc(weight)}")
    num_classes = weight.shape[0]
    if isinstance(bias, bool):
        raise ValueError("bias=True/False is for QuantizedSoftmax(in_features, out_features); pass a (V,) tensor or None")
    if bias is not None:
        if not isinstance(bias, Tensor) or bias.shape != (num_classes,) or not bias.is_floating_point():
            raise ValueError(f"bias must be a floating-point ({num_classes},) tensor, got {_desc(bias)}")
        if check_finite and has_data(bias) and not bool(torch.isfinite(bias).all()):
            raise ValueError("bias contains NaN or Inf")
    weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight.detach().clone())
    if bias is not None:
        bias = bias if isinstance(bias, nn.Parameter) else nn.Parameter(bias.detach().clone())
    return weight, bias, False


def check_weight_rows(weight: Tensor, bias: Optional[Tensor] = None) -> None:
    """Refuse a weight (or bias) with NaN / Inf before fitting, naming ``weight`` (the quantizer's errors say ``x``)."""
    if bias is not None and has_data(bias) and not bool(torch.isfinite(bias.detach()).all()):
        raise ValueError("bias contains NaN or Inf")
    if not has_data(weight) or weight.numel() == 0:
        return
    bad = ~torch.isfinite(weight.detach()).all(dim=1)
    if bool(bad.any()):
        raise ValueError(f"weight has NaN or Inf values in row {int(bad.nonzero()[0])} ({int(bad.sum())} rows)")
