"""Sampling from the whole vocabulary: the full softmax's distribution without the ``(B, V)`` logits.

:meth:`torchaq.QuantizedSoftmax.sample` draws from ``softmax(l / T)``, ``l = h @ W.T + b`` over all
``V`` classes, after the truncations asked for (Hugging Face's order: ``top_k``, then ``top_p``,
then ``min_p``). The method, chosen on measurements (``benchmarks/sampling.py``; DESIGN.md s. 11):

**Rejection from a bounded LUT proposal with an exact head.** One LUT pass gives every class's
score ``s_i`` from the uint8 LUT of the 4-bit scans (:func:`torchaq.ops.lut_score_quantized`: byte
look-ups instead of float gathers, within ``M step / 2`` of the float sum); the best ``C`` of those
scores plus the side list (the *head*) are re-scored exactly. Each other class gets an
upper bound of its logit ``u_i = s_i + z (|h| rho_i + step sqrt(M / 12))`` (``rho_i`` the scale of
class ``i``'s LUT error ``<h, r_i>``, ``r_i = W_i - decode(code_i)``: the layer's ``error_scales``,
:mod:`torchaq.layer.error_model`; the second term is the rounding of ``M`` uint8 entries,
:func:`rounding_factor`). The proposal is ``q_i ∝ exp(l_i / T)`` on the
head and ``exp(u_i / T)`` on the rest; a drawn head class is kept, a drawn tail class is re-scored exactly and kept with
probability ``exp((l_i - u_i) / T)``. Whenever ``l_i <= u_i`` holds this is textbook rejection
sampling: the kept draw has *exactly* the target distribution. Round ``r`` tries
``PROPOSALS * 2**r`` draws per row (the first kept one wins, as in sequential rejection), so it
costs at most that many times ``d`` multiply-adds; rows with nothing kept after ``MAX_ROUNDS``
rounds are drawn from their exact logits (one pass over ``W``), so no row is ever cut short.

**Guarantee.** The Cauchy-Schwarz bound ``|l_i - s_i| <= |h| |r_i|`` always holds but is about
``sqrt(d) / z`` times too loose (a residual is nearly orthogonal to a query), which would make
acceptance negligible at LM-like entropy. The bound used is ``z = ERROR_SIGMAS`` standard
deviations of the error model of :mod:`torchaq.layer.error_model`: ``(l_i - s_i) / (|h| rho_i)``
is taken as ``N(0, 1)``, so the bound fails for a given (row, class) with probability
``P(N(0, 1) > z) ~= 1.0e-6``. ``benchmarks/sampling.py`` (MiniLM, real states) and
``benchmarks/sampling_llm.py`` (Gemma- and Llama-3-shaped heads) measure its quantiles and count
the bound's failures on quantized scores. The rounding term models the ``M`` rounding errors as
independent (each uniform within half a step) and adds its ``z`` standard deviations (never more
than the worst case ``M step / 2``); it is a small part of the bound, and the benchmark counts how
often the whole bound fails on quantized scores. Where it fails, that class alone is drawn with
probability ``exp((u_i - l_i) / T) < 1`` times its own: the total-variation error is at most the
mass of the violating classes (in expectation ``<= 1e-6`` of the tail mass). It is exact, not
bounded, for every class of the head and for every draw under ``top_k`` (below). ``benchmarks/sampling.py``
counts the detected violations (a drawn class whose exact logit exceeds its bound).

**Truncations.** ``top_k``: the exact top-``k`` over all ``V`` (the head, completed with every
class whose bound reaches the ``k``-th exact logit, re-scored exactly), then a categorical draw
among those ``k``. ``min_p``: a floor ``l >= l_max + T log(min_p)`` on the exact top-1 (completed the
same way), applied inside the rejection step. ``top_p``: the nucleus is the best classes until
their mass reaches ``top_p`` times the *full* partition function ``Z``. The head is first completed
to the exact top-1 (every class whose bound reaches the best exact logit, re-scored), so that the
masses are measured from the exact maximum and none underflows at small temperatures. One exact
pass over ``W`` (:func:`torchaq.ops.mass_histogram`) gives every class's mass in bins of
``NUCLEUS_BIN_WIDTH`` in ``l / T``, hence ``Z`` and the mass curve to one bin; every class whose
bound reaches the crossing bin is then re-scored exactly (at most ``NUCLEUS_COMPLETE``). Where the
crossing class and all classes above it are exactly scored, the floor is its exact logit: the
nucleus is Hugging Face's, and so are the truncated log-probabilities. Where more classes than that share the nucleus (a flat
row), the floor is placed inside the crossing bin as if its mass were spread evenly: the nucleus
then differs from the exact one only by classes within one bin of its floor (measured by
``benchmarks/sampling.py``). The nucleus always keeps the best class. ``top_p`` therefore costs one
pass over ``W``, like a dense layer, without the dense layer's sort of every row's ``V`` logits.

**Batch invariance.** Every random number is :func:`torchaq.ops.counter_rng.uniforms` of the
row's seed (``seeds=`` or, with ``generator``, one int64 per row drawn from it), and every step is
row-wise (LUT, scan, exact logits, the proposal :func:`torchaq.ops.proposal_weights_`, the rounds
:func:`torchaq.ops.reject_rounds`, per-row sums), so with ``seeds`` a row gets the same token alone
or in any batch. Cost per row: one uint8-LUT pass ``O(V M)`` (its scores also give the head,
:func:`torchaq.ops.row_topk`, without a second scan), a few ``O(V)`` passes (bound, ``exp``, block
sums), ``(C + S) d`` for the head and at most ``PROPOSALS 2**r d`` in round ``r``; with ``top_p``,
and again with ``return_logprobs``, one exact pass over ``W`` (``V d``:
:mod:`torchaq.layer.logprobs`). Memory per row: one buffer of ``V`` floats plus the head's room
(``BLOCK``-padded): the scan writes the scores into it, the bounds are formed over the scores and
the proposal weights over the bounds (the rounds read a bound back as ``top + T log w``), so a row
holds fewer bytes than a dense layer's logits and probabilities; rows go ``SAMPLE_ROWS`` at a time.

**One op without truncation.** For PQ layers, ``sample`` without ``top_k``, ``top_p`` or ``min_p``
runs those steps as one :func:`torchaq.ops.layer_sample` call per chunk (at batch 1 the dispatches
and the Python between the steps cost more than the scan). Its rows finish on the steps below where
it leaves them (a bound far above the best exact logit, or no round kept a proposal); the steps reach
the same plan, so a row's token does not depend on which path drew it.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from torchaq import ops
from torchaq.checks import check_int
from torchaq.ops.counter_rng import key_uniforms, row_keys
from torchaq.layer.exact import row_chunks, topk as exact_topk
from torchaq.layer.logprobs import row_log_partition
from torchaq.layer.sampling import check_full_sampling_args, row_seeds
from torchaq.layer.side_list import count_at_least
from torchaq.layer.staleness import version_of
from torchaq.layer.tail_bound import (  # noqa: F401 (re-exported: the bound is part of this sampler)
    DEFAULT_HEAD, ERROR_SIGMAS, check_finite_norms, head_scores, head_width, rounding_factor, tail_bounds)
from torchaq.quantizers.pq import AnisotropicPQ

PROPOSALS = 32         # proposals per row in the first rejection round, doubling every round
MAX_ROUNDS = 6         # (2,016 proposals in all) then the row is drawn from its exact logits
NUCLEUS_BIN_WIDTH = 0.004  # top_p: bins of the exact mass curve, in units of l / T (the floor's resolution
NUCLEUS_BINS = 4096        # where the nucleus reaches past the exactly scored classes), 16.4 below the top
NUCLEUS_COMPLETE = 2048  # most tail classes re-scored per row to place the top_p floor among exact logits
TOP1_ROOM = 256        # top_p: head room kept for the classes re-scored to find the exact top-1 (more: a wider copy)
WEIGHT_RANGE = 60.0    # proposal weights are exp(x / T) with x <= WEIGHT_RANGE T above the reference
BLOCK = 256            # classes per block of the two-level inverse CDF (:func:`torchaq.ops.inverse_cdf`)
SAMPLE_ROWS = 32       # rows sampled at once (bounds the (rows, V) temporaries)


class SampleOutput(NamedTuple):
    """``sample(..., return_logprobs=True)``: tokens and their exact log-probabilities.

    ``logprobs`` is ``log softmax(l / T)[token]`` over all ``V`` classes, ``truncated_logprobs`` the
    log-probability under the truncated distribution the token was drawn from (equal without truncation).
    """

    tokens: Tensor
    logprobs: Tensor
    truncated_logprobs: Tensor


def _complete(layer, flat, logits, classes, upper, floor, limit: Optional[int] = None):
    """Merge into the head every tail class whose bound reaches ``floor`` ``(B,)``, re-scored exactly;
    returns the merged ``(logits, classes)`` best first (ties by class id) and ``upper`` with them at -inf.
    ``limit`` caps the classes merged per row (those with the highest bounds)."""
    most = int(count_at_least(upper, floor.unsqueeze(1)).max()) if upper.numel() else 0
    most = most if limit is None else min(most, limit)
    if most == 0:
        return logits, classes, upper
    ub, extra = ops.row_topk(upper, most)
    bias = None if layer.bias is None else layer.bias.detach()
    # exact logits of the merged classes (best first): the padding of narrower rows scores -inf
    extra_logits, merged = torch.ops.torchaq.rescore_topk.default(flat.float(), layer.weight.detach(), bias, extra, most)
    extra_logits.masked_fill_(upper.gather(1, merged) < floor.unsqueeze(1), -math.inf)
    # only the classes merged leave the tail (the others were padding of this batch's widest row);
    # in place (our own buffer), and before the sort so that these temporaries are gone by then
    upper.scatter_(1, extra, ub.masked_fill_(ub >= floor.unsqueeze(1), -math.inf))
    del ub, extra
    # class order, then a stable sort by logit: ties by class id (int32 ids: half the bytes of the sorts)
    logits, classes = torch.cat([logits, extra_logits], 1), torch.cat([classes.int(), merged.int()], 1)
    del extra_logits, merged
    classes, order = classes.sort(dim=1, stable=True)
    logits = logits.gather(1, order)
    del order
    order = logits.argsort(dim=1, descending=True, stable=True)
    logits = logits.gather(1, order)
    classes = classes.gather(1, order)
    del order
    return logits, classes.long(), upper


def _nucleus_floor(logits: Tensor, upper: Tensor, cum: Tensor, top: Tensor, top_p: float, t: float) -> Tensor:
    """The ``top_p`` floor ``(B,)`` (module docstring). ``cum`` ``(B, NUCLEUS_BINS)``: the running sums of
    the exact masses ``exp((l - top) / T)`` of all classes in bins of ``(top - l) / T``
    (:func:`torchaq.ops.mass_histogram`), so ``cum[:, -1]`` is the exact partition function over
    ``exp(top / T)``. The floor is the exact logit of the class whose strictly better mass is below
    ``top_p`` times it and whose own mass crosses it, if that class and every class above it are
    exactly scored (``logits``, best first, and no tail bound ``upper`` reaching it); else a point
    inside the bin in which the masses cross ``top_p``, placed as if that bin's mass were spread
    evenly over its width."""
    total = cum[:, -1:]
    # running sums of the head's exact masses, in place: the mass strictly better than class i is the
    # sum up to class i - 1 (and 0 before the first, always below top_p Z)
    run = (logits - top.unsqueeze(1)).div_(t).double().exp_().cumsum_(dim=1)
    last = (run[:, :-1] < top_p * total).sum(dim=1, keepdim=True)
    crossing = logits.gather(1, last).squeeze(1)
    exact_ok = (run[:, -1] >= top_p * total[:, 0]) & (upper.amax(dim=1) < crossing)
    del run
    k = (cum < top_p * total).sum(dim=1, keepdim=True).clamp_(max=cum.shape[1] - 1)
    # inside the crossing bin, the share of its mass still needed, as a share of its width (the mass
    # taken as spread evenly over the bin's logits): the kept mass is then top_p Z to within the
    # classes at the floor, not to within a whole bin
    below = torch.where(k > 0, cum.gather(1, (k - 1).clamp(min=0)), 0.0)
    share = ((top_p * total - below) / (cum.gather(1, k) - below).clamp(min=1e-300)).clamp_(0.0, 1.0)
    inside = top - ((k + share).squeeze(1) * (NUCLEUS_BIN_WIDTH * t)).float()
    return torch.where(exact_ok, crossing, inside)


def _search(cum: Tensor, rows: Tensor, u: Tensor) -> Tensor:
    """Inverse-CDF positions for uniforms ``u`` ``(P, n)`` of draws on ``rows`` ``(P,)`` of ``cum`` ``(R, L)``."""
    if cum.shape[0] == 1:  # one row, many draws: one sorted sequence, no (P, L) gather
        c = cum[0]
        pos = torch.searchsorted(c, (u * c[-1]).contiguous(), right=True)
    else:
        c = cum[rows]
        pos = torch.searchsorted(c, (u * c[:, -1:]).contiguous(), right=True)
    return pos.clamp_(max=cum.shape[1] - 1)


def _categorical_cum(logits: Tensor, floor: Tensor, temperature: float) -> Tensor:
    """Cumulative float64 weights of ``softmax(logits / T)`` restricted to ``logits >= floor``."""
    w = ((logits - logits[:, :1]) / temperature).double().exp().masked_fill(logits < floor.unsqueeze(1), 0.0)
    return w.cumsum(dim=1)


def _check_overflow(values: Tensor, temperature: float) -> None:
    """``values / T`` (``-inf`` allowed: rows with no tail) must stay below float32's overflow."""
    if not bool((values / temperature < math.inf).all()):  # (false for +inf and nan)
        raise ValueError(f"temperature={temperature!r} is so small that logits / temperature overflow float32")


def _exact_rows(layer, flat: Tensor, floor: Tensor, temperature: float, u: Tensor):
    """Fallback: draw from exact logits (one pass over ``W`` per draw); ``(classes, logits)`` ``(P,)``."""
    bias = None if layer.bias is None else layer.bias.detach()
    w = layer.weight.detach().float()
    classes, values = [], []
    for r in range(flat.shape[0]):
        logits = torch.mv(w, flat[r].float().clone())
        if bias is not None:
            logits = logits + bias.float()
        cum = _categorical_cum(logits.unsqueeze(0), floor[r:r + 1], temperature)
        pos = _search(cum, torch.zeros(1, dtype=torch.int64), u[r:r + 1])[0]
        classes.append(pos)
        values.append(logits[pos])
    return torch.cat(classes), torch.cat(values)


class _Plan(NamedTuple):
    """What the draws of each row read: the exact head, the floor, the proposal (over the tail bounds) and its CDF."""

    flat: Tensor
    logits: Tensor
    classes: Tensor
    floor: Tensor
    cum: Tensor  # categorical (top_k): (B, k) cumulative weights; else (B, L / BLOCK) cumulative block sums
    weights: Optional[Tensor] = None  # else: (B, L / BLOCK, BLOCK) float32 proposal weights, tail first
    top: Optional[Tensor] = None  # else: (B,) the weights' reference exponent (:func:`torchaq.ops.proposal_weights_`)


def _reject(layer, plan: _Plan, rows: Tensor, keys: Tensor, temperature: float, lut_tail: bool = False):
    """Rejection sampling (module docstring) for draws on ``rows`` ``(P,)`` with keys ``(P,)`` (:func:`row_keys` of the seeds):
    ``(tokens, token logits, detected bound violations)`` ``(P,)``. ``lut_tail=True`` keeps every tail
    draw (the "exact head + LUT tail" method, measured for comparison: biased by the LUT error).

    Round ``r`` tries ``PROPOSALS * 2**r`` proposals per draw (:func:`torchaq.ops.reject_rounds`): a
    draw whose acceptance rate is low finishes in a few rounds instead of paying a round's fixed cost
    many times. The schedule depends on the round alone, never on how many draws are pending, so a
    draw is the same in any batch. Draws with nothing kept after ``MAX_ROUNDS`` rounds are drawn from
    their exact logits."""
    bias = None if layer.bias is None else layer.bias.detach()
    done, tokens, values, violations = ops.reject_rounds(
        plan.flat.float(), layer.weight.detach(), bias, plan.logits, plan.classes, layer.num_classes, plan.top,
        plan.floor, plan.weights, plan.cum, rows, keys, temperature, PROPOSALS, MAX_ROUNDS, lut_tail)
    pending = (~done).nonzero().squeeze(1)
    if pending.numel():
        p_rows = rows[pending]
        tok, val = _exact_rows(layer, plan.flat[p_rows], plan.floor[p_rows], temperature, key_uniforms(keys[pending], 0, 1))
        tokens[pending], values[pending] = tok, val
    return tokens, values, violations


def _draw(layer, plan: _Plan, rows: Tensor, keys: Tensor, temperature: float, lut_tail: bool = False):
    """``(tokens, token logits, violations)`` for draws on ``rows`` of ``plan`` with per-draw ``seeds``."""
    if plan.weights is None:
        pos = _search(plan.cum, rows, key_uniforms(keys, 0, 1)).squeeze(1)
        return plan.classes[rows, pos], plan.logits[rows, pos], torch.zeros_like(pos)
    return _reject(layer, plan, rows, keys, temperature, lut_tail)


def _categorical_plan(flat, logits, classes, top_p, min_p, t) -> _Plan:
    """The plan of rows whose every allowed class is in the exact head ``logits`` ``(B, H)`` (best first):
    ``top_p``'s nucleus and ``min_p``'s floor cut the head, the draw is categorical over it."""
    floor = torch.full_like(logits[:, 0], -math.inf)
    if top_p < 1:
        probs = ((logits - logits[:, :1]) / t).double().softmax(dim=1)
        keep = (probs.cumsum(dim=1) - probs) < top_p
        floor = logits.masked_fill(~keep, math.inf).min(dim=1).values
    if min_p is not None:
        floor = torch.maximum(floor, logits[:, 0] + t * math.log(min_p))
    return _Plan(flat, logits, classes, floor, _categorical_cum(logits, floor, t))


def _plan(layer, flat, top_k, top_p, min_p, temperature, candidates, sigmas: float = ERROR_SIGMAS) -> _Plan:
    """Head, bounds, truncation floor and proposal CDF of every row of ``flat`` (module docstring)."""
    t = temperature
    if layer.exact_reason is not None:  # no codes (a tiny table): the head is every class, scored exactly
        logits, classes = exact_topk(flat, layer.weight, layer.bias, top_k or layer.num_classes)
        _check_overflow(logits[:, :1], t)
        return _categorical_plan(flat, logits, classes, top_p, min_p, t)
    size, num = max(candidates or DEFAULT_HEAD, top_k or 1), layer.num_classes
    # one (B, W) buffer holds the scores, then the bounds over them, then the proposal weights over
    # those: W leaves room for the head the completions below may grow (else a wider copy is made)
    grown = head_width(layer, size) + (NUCLEUS_COMPLETE + TOP1_ROOM if top_p < 1 else 0) + (NUCLEUS_COMPLETE if min_p else 0)
    buf, logits, classes, step = head_scores(layer, flat, size, 0 if top_k else ops.proposal_width(num, grown, BLOCK))
    upper = tail_bounds(layer, flat, buf[:, :num], classes, sigmas, in_place=True, rounding=step)
    upper_max = upper.amax(dim=1)  # values only (max(dim) also finds the argmax)
    _check_overflow(torch.stack([logits[:, 0], upper_max]), t)
    floor = torch.full_like(logits[:, 0], -math.inf)
    if top_k is not None:
        logits, classes, upper = _complete(layer, flat, logits, classes, upper, logits[:, top_k - 1])
        return _categorical_plan(flat, logits[:, :top_k], classes[:, :top_k], top_p, min_p, t)
    if min_p is not None:
        logits, classes, upper = _complete(layer, flat, logits, classes, upper, logits[:, 0])
        upper_max = upper.amax(dim=1)
        floor = logits[:, 0] + t * math.log(min_p)
    if top_p < 1:
        # the exact top-1 first (every class whose bound reaches the best exact logit, re-scored): the
        # histogram's reference is then the exact maximum, so no mass underflows below it at any
        # temperature (a bound far above it would push every mass under the histogram's 2^-40 units)
        if min_p is None:  # (min_p has completed the head to it already)
            logits, classes, upper = _complete(layer, flat, logits, classes, upper, logits[:, 0], NUCLEUS_COMPLETE)
            upper_max = upper.amax(dim=1)
        # estimate the floor, re-score every class whose bound reaches it, estimate again: the nucleus
        # then ends among exactly scored classes unless more than NUCLEUS_COMPLETE of them qualified
        top = torch.maximum(logits[:, 0], upper_max)
        # running sums in place: one (B, NUCLEUS_BINS) buffer
        cum = ops.mass_histogram(flat, layer.weight, layer.bias, t, top, NUCLEUS_BIN_WIDTH, NUCLEUS_BINS).cumsum_(1)
        nucleus = _nucleus_floor(logits, upper, cum, top, top_p, t)
        logits, classes, upper = _complete(layer, flat, logits, classes, upper, torch.maximum(floor, nucleus),
                                           NUCLEUS_COMPLETE)
        # the nucleus keeps at least the best class (Hugging Face's min_tokens_to_keep = 1), also where
        # a row's completion was cut at NUCLEUS_COMPLETE and its reference is a bound above every logit
        floor = torch.maximum(floor, torch.minimum(_nucleus_floor(logits, upper, cum, top, top_p, t), logits[:, 0]))
        del cum  # not alive beside the proposal's weights
        upper_max = upper.amax(dim=1)
    # a bound far above the best exact logit (tiny temperature): re-score those classes, so that the
    # weights below neither all underflow nor overflow (per row: a row's head never depends on its batch)
    risky = upper_max - logits[:, 0] > WEIGHT_RANGE * t
    if bool(risky.any()):
        logits, classes, upper = _complete(layer, flat, logits, classes, upper,
                                           torch.where(risky, logits[:, 0], math.inf), NUCLEUS_COMPLETE)
        upper_max = upper.amax(dim=1)
    top = torch.maximum(logits[:, 0], upper_max - WEIGHT_RANGE * t)
    width = ops.proposal_width(num, logits.shape[1], BLOCK)
    if width > buf.shape[1]:  # the head outgrew the room left for it
        buf = ops.widen_scores(upper, width)
    del upper
    # the tail first, block-aligned: the layout never depends on the head's width
    cum = ops.proposal_weights_(buf, num, logits, floor, top, t, BLOCK)
    return _Plan(flat, logits, classes, floor, cum, buf.view(buf.shape[0], -1, BLOCK), top)


def _logprobs(layer, flat: Tensor, floor: Tensor, values: Tensor, temperature: float, head: Optional[Tensor] = None):
    """Exact ``(full, truncated)`` log-probabilities of the tokens drawn on the rows of ``flat`` (one each,
    with logits ``values``) truncated at ``floor``; ``head``: the exact logits of a ``top_k`` plan (its
    truncated partition function is the head's own)."""
    t = temperature
    if head is not None:
        kept = (head / t).masked_fill(head < floor.unsqueeze(1), -math.inf)
        log_z = torch.stack([row_log_partition(flat, layer.weight, layer.bias, t), torch.logsumexp(kept, 1)], 1)
    else:
        log_z = row_log_partition(flat, layer.weight, layer.bias, t, floor)
    return values / t - log_z[:, 0], values / t - log_z[:, 1]


def sample_many(layer, h: Tensor, seeds: Tensor, top_k=None, top_p=1.0, min_p=None, temperature=1.0,
                candidates: Optional[int] = None, chunk: int = 4096, sigmas: float = ERROR_SIGMAS,
                lut_tail: bool = False):
    """``len(seeds)`` draws for one row ``h`` ``(d,)``: the tokens ``sample(h.expand(n, d), seeds=seeds)``
    returns, with the row's head and bounds computed once (what ``benchmarks/sampling.py`` and the
    statistical tests use); also returns the number of detected bound violations. ``sigmas`` and
    ``lut_tail`` select the compared methods (:func:`tail_bounds`, :func:`_reject`)."""
    flat = layer.flat_features(h.reshape(1, -1))
    top_k, top_p, min_p, temperature = check_full_sampling_args(top_k, top_p, min_p, temperature, layer.num_classes)
    plan = _plan(layer, flat, top_k, top_p, min_p, temperature, candidates, sigmas)
    seeds = seeds.reshape(-1).to(device=flat.device, dtype=torch.int64)
    out, bad = [], 0
    for i in range(0, seeds.shape[0], chunk):
        s = seeds[i:i + chunk]
        tok, _, viol = _draw(layer, plan, torch.zeros_like(s), row_keys(s), temperature, lut_tail)
        out.append(tok)
        bad += int(viol.sum())
    return torch.cat(out), bad


def _one_op_args(layer, candidates: Optional[int]) -> Optional[Tuple[int, float]]:
    """``(head, rounding factor)`` of :func:`_one_op_chunk` for this layer, or None where the one-op path
    does not apply (an exactly scored table, AQ codes). Checks the error scales; cached with the
    layer's op inputs (:meth:`~torchaq.layer.fast_topk.FastTopk.one_op_memo`) per version of them."""
    memo = layer.one_op_memo()
    key = ("sample", candidates)
    hit = None if memo is None else memo.get(key)
    if hit is not None and version_of(hit[0]) == hit[1]:
        return hit[2]
    if layer.exact_reason is not None or not isinstance(layer.quantizer, AnisotropicPQ):
        return None
    norms = layer.error_scales
    check_finite_norms(norms, layer.side_rows)
    args = (head_width(layer, candidates or DEFAULT_HEAD),
            rounding_factor(layer.quantizer.num_subspaces, ERROR_SIGMAS, ERROR_SIGMAS >= math.sqrt(layer.dim)))
    if memo is not None:
        memo[key] = (norms, version_of(norms), args)
    return args


def _one_op_chunk(layer, flat: Tensor, seeds: Tensor, temperature: float, candidates: Optional[int],
                  args: Tuple[int, float]):
    """``(tokens, logits)`` of rows ``flat`` of a PQ layer without truncation: one ``torchaq::layer_sample``
    call (``args`` from :func:`_one_op_args`), then the steps below for the rows it leaves undone (they
    reach the same plan)."""
    tokens, values, done = layer.one_op_sample(flat, seeds, args[0], ERROR_SIGMAS, args[1], temperature, WEIGHT_RANGE,
                                               BLOCK, PROPOSALS, MAX_ROUNDS)
    if not bool(done if done.shape[0] == 1 else done.all()):
        with torch.no_grad():
            left = (~done).nonzero().squeeze(1)
            plan = _plan(layer, flat[left], None, 1.0, None, temperature, candidates)
            pos = torch.arange(left.numel(), device=flat.device)
            tokens[left], values[left], _ = _draw(layer, plan, pos, row_keys(seeds[left]), temperature)
    return tokens, values


def sample_full(layer, h: Tensor, top_k=None, top_p=1.0, min_p=None, temperature=1.0, generator=None, seeds=None,
                return_logprobs: bool = False, candidates: Optional[int] = None):
    """:meth:`torchaq.QuantizedSoftmax.sample` (module docstring): int64 tokens shaped ``h.shape[:-1]``,
    or a :class:`SampleOutput` with ``return_logprobs``. Never records autograd history."""
    top_k, top_p, min_p, temperature = check_full_sampling_args(top_k, top_p, min_p, temperature, layer.num_classes)
    if candidates is not None:
        candidates = check_int(candidates, "candidates", 1, layer.num_classes, f"in [1, V={layer.num_classes}]")
    # without truncation, PQ layers draw with one torchaq::layer_sample call per chunk (which refuses a
    # non-finite h itself)
    one_op = _one_op_args(layer, candidates) if top_k is None and top_p == 1 and min_p is None else None
    # no autograd: the one-op path reads detached parameters; every other step enters no_grad here (a
    # no_grad context on every call costs a visible share of a batch-1 draw)
    if torch.is_grad_enabled() and (one_op is None or return_logprobs or getattr(h, "requires_grad", False)):
        with torch.no_grad():
            return sample_full(layer, h, top_k, top_p, min_p, temperature, generator, seeds, return_logprobs, candidates)
    flat = layer.flat_features(h, finite=one_op is None)
    lead = h.shape[:-1]
    seeds = row_seeds(seeds, generator, lead, flat.device)
    tokens, full, truncated = [], [], []
    # SAMPLE_ROWS rows at a time: every step is row-wise, so this changes no draw and bounds the
    # (rows, V) temporaries (scores, bounds, proposal weights) below the dense layer's (B, V) logits
    for a, b in row_chunks(flat.shape[0], SAMPLE_ROWS):
        if one_op is not None:
            whole = b - a == flat.shape[0]  # (no slices: at batch 1 every call counts)
            tok, values = _one_op_chunk(layer, flat if whole else flat[a:b], seeds if whole else seeds[a:b], temperature,
                                        candidates, one_op)
            floor, head_logits = None, None
        else:
            plan = _plan(layer, flat[a:b], top_k, top_p, min_p, temperature, candidates)
            rows = torch.arange(b - a, device=flat.device)
            tok, values, _ = _draw(layer, plan, rows, row_keys(seeds[a:b]), temperature)
            floor, head_logits = plan.floor, (plan.logits if plan.weights is None else None)
        tokens.append(tok)
        if return_logprobs:
            floor = values.new_full((b - a,), -math.inf) if floor is None else floor
            lp = _logprobs(layer, flat[a:b], floor, values, temperature, head_logits)
            full.append(lp[0])
            truncated.append(lp[1])

    def joined(parts):
        out = parts[0] if len(parts) == 1 else torch.cat(parts)
        return out if out.shape == lead else out.reshape(lead)

    if not tokens:  # no rows
        empty = torch.empty(lead, dtype=torch.int64, device=flat.device)
        return SampleOutput(empty, empty.float(), empty.float()) if return_logprobs else empty
    if not return_logprobs:
        return joined(tokens)
    return SampleOutput(joined(tokens), joined(full), joined(truncated))
