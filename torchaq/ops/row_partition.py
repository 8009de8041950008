"""``torch.ops.torchaq.row_log_partition``: each row's exact log-partition function, batch-invariant.

``row_log_partition(h (B, d), weight (V, d), bias (V,)?, temperature, floor (B,)?) -> (B, 2)``
float32: column 0 is ``logsumexp_i(l_i / T)`` over all ``V`` classes, ``l = h @ W.T + b``; column 1
the same over the classes with ``l_i >= floor`` only (a truncated distribution's partition
function: top-p, min-p), equal to column 0 without ``floor``; ``-inf`` where no class is left.

Exact means every logit: ``B V d`` multiply-adds, and no ``(B, V)`` matrix is ever held. A row's
values are bitwise the same alone or in any batch and at any thread count (where a batched matmul
lets the BLAS pick its blocking by batch size). The C++ kernel cuts the classes into tiles of a
width fixed by ``d`` alone; each tile's logits are the dot products of
:func:`torchaq.ops.rescore_topk` (the same summation order on every ISA), its per-row
``(max, sum exp)`` come from the fused cross-entropy's tile kernel, and the tiles are combined in
class order in float64. Threads take groups of tiles, so the weight is read once per call and
reused from cache by every row, where the reference reads it once per row. The reference (every
other device) is one ``torch.mv`` over ``W`` per row, then ``torch.logsumexp``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from torchaq.ops.schemas import LIB


def check_row_log_partition_args(h: Tensor, weight: Tensor, bias: Optional[Tensor], temperature: float,
                                 floor: Optional[Tensor]) -> None:
    """Validate ``row_log_partition``'s arguments (errors name the argument); the kernels also refuse a
    non-finite ``h`` (a data check, which the fake kernel cannot make)."""
    torch._check_type(isinstance(h, Tensor) and h.is_floating_point() and h.dim() == 2,
                      lambda: f"h must be a floating-point (B, d) tensor, got {getattr(h, 'dtype', type(h).__name__)} "
                              f"of shape {tuple(getattr(h, 'shape', ()))}")
    torch._check_type(isinstance(weight, Tensor) and weight.is_floating_point() and weight.dim() == 2,
                      lambda: f"weight must be a floating-point (V, d) tensor, got shape {tuple(getattr(weight, 'shape', ()))}")
    torch._check_value(weight.shape[1] == h.shape[1],
                       lambda: f"h has d = {h.shape[1]} but weight has d = {weight.shape[1]}")
    if bias is not None:
        torch._check_value(bias.dim() == 1 and bias.shape[0] == weight.shape[0] and bias.is_floating_point(),
                           lambda: f"bias must be a floating-point ({weight.shape[0]},) tensor, got {tuple(bias.shape)}")
    if floor is not None:
        torch._check_value(floor.dim() == 1 and floor.shape[0] == h.shape[0] and floor.dtype == torch.float32,
                           lambda: f"floor must be a float32 ({h.shape[0]},) tensor, got {floor.dtype} {tuple(floor.shape)}")
    torch._check_value(isinstance(temperature, (int, float)) and 0 < temperature < math.inf,
                       lambda: f"temperature must be a finite number > 0, got {temperature!r}")
    for name, t in (("weight", weight), ("bias", bias), ("floor", floor)):
        torch._check_value(t is None or t.device == h.device, lambda: f"{name} is on {t.device} but h is on {h.device}")


@torch.library.register_fake("torchaq::row_log_partition")
def _row_log_partition_fake(h: Tensor, weight: Tensor, bias: Optional[Tensor], temperature: float,
                            floor: Optional[Tensor]) -> Tensor:
    check_row_log_partition_args(h, weight, bias, temperature, floor)
    return h.new_empty((h.shape[0], 2), dtype=torch.float32)


@torch.library.impl(LIB, "row_log_partition", "CompositeExplicitAutograd")
def row_log_partition_reference(h: Tensor, weight: Tensor, bias: Optional[Tensor], temperature: float,
                                floor: Optional[Tensor]) -> Tensor:
    check_row_log_partition_args(h, weight, bias, temperature, floor)
    if h.numel() and not bool(torch.isfinite(h).all()):
        raise ValueError("row_log_partition: h must be finite (got inf or nan)")
    w = weight if weight.dtype == torch.float32 else weight.float()
    b = None if bias is None else bias.float()
    out = torch.empty((h.shape[0], 2), dtype=torch.float32, device=h.device)
    for r in range(h.shape[0]):
        row = h[r].float().clone()  # a fresh, aligned vector: the BLAS path cannot depend on the batch
        logits = torch.mv(w, row)
        if b is not None:
            logits = logits + b
        scaled = logits / temperature
        out[r, 0] = torch.logsumexp(scaled, 0)
        out[r, 1] = out[r, 0] if floor is None else torch.logsumexp(scaled.masked_fill(logits < floor[r], -math.inf), 0)
    return out


def row_log_partition(h: Tensor, weight: Tensor, bias: Optional[Tensor] = None, temperature: float = 1.0,
                      floor: Optional[Tensor] = None) -> Tensor:
    """float32 ``(B, 2)``: ``[logsumexp(l / T), logsumexp over l >= floor]`` per row (module docstring).
    Inference only (no autograd); cost ``B V d`` multiply-adds."""
    with torch.no_grad():
        return torch.ops.torchaq.row_log_partition(h.detach(), weight.detach(),
                                                   None if bias is None else bias.detach(), float(temperature), floor)
