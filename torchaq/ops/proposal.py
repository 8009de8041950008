"""``torch.ops.torchaq.proposal_weights_``: the full-vocabulary sampler's proposal as block weights, in place.

``proposal_weights_(weights (B, W) float32, num_tail, logits (B, H), floor (B,), top (B,), temperature,
block) -> cum (B, W / block) float64``: on entry the first ``N = num_tail`` columns of each row of
``weights`` hold the bounds ``u_i`` of the tail classes (``-inf`` for classes that are not
proposed); on return the row holds the unnormalised proposal ``exp((u_i - top) / T)`` on those
``N`` tail classes, zero-padded to a multiple of ``block`` (the *span*), then ``exp((l_j - top) / T)``
on the ``H`` exact head logits, then zeros up to ``W`` (a multiple of ``block``, at least the span
plus ``H``). Every weight whose bound or logit is below the row's ``floor`` is 0. ``cum`` holds the
float64 cumulative sums of the float32 block sums, the input of :func:`torchaq.ops.inverse_cdf` and
:func:`torchaq.ops.reject_rounds` (with ``weights.view(B, -1, block)``). ``top`` (the row's largest
exponent, chosen by the caller so that no weight overflows) cancels in the normalisation.

The weights overwrite the bounds so that the sampler holds one ``(B, W)`` buffer, not two: the
LUT scan writes its scores into it (:func:`torchaq.ops.lut_score_quantized` with ``columns=W``),
the bounds are formed over the scores, and the weights over the bounds; :func:`torchaq.ops.reject_rounds`
then reads each tail class's bound back as ``top + T log w_i``.

Cost: ``O(W)`` per row, one ``exp`` per class. The C++ kernel does it in one pass per row with the
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
    """The narrowest ``W``: the tail and the head, each zero-padded to a multiple of ``block``."""
    return num_tail + (-num_tail % block) + num_head + (-num_head % block)


def check_proposal_args(weights: Tensor, num_tail: int, logits: Tensor, floor: Tensor, top: Tensor,
                        temperature: float, block: int) -> None:
    """Validate ``proposal_weights_``'s arguments (errors name the argument)."""
    torch._check_value(block >= 1, lambda: f"block must be >= 1, got {block}")
    torch._check_value(weights.dim() == 2 and weights.dtype == torch.float32 and weights.is_contiguous(),
                       lambda: f"weights must be a contiguous float32 (B, W) tensor, got {weights.dtype} "
                               f"{tuple(weights.shape)}")
    B = weights.shape[0]
    torch._check_value(logits.dim() == 2 and logits.shape[0] == B and logits.dtype == torch.float32,
                       lambda: f"logits must be a float32 ({B}, H) tensor, got {logits.dtype} {tuple(logits.shape)}")
    need = num_tail + (-num_tail % block) + logits.shape[1]
    torch._check_value(num_tail >= 0 and weights.shape[1] % block == 0 and weights.shape[1] >= need,
                       lambda: f"weights must have a multiple of block={block} columns, at least {need} for "
                               f"num_tail={num_tail} and {logits.shape[1]} head logits, got {weights.shape[1]}")
    for name, t in (("floor", floor), ("top", top)):
        torch._check_value(tuple(t.shape) == (B,) and t.dtype == torch.float32,
                           lambda: f"{name} must be a float32 ({B},) tensor, got {t.dtype} {tuple(t.shape)}")
    torch._check_value(0 < temperature < math.inf, lambda: f"temperature must be a finite number > 0, got {temperature}")


@torch.library.register_fake("torchaq::proposal_weights_")
def _proposal_weights_fake(weights, num_tail: int, logits, floor, top, temperature: float, block: int) -> Tensor:
    check_proposal_args(weights, num_tail, logits, floor, top, temperature, block)
    return weights.new_empty((weights.shape[0], weights.shape[1] // block), dtype=torch.float64)


@torch.library.impl(LIB, "proposal_weights_", "CompositeExplicitAutograd")
def proposal_weights_reference(weights: Tensor, num_tail: int, logits: Tensor, floor: Tensor, top: Tensor,
                               temperature: float, block: int) -> Tensor:
    check_proposal_args(weights, num_tail, logits, floor, top, temperature, block)
    t = temperature
    num_head = logits.shape[1]
    span = num_tail + (-num_tail % block)
    top, floor = top.unsqueeze(1), floor.unsqueeze(1)
    tail = weights[:, :num_tail]
    below = tail < floor
    tail.sub_(top)
    if t != 1.0:
        tail.div_(t)
    tail.exp_().masked_fill_(below, 0.0)
    weights[:, num_tail:span] = 0.0
    head = weights[:, span:span + num_head]
    torch.exp((logits - top) / t, out=head)
    head.masked_fill_(logits < floor, 0.0)
    weights[:, span + num_head:] = 0.0
    return weights.view(weights.shape[0], -1, block).sum(dim=2).cumsum(dim=1, dtype=torch.float64)


def proposal_weights_(weights: Tensor, num_tail: int, logits: Tensor, floor: Tensor, top: Tensor, temperature: float,
                      block: int) -> Tensor:
    """The proposal written over the bounds in ``weights`` ``(B, W)``; returns ``cum`` ``(B, W / block)``
    (module docstring)."""
    return torch.ops.torchaq.proposal_weights_(weights, num_tail, logits, floor, top, float(temperature), block)


def proposal_weights(upper: Tensor, logits: Tensor, floor: Tensor, top: Tensor, temperature: float,
                     block: int) -> Tuple[Tensor, Tensor]:
    """``(weights (B, nb, block), cum (B, nb))`` of bounds ``upper`` ``(B, N)`` kept intact: a fresh
    buffer of the narrowest width, filled by :func:`proposal_weights_`."""
    width = proposal_width(upper.shape[1], logits.shape[1], block)
    weights = upper.new_empty((upper.shape[0], width))
    weights[:, :upper.shape[1]] = upper
    cum = proposal_weights_(weights, upper.shape[1], logits, floor, top, temperature, block)
    return weights.view(upper.shape[0], -1, block), cum
