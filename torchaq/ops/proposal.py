"""``torch.ops.torchaq.proposal_weights``: the full-vocabulary sampler's proposal as block weights.

``proposal_weights(upper (B, N), logits (B, H), floor (B,), top (B,), temperature, block)
-> (weights (B, nb, block) float32, cum (B, nb) float64)``: per row, the unnormalised proposal
``exp((u_i - top) / T)`` on the ``N`` tail classes (``u`` their logit bounds, ``-inf`` for classes
that are not proposed) and ``exp((l_j - top) / T)`` on the ``H`` exact head logits, each set to 0
below the row's ``floor``, laid out tail first, zero-padded to a multiple of ``block``, then the head,
zero-padded; ``cum`` the float64 cumulative sums of the float32 block sums, the input of
:func:`torchaq.ops.inverse_cdf` and :func:`torchaq.ops.reject_rounds`. ``top`` (the row's largest
exponent, chosen by the caller so that no weight overflows) cancels in the normalisation.

Cost: ``O(N + H)`` per row, one ``exp`` each. The C++ kernel does it in one pass per row with the
vectorised ``exp`` of the fused cross-entropy (~1 ulp, as torch's), so its weights equal the
reference's to float32 rounding, not bitwise, and so do the block sums (another summation order).
"""
from __future__ import annotations

import math
from typing import Tuple

import torch
from torch import Tensor

from torchaq.ops.schemas import LIB


def proposal_width(num_tail: int, num_head: int, block: int) -> int:
    """Weights per row: the tail and the head, each zero-padded to a multiple of ``block``."""
    return num_tail + (-num_tail % block) + num_head + (-num_head % block)


def check_proposal_args(upper: Tensor, logits: Tensor, floor: Tensor, top: Tensor, temperature: float, block: int) -> None:
    """Validate ``proposal_weights``'s arguments (errors name the argument)."""
    torch._check_value(upper.dim() == 2 and upper.dtype == torch.float32,
                       lambda: f"upper must be a float32 (B, N) tensor, got {upper.dtype} {tuple(upper.shape)}")
    B = upper.shape[0]
    torch._check_value(logits.dim() == 2 and logits.shape[0] == B and logits.dtype == torch.float32,
                       lambda: f"logits must be a float32 ({B}, H) tensor, got {logits.dtype} {tuple(logits.shape)}")
    for name, t in (("floor", floor), ("top", top)):
        torch._check_value(tuple(t.shape) == (B,) and t.dtype == torch.float32,
                           lambda: f"{name} must be a float32 ({B},) tensor, got {t.dtype} {tuple(t.shape)}")
    torch._check_value(0 < temperature < math.inf, lambda: f"temperature must be a finite number > 0, got {temperature}")
    torch._check_value(block >= 1, lambda: f"block must be >= 1, got {block}")


@torch.library.register_fake("torchaq::proposal_weights")
def _proposal_weights_fake(upper, logits, floor, top, temperature: float, block: int) -> Tuple[Tensor, Tensor]:
    check_proposal_args(upper, logits, floor, top, temperature, block)
    nb = proposal_width(upper.shape[1], logits.shape[1], block) // block
    return upper.new_empty((upper.shape[0], nb, block)), upper.new_empty((upper.shape[0], nb), dtype=torch.float64)


@torch.library.impl(LIB, "proposal_weights", "CompositeExplicitAutograd")
def proposal_weights_reference(upper: Tensor, logits: Tensor, floor: Tensor, top: Tensor, temperature: float,
                               block: int) -> Tuple[Tensor, Tensor]:
    check_proposal_args(upper, logits, floor, top, temperature, block)
    t = temperature
    num_head, num = logits.shape[1], upper.shape[1]
    span = num + (-num % block)
    top = top.unsqueeze(1)
    weights = upper.new_zeros((upper.shape[0], proposal_width(num, num_head, block)))
    tail = weights[:, :num]
    torch.sub(upper, top, out=tail)
    if t != 1.0:
        tail.div_(t)
    tail.exp_()
    torch.exp((logits - top) / t, out=weights[:, span:span + num_head])
    weights[:, span:span + num_head].masked_fill_(logits < floor.unsqueeze(1), 0.0)
    tail.masked_fill_(upper < floor.unsqueeze(1), 0.0)
    weights = weights.view(weights.shape[0], -1, block)
    return weights, weights.sum(dim=2).cumsum(dim=1, dtype=torch.float64)


def proposal_weights(upper: Tensor, logits: Tensor, floor: Tensor, top: Tensor, temperature: float,
                     block: int) -> Tuple[Tensor, Tensor]:
    """``(weights (B, nb, block), cum (B, nb))``: the proposal's block weights (module docstring)."""
    return torch.ops.torchaq.proposal_weights(upper, logits, floor, top, float(temperature), block)
