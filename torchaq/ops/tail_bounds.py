"""``torch.ops.torchaq.tail_bounds_``: the full-vocabulary sampler's upper bounds of the tail logits, in place.

``tail_bounds_(scores (B, N) float32, error_scales (N,), h (B, d), sigmas, step (B,), rounding, head (B, H) int64)
-> upper_max (B,)``: on entry ``scores`` holds each class's LUT score ``s_i``; on return it holds

    ``u_i = s_i + a_b rho_i + c_b``,  ``a_b = sigmas * |h_b|``,  ``c_b = rounding * step_b``,

(``rho_i = error_scales[i]``, the scale of class ``i``'s LUT error ``<h, r_i> / |h|``:
:mod:`torchaq.layer.error_model`; ``rounding * step_b`` the allowance for the uint8 rounding of
the scores, :func:`torchaq.layer.tail_bound.rounding_factor`), and ``-inf`` at every class
``head[b, j]`` (the exactly scored classes, ids in ``[0, N)``). Returns each row's largest
bound (``-inf`` where no class is left). The sums are in float32 in that order (``s + a rho``, then
``+ c``); ``a_b`` is ``|h_b|`` accumulated in float64, rounded to float32, times ``sigmas``.
``scores`` may be a column slice of a wider buffer (its rows any stride, its columns contiguous):
the sampler forms the bounds over the scores inside the one buffer that later holds its proposal
weights (:func:`torchaq.ops.proposal_weights_`). Cost: ``O(N + H)`` per row.
"""
from __future__ import annotations

import torch
from torch import Tensor

from torchaq.ops.schemas import LIB


def check_tail_bounds_args(scores: Tensor, error_scales: Tensor, h: Tensor, sigmas: float, step: Tensor,
                           rounding: float, head: Tensor) -> None:
    """Validate ``tail_bounds_``'s arguments (errors name the argument)."""
    torch._check_value(scores.dim() == 2 and scores.dtype == torch.float32 and (scores.shape[1] <= 1 or scores.stride(1) == 1),
                       lambda: f"scores must be a float32 (B, N) tensor with contiguous columns, got {scores.dtype} "
                               f"{tuple(scores.shape)}")
    B, N = scores.shape
    torch._check_value(tuple(error_scales.shape) == (N,) and error_scales.is_floating_point(),
                       lambda: f"error_scales must be a floating-point ({N},) tensor, got {error_scales.dtype} "
                               f"{tuple(error_scales.shape)}")
    torch._check_value(h.dim() == 2 and h.shape[0] == B and h.is_floating_point(),
                       lambda: f"h must be a floating-point ({B}, d) tensor, got {h.dtype} {tuple(h.shape)}")
    torch._check_value(tuple(step.shape) == (B,) and step.dtype == torch.float32,
                       lambda: f"step must be a float32 ({B},) tensor, got {step.dtype} {tuple(step.shape)}")
    torch._check_value(head.dim() == 2 and head.shape[0] == B and head.dtype == torch.int64,
                       lambda: f"head must be an int64 ({B}, H) tensor, got {head.dtype} {tuple(head.shape)}")
    torch._check_value(sigmas >= 0 and rounding >= 0, lambda: f"sigmas and rounding must be >= 0, got {sigmas}, {rounding}")
    for name, t in (("error_scales", error_scales), ("h", h), ("step", step), ("head", head)):
        torch._check_value(t.device == scores.device, lambda: f"{name} is on {t.device} but scores is on {scores.device}")


@torch.library.register_fake("torchaq::tail_bounds_")
def _tail_bounds_fake(scores, error_scales, h, sigmas: float, step, rounding: float, head) -> Tensor:
    check_tail_bounds_args(scores, error_scales, h, sigmas, step, rounding, head)
    return scores.new_empty((scores.shape[0],))


@torch.library.impl(LIB, "tail_bounds_", "CompositeExplicitAutograd")
def tail_bounds_reference(scores: Tensor, error_scales: Tensor, h: Tensor, sigmas: float, step: Tensor,
                          rounding: float, head: Tensor) -> Tensor:
    check_tail_bounds_args(scores, error_scales, h, sigmas, step, rounding, head)
    B, N = scores.shape
    if B == 0:
        return scores.new_empty((0,))
    a = (h.double().norm(dim=1).float() * sigmas).unsqueeze(1)
    scores.addcmul_(a, error_scales.float().unsqueeze(0)).add_((rounding * step).unsqueeze(1))
    if head.numel() and not bool(((head >= 0) & (head < N)).all()):
        raise ValueError(f"head must hold class ids in [0, N={N})")
    scores.scatter_(1, head, -torch.inf)
    return scores.amax(dim=1) if N else scores.new_full((B,), -torch.inf)


def tail_bounds_(scores: Tensor, error_scales: Tensor, h: Tensor, sigmas: float, step: Tensor, rounding: float,
                 head: Tensor) -> Tensor:
    """The bounds written over the scores ``(B, N)``; returns each row's largest (module docstring)."""
    return torch.ops.torchaq.tail_bounds_(scores, error_scales, h, float(sigmas), step, float(rounding), head)
