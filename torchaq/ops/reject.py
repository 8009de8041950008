"""``torch.ops.torchaq.reject_rounds``: the rejection rounds of the full-vocabulary sampler.

Inputs: a *plan* per row ``r`` (:mod:`torchaq.layer.exact_sampling`): the exact head ``logits[r]`` /
``classes[r]`` ``(R, H)``, a truncation ``floor[r]``, and the proposal ``q_i ∝ exp((u_i - top_r) / T)``
on the ``N = num_tail`` tail classes (``u_i`` their logit bounds) and ``exp((l_j - top_r) / T)`` on
the head, as block weights ``weights[r]`` ``(R, nb, m)`` laid out tail first (``N`` classes,
zero-padded to a multiple of ``m``), then the head (zero-padded), with cumulative block sums
``cum[r]`` (:func:`torchaq.ops.proposal_weights_`, :func:`torchaq.ops.inverse_cdf`). The bounds
themselves are not an input: the weights overwrote them, and a tail class's ``(l_i - u_i) / T`` is
read back as ``(l_i - top_r) / T - log w_i`` (the ``log`` in float64). Then, for each draw ``p`` on
row ``rows[p]`` with key ``keys[p]`` (:func:`torchaq.ops.counter_rng.row_keys` of its seed):

round ``k = 0 .. rounds - 1`` draws ``n = proposals * 2**k`` proposals ``i`` from ``q``
(uniforms of stream ``2k + 1``); a head proposal is kept; a tail proposal is scored exactly,
``l_i = <h, W_i> + b_i``, and kept if ``l_i >= floor`` and ``log v < (l_i - u_i) / T`` (``v`` a
uniform of stream ``2k + 2``; always, with ``lut_tail``); a tail position of weight 0 (padding) is
never kept. The draw's token is the first kept proposal of the first round that keeps one. Because
every number is a function of the draw's key, stream and index alone, a draw is the same in any batch.

Returns ``(done, tokens, logits, violations)`` ``(P,)``: whether a round kept a proposal (the
caller draws the others from exact logits), the token and its exact logit, and the number of
proposals in the rounds tried whose exact logit exceeded its bound (``l_i > u_i``: a failure of the
bound, counted for the benchmarks). The reference evaluates a round's ``n`` proposals as tensors;
the C++ kernel evaluates the same proposals draw by draw (the dot products of
:func:`torchaq.ops.rescore_topk`, so a token's logit may differ from the reference's in the last bits).
Cost: ``O(n (log nb + m + d))`` per draw and round.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from torchaq.ops.counter_rng import key_uniforms
from torchaq.ops.inverse_cdf import inverse_cdf
from torchaq.ops.rescore import row_logits
from torchaq.ops.schemas import LIB

ROUND_PROPOSALS = 16384  # proposals the reference evaluates at once (bounds its (draws, n, m) gather)


def check_reject_args(h, weight, bias, logits, classes, num_tail, top, floor, weights, cum, rows, keys, temperature,
                      proposals, rounds) -> None:
    """Validate ``reject_rounds``'s arguments (errors name the argument)."""
    R = h.shape[0]
    torch._check_value(h.dim() == 2 and h.dtype == torch.float32, lambda: f"h must be a float32 (R, d) tensor, got {h.dtype} {tuple(h.shape)}")
    torch._check_value(weight.dim() == 2 and weight.shape[1] == h.shape[1],
                       lambda: f"weight must be (V, {h.shape[1]}), got {tuple(weight.shape)}")
    torch._check_value(bias is None or tuple(bias.shape) == (weight.shape[0],), lambda: "bias must be (V,)")
    torch._check_value(logits.dim() == 2 and logits.shape[0] == R and logits.dtype == torch.float32 and logits.shape[1] > 0,
                       lambda: f"logits must be a float32 (R, H) tensor with H >= 1, got {tuple(logits.shape)}")
    torch._check_value(tuple(classes.shape) == tuple(logits.shape) and classes.dtype == torch.int64,
                       lambda: f"classes must be an int64 {tuple(logits.shape)} tensor")
    torch._check_value(0 <= num_tail <= weight.shape[0], lambda: f"num_tail must be in [0, V={weight.shape[0]}], got {num_tail}")
    torch._check_value(tuple(top.shape) == (R,) and top.dtype == torch.float32, lambda: "top must be a float32 (R,) tensor")
    torch._check_value(tuple(floor.shape) == (R,) and floor.dtype == torch.float32, lambda: "floor must be a float32 (R,) tensor")
    m = weights.shape[2] if weights.dim() == 3 else 1
    span = num_tail + (-num_tail % m)
    torch._check_value(weights.dim() == 3 and weights.shape[0] == R and weights.dtype == torch.float32
                       and weights.shape[1] * m >= span + logits.shape[1],
                       lambda: f"weights must be a float32 (R, nb, m) tensor holding the tail and the head, got {tuple(weights.shape)}")
    torch._check_value(tuple(cum.shape) == tuple(weights.shape[:2]) and cum.dtype == torch.float64,
                       lambda: "cum must be a float64 (R, nb) tensor")
    torch._check_value(rows.dim() == 1 and rows.dtype == torch.int64, lambda: "rows must be an int64 (P,) tensor")
    torch._check_value(tuple(keys.shape) == tuple(rows.shape) and keys.dtype == torch.int64,
                       lambda: "keys must be an int64 tensor shaped like rows")
    torch._check_value(temperature > 0, lambda: f"temperature must be > 0, got {temperature}")
    torch._check_value(proposals >= 1 and 0 <= rounds <= 30, lambda: "proposals must be >= 1 and rounds in [0, 30]")


@torch.library.register_fake("torchaq::reject_rounds")
def _reject_rounds_fake(h, weight, bias, logits, classes, num_tail: int, top, floor, weights, cum, rows, keys,
                        temperature: float, proposals: int, rounds: int, lut_tail: bool):
    check_reject_args(h, weight, bias, logits, classes, num_tail, top, floor, weights, cum, rows, keys, temperature,
                      proposals, rounds)
    p = rows.shape[0]
    return (rows.new_empty((p,), dtype=torch.bool), rows.new_empty((p,)), h.new_empty((p,)), rows.new_empty((p,)))


def _round(h, weight, bias, logits, classes, num_tail, top, floor, weights, cum, rows, keys, rnd: int, n: int,
           temperature: float, lut_tail: bool):
    """One round of ``n`` proposals for draws on ``rows`` ``(P,)``: ``(done, tokens, logits, violations)``."""
    t = temperature
    num_head, m = logits.shape[1], weights.shape[2]
    span = num_tail + (-num_tail % m)  # where the head starts (tail first)
    r = rows.unsqueeze(1)
    pos = inverse_cdf(weights, cum, rows, key_uniforms(keys, 2 * rnd + 1, n))
    in_head = pos >= span
    hpos = (pos - span).clamp(min=0, max=num_head - 1)
    cls = torch.where(in_head, classes[r, hpos], pos.clamp(max=max(num_tail - 1, 0)))
    exact = logits[r, hpos].clone()
    drawn, slot = (~in_head).nonzero(as_tuple=True)  # re-score the tail draws only, one dot each
    if drawn.numel():
        exact[drawn, slot] = row_logits(h[rows[drawn]], weight, bias, cls[drawn, slot].unsqueeze(1))[:, 0]
    w = weights.reshape(weights.shape[0], -1)[r, pos.clamp(max=max(span - 1, 0))]
    proposed = in_head | (w > 0)
    excess = torch.where(in_head, 0.0, ((exact - top[r]) / t).double() - w.double().log())
    accept = in_head | (proposed & (exact >= floor[r])
                        & (lut_tail | (key_uniforms(keys, 2 * rnd + 2, n).log() < excess)))
    first = accept.to(torch.int8).argmax(dim=1, keepdim=True)
    return (accept.any(dim=1), cls.gather(1, first).squeeze(1), exact.gather(1, first).squeeze(1),
            (proposed & (excess > 0)).sum(dim=1))


@torch.library.impl(LIB, "reject_rounds", "CompositeExplicitAutograd")
def reject_rounds_reference(h: Tensor, weight: Tensor, bias: Optional[Tensor], logits: Tensor, classes: Tensor,
                            num_tail: int, top: Tensor, floor: Tensor, weights: Tensor, cum: Tensor, rows: Tensor,
                            keys: Tensor, temperature: float, proposals: int, rounds: int,
                            lut_tail: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    check_reject_args(h, weight, bias, logits, classes, num_tail, top, floor, weights, cum, rows, keys, temperature,
                      proposals, rounds)
    count = rows.shape[0]
    done = torch.zeros(count, dtype=torch.bool, device=rows.device)
    tokens = torch.zeros(count, dtype=torch.int64, device=rows.device)
    values = torch.zeros(count, dtype=torch.float32, device=rows.device)
    violations = torch.zeros(count, dtype=torch.int64, device=rows.device)
    pending = torch.arange(count, device=rows.device)
    for rnd in range(rounds):
        if pending.numel() == 0:
            break
        n = proposals << rnd
        left = []
        for part in pending.split(max(1, ROUND_PROPOSALS // n)):
            ok, tok, val, viol = _round(h, weight, bias, logits, classes, num_tail, top, floor, weights, cum, rows[part],
                                        keys[part], rnd, n, temperature, lut_tail)
            done[part[ok]], tokens[part[ok]], values[part[ok]] = True, tok[ok], val[ok]
            violations[part] += viol
            left.append(part[~ok])
        pending = torch.cat(left)
    return done, tokens, values, violations


def reject_rounds(h, weight, bias, logits, classes, num_tail: int, top, floor, weights, cum, rows, keys,
                  temperature: float, proposals: int, rounds: int, lut_tail: bool = False):
    """``(done, tokens, logits, violations)`` ``(P,)`` of the rejection rounds (module docstring)."""
    return torch.ops.torchaq.reject_rounds(h, weight, bias, logits, classes, num_tail, top, floor, weights, cum, rows,
                                           keys, float(temperature), proposals, rounds, lut_tail)
