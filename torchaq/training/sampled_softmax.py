"""Sampled softmax cross-entropy with per-row proposals read off the quantized index.

The full cross-entropy of a row ``h_b`` with target ``t_b`` is ``log Z_b - l_bt`` with
``Z_b = sum_c exp(l_bc)`` over all ``V`` classes. A sampled softmax replaces ``Z_b`` by an
estimate built from a few classes whose logits are computed exactly:

* the **target** ``t_b``: exact, never importance-weighted ("uncorrected");
* a **hard set** ``H_b`` (quantized sampler): the row's ``num_hard`` best classes by LUT score,
  counted exactly, once (the target counts as the target if it is among them);
* a set ``U`` of **drawn classes shared by the batch**, each counted with a Horvitz-Thompson
  weight ``1 / pi(c)``, ``pi(c) = P(c in U)``. Draws are made with replacement and
  de-duplicated: every class is computed once, whatever the number of copies drawn.

    Z_hat_b = e^{l_bt} + sum_{c in H_b, c != t_b} e^{l_bc} + sum_{c in U, c not in E_b} e^{l_bc} / pi(c)

with ``E_b = H_b u {t_b}`` (``remove_accidental_hits=False``: ``E_b = H_b``, draws of the target
count as negatives too, as in TensorFlow's ``sampled_softmax_loss``, which over-counts
``e^{l_bt}``). ``E[Z_hat_b] = Z_b`` exactly (Horvitz & Thompson, JASA 1952: ``E[1[c in U] /
pi(c)] = 1``); the loss ``log Z_hat_b - l_bt`` is biased low by about ``Var(Z_hat_b) / 2 Z_b^2``
and converges to the full cross-entropy as the draws grow. It is evaluated as
``softplus(log R_hat_b - l_bt)`` with ``R_hat_b = Z_hat_b - e^{l_bt}`` (every term but the
target's), so that its derivative in ``l_bt``, ``-(1 - p_t)``, is computed from the other
terms: written as ``logsumexp - l_bt`` it is ``p_t - 1``, which float32 rounds to 0 (or to a
multiple of 6e-8) on a row whose target is near-certain -- the float32 full softmax
(``F.cross_entropy``) has that error too.

**Proposals** (``sampler``): with ``m = num_sampled`` draws,

* ``"uniform"``: ``Q = 1 / V`` for every draw; ``pi(c) = 1 - (1 - Q(c))^m``.
* ``"unigram"``: ``Q proportional to class_counts``; same ``pi``.
* ``"quantized"``, ``proposal="lut"``: the batch mixture of every row's softmax of the LUT
  scores over all ``V`` classes, with the LUT sum as control variate (only the quantization
  error is sampled): :mod:`torchaq.training.lut_proposal` has the estimator, its gradient and its cost
  (one extra ``lut_score`` pass over ``V`` for ``lut_rows`` rows of the batch).
* ``"quantized"``, ``proposal="candidates"``: per-row proposals from the index. One ``lut_topk`` scan gives each row its
  ``num_candidates`` best classes by LUT score ``s_bc``: the first ``num_hard`` are ``H_b``, the
  rest its *tail candidates* ``T_b``. Row ``b``'s proposal is the defensive mixture
  (Hesterberg 1995)

      Q_b(c) = alpha * 1[c in T_b] e^{s_bc} / sum_{T_b} e^{s} + (1 - alpha) u(c),    alpha = CANDIDATE_SHARE

  with ``u`` uniform, or the unigram distribution when ``class_counts`` are given (its own
  high-probability region past the hard set, plus a floor that keeps every class reachable -- the kernel / MIDX samplers' idea, Blanc & Rendle 2018, Chen et al. arXiv
  2501.08563, with the proposal read off the LUT scan). Row ``k`` makes ``n_k`` draws from its
  own ``Q_k`` (``n_k = m // B``, one more for ``m mod B`` random rows), and the batch shares the
  union ``U``: ``pi(c) = 1 - prod_k (1 - Q_k(c))^{n_k}``, the multi-draw form of the balance
  heuristic (Veach & Guibas 1995; each draw is weighted by the mixture of all rows'
  proposals, not by its own row's), so every row gets all ``m`` draws' exact logits for one
  ``(B, |U|)`` matmul. ``share_draws=False`` instead gives each row ``m`` draws of its own,
  weighted ``1 / (m Q_b(s))`` (a ``(B, m, d)`` gather; ``benchmarks/sampled_softmax.py``
  compares the two at equal time).

**Control variate** (``control_variate=True``, the default for the quantized sampler; this is
the ``"candidates"`` proposal's, the ``"lut"`` one is in :mod:`torchaq.training.lut_proposal`): the tail candidates' LUT
scores are known, so only their quantization error is sampled:

    Z_hat_b = [exact terms] + sum_{c in T_b \\ E_b} e^{s_bc} + sum_{c in U \\ E_b} (e^{l_bc} - 1[c in T_b] e^{s_bc}) / pi(c)

still unbiased; clamped below at the exact terms (the correction can be negative). Its
gradient is that of the plain estimator rescaled by the new ``Z_hat_b``.

**Cost** per step for ``B`` rows of dimension ``d``: the scan (``B V M`` LUT lookups for ``M``
subspaces, the SIMD ``lut_topk`` op) plus ``B (|H| + 1 + |U|) d`` multiply-adds for the exact
logits, ``|U| <= m`` (:func:`torchaq.ops.class_logits`: on CPU without gathering ``(B, |H|, d)``
rows), and ``3 R V d`` for the tail's weight gradient of ``R = tail_grad_rows`` rows (below); the
full softmax is ``3 B V d`` (forward and backward). Memory: ``(B, num_candidates)`` scan results
and ``(B, |H| + |U|)`` logits instead of ``(B, V)``; the weight gradient is the dense ``(V, d)``
tensor autograd keeps for an ``nn.Parameter`` (with ``tail_grad_rows=0`` only used rows are
non-zero). ``benchmarks/sampled_softmax.py`` measures time, memory and gradient quality;
``examples/train_lm.py`` measures training.

**Effective sample size**: each step logs, at DEBUG level on the ``"torchaq"`` logger, the mean
and minimum over rows of ``(sum_c w_bc)^2 / sum_c w_bc^2`` with ``w_bc = e^{l_bc} / pi(c)`` over
the row's kept draws.

**Weight gradient** (``tail_grad_rows``, default :func:`torchaq.training.tail_grad.default_tail_rows`).
Through its draws alone, a class gets a gradient only on the steps it is drawn, weighted ``1 /
pi(c)``; Adam normalises those rare spikes into much smaller moves than the full softmax's small
gradient at every step, and that, not the loss or the gradient in ``h``, is what kept the sampled
loss's perplexity behind the full softmax's in training (``examples/train_lm.py``). So by default
the weight gradient of every row's classes outside its exact set (target and hard set) comes from
the full softmax of a few random rows of the batch (:mod:`torchaq.training.tail_grad`: unbiased,
every class at every step); the draws give the loss and the gradient in ``h``.
``tail_grad_rows=0`` restores the draws' Horvitz-Thompson weight gradient. The proposal's floor
still matters for the loss and ``h``: a unigram floor (``class_counts``) draws the frequent
classes every step. ``benchmarks/results/train_lm*.txt`` has the measured perplexities.
"""
from __future__ import annotations

import logging
import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from torchaq.checks import is_int
from torchaq.ops.class_logits import class_logits
from torchaq.ops.rescore import exact_logits
from torchaq.training.conventions import (
    IGNORE_INDEX,
    check_loss_options,
    check_reduction,
    check_targets,
    kept_rows,
    reduce_loss,
)
from torchaq.training.linear_ce import linear_cross_entropy
from torchaq.training.lut_proposal import LUT_ROWS, LUT_SHARE, layer_lut_cv_loss
from torchaq.training.proposals import (
    CANDIDATE_SHARE,
    CANDIDATES_PER_ROW,
    HARD_PER_ROW,
    RowProposals,
    excluded_mask,
    row_proposals,
    shared_draws,
    unigram_proposal,
)
from torchaq.training.tail_grad import check_tail_grad_rows, exact_sets, tail_weight_gradient

logger = logging.getLogger("torchaq")

SAMPLERS = ("quantized", "uniform", "unigram")
PROPOSALS = ("lut", "candidates")


def check_sampled_args(h: Tensor, target: Tensor, num_classes: int, num_sampled: int, sampler: str, reduction: str,
                       ignore_index: Optional[int] = None) -> None:
    """The arguments every sampled loss shares (single-device and vocabulary-parallel)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    check_reduction(reduction)
    if not is_int(num_sampled) or not 1 <= num_sampled <= num_classes:
        raise ValueError(f"num_sampled must be an integer in [1, V={num_classes}], got {num_sampled!r}")
    check_targets(target, h, num_classes, ignore_index=ignore_index)


def sampled_softmax_loss(
    h: Tensor,
    target: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    classes: Tensor,
    log_inclusion: Tensor,
    hard: Optional[Tensor] = None,
    remove_accidental_hits: bool = True,
    cv_classes: Optional[Tensor] = None,
    cv_scores: Optional[Tensor] = None,
    draw_weight_grad: bool = True,
) -> Tensor:
    """Per-row loss ``log Z_hat_b - l_bt`` (module docstring) for rows ``h`` ``(B, d)`` and ``target`` ``(B,)``.

    ``classes``: the distinct drawn classes ``U`` (sorted, int64), ``log_inclusion``: ``log
    pi(U)``; ``hard``: optional per-row exact sets ``(B, n)`` with distinct classes in each row.
    ``cv_classes`` / ``cv_scores``: optional ``(B, T)`` classes with known approximate scores
    (the control variate), distinct per row and disjoint from ``hard``. Gradients flow to
    ``h``, ``weight`` and ``bias`` through the exact logits; ``draw_weight_grad=False``: the drawn
    classes' logits pass gradient to ``h`` only (:mod:`torchaq.training.tail_grad` gives the weights theirs).
    """
    batch, device = h.shape[0], h.device
    hard = torch.zeros((batch, 0), dtype=torch.int64, device=device) if hard is None else hard
    # (B, n), (B, 1) and (B, |U|): one node, no (B, n, d) gather
    (hard_logits, target_logit), draw_logits = class_logits(h, weight, bias, [hard, target.unsqueeze(1)], classes,
                                                            shared_weight_grad=draw_weight_grad)
    target_logit = target_logit.squeeze(1)
    hard_is_target = hard == target.unsqueeze(1)
    excluded = torch.cat([hard, target.unsqueeze(1)], 1) if remove_accidental_hits else hard
    drop = excluded_mask(classes, excluded)
    weighted = (draw_logits - log_inclusion.float().unsqueeze(0)).masked_fill(drop, -math.inf)
    terms = torch.cat([target_logit.unsqueeze(1), hard_logits.masked_fill(hard_is_target, -math.inf), weighted], dim=1)
    if logger.isEnabledFor(logging.DEBUG) and batch:
        with torch.no_grad():
            w = torch.softmax(weighted.detach(), dim=1).nan_to_num_(0.0)
            ess = 1.0 / (w * w).sum(1).clamp_min(1e-30)
            ess = torch.where(torch.isfinite(weighted).any(1), ess, 0.0)
            logger.debug("torchaq sampled softmax: %d distinct draws, ESS per row mean %.1f min %.1f",
                         classes.numel(), float(ess.mean()), float(ess.min()))
    if cv_classes is None:
        return _log1p_rest(terms[:, 1:], target_logit)
    # control variate: Z = exact + sum_{T \ E} e^{s} + sum_{U \ E} (e^l - 1[c in T] e^s) / pi
    cv_scores = cv_scores.float()
    cv_keep = torch.ones_like(cv_classes, dtype=torch.bool)
    if remove_accidental_hits:
        cv_keep = cv_classes != target.unsqueeze(1)
    shift = terms.detach().amax(1)
    if cv_scores.shape[1]:
        shift = torch.maximum(shift, cv_scores.amax(1))
    lut_sum = torch.where(cv_keep, torch.exp(cv_scores - shift.unsqueeze(1)), 0.0).sum(1)
    # the drawn classes that are tail candidates of the row: subtract e^{s} / pi for them
    size = classes.numel()
    if size and cv_classes.shape[1]:
        pos = torch.searchsorted(classes, cv_classes.contiguous()).clamp_(max=size - 1)
        in_u = (classes[pos] == cv_classes) & cv_keep
        correction = torch.where(in_u, torch.exp(cv_scores - log_inclusion.float()[pos] - shift.unsqueeze(1)), 0.0).sum(1)
    else:
        correction = torch.zeros_like(lut_sum)
    others = torch.exp(terms[:, 1:] - shift.unsqueeze(1)).sum(1)
    hard_part = torch.exp(terms[:, 1: 1 + hard.shape[1]] - shift.unsqueeze(1)).sum(1)
    rest = torch.maximum(others + (lut_sum - correction), hard_part)  # the correction can overshoot: never below the exact terms
    # log Z_hat - l_t = log(1 + R_hat e^{-l_t}) (see _log1p_rest)
    return F.softplus(shift + torch.log(rest.clamp_min(1e-30)) - target_logit)


def per_row_sampled_softmax_loss(
    h: Tensor, target: Tensor, weight: Tensor, bias: Optional[Tensor], proposals: RowProposals, num_sampled: int,
    remove_accidental_hits: bool = True, generator: Optional[torch.Generator] = None, draw_weight_grad: bool = True,
) -> Tensor:
    """Each row's own ``m`` draws from its ``Q_b``, weighted ``1 / (m' Q_b'(s))`` (excluded set removed), no sharing.

    ``Z_hat_b = e^{l_t} + sum_{H_b \\ t} e^{l} + (1 - Q_b(E_b)) / m' sum_{kept j} e^{l_{s_j}} / Q_b(s_j)``:
    the kept draws are i.i.d. from ``Q_b`` conditioned on ``not in E_b``. Cost ``B m d`` as a
    gather + batched mat-vec (memory ``(B, m, d)``). ``draw_weight_grad=False``: the draws' logits pass
    gradient to ``h`` only.
    """
    batch, device = h.shape[0], h.device
    hard = proposals.hard
    rows = torch.arange(batch, device=device)
    counts = torch.full((batch,), num_sampled, dtype=torch.int64)
    samples, _ = proposals.draw(counts, generator)
    samples = samples.view(batch, num_sampled)
    if draw_weight_grad:
        (hard_logits, target_logit, draw_logits), _ = class_logits(h, weight, bias, [hard, target.unsqueeze(1), samples])
    else:
        (hard_logits, target_logit), _ = class_logits(h, weight, bias, [hard, target.unsqueeze(1)])
        (draw_logits,), _ = class_logits(h, weight.detach(), None if bias is None else bias.detach(), [samples])
    target_logit = target_logit.squeeze(1)
    hard_is_target = hard == target.unsqueeze(1)
    excluded = torch.cat([hard, target.unsqueeze(1)], 1) if remove_accidental_hits else hard
    keep = ~(samples.unsqueeze(2) == excluded.unsqueeze(1)).any(2)
    q_draw = proposals.prob(rows, samples)
    q_excl = proposals.prob(rows, excluded)
    if remove_accidental_hits:  # the target counted once even if it is in the hard set
        q_excl = torch.where(torch.cat([torch.zeros_like(hard_is_target), hard_is_target.any(1, keepdim=True)], 1), 0.0, q_excl)
    kept = keep.sum(1, keepdim=True).clamp_min(1)
    log_w = (torch.log((1 - q_excl.sum(1)).clamp_min(1e-12)).unsqueeze(1) - torch.log(kept.double()) - torch.log(q_draw)).float()
    terms = torch.cat([target_logit.unsqueeze(1), hard_logits.masked_fill(hard_is_target, -math.inf),
                       (draw_logits + log_w).masked_fill(~keep, -math.inf)], dim=1)
    return _log1p_rest(terms[:, 1:], target_logit)


def _log1p_rest(others: Tensor, target_logit: Tensor) -> Tensor:
    """``log(e^{l_t} + sum_j e^{o_j}) - l_t = softplus(logsumexp(o) - l_t)`` for ``others`` ``(B, n)`` (``-inf``: absent).

    Its gradient in ``l_t`` is ``-(1 - p_t)`` computed from the other terms, not ``p_t - 1``,
    which float32 rounds to 0 when the target is near-certain (the float32 full softmax's own error).
    """
    floor = target_logit.detach().unsqueeze(1) - 200.0  # keeps an all-absent row finite (its loss is 0)
    return F.softplus(torch.logsumexp(torch.cat([others, floor], 1), dim=1) - target_logit)


def layer_sampled_softmax_loss(
    layer,
    h: Tensor,
    target: Tensor,
    num_sampled: int = 1024,
    sampler: str = "quantized",
    remove_accidental_hits: bool = True,
    reduction: str = "mean",
    class_counts: Optional[Tensor] = None,
    generator: Optional[torch.Generator] = None,
    num_hard: int = HARD_PER_ROW,
    num_candidates: int = CANDIDATES_PER_ROW,
    control_variate: bool = True,
    share_draws: bool = True,
    candidate_share: float = CANDIDATE_SHARE,
    proposal: str = "lut",
    lut_share: Optional[float] = None,
    lut_rows: Optional[int] = LUT_ROWS,
    ignore_index: int = IGNORE_INDEX,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: Optional[float] = None,
    return_z_loss: bool = False,
    draws: Optional[Tuple[Tensor, Tensor]] = None,
    tail_grad_rows: Optional[int] = None,
):
    """Sampled-softmax cross-entropy of ``h`` ``(..., d)`` against ``target`` ``(...)``, for training.

    ``log Z_hat - logit_target`` where ``Z_hat`` counts the target and (quantized sampler) each
    row's hard set of LUT-top classes exactly, and estimates the rest from ``num_sampled``
    draws shared by the batch with Horvitz-Thompson weights; with ``sampler="quantized"`` every
    row draws from its own proposal read off the LUT scan and the batch shares the draws
    (balance heuristic). ``E[Z_hat] = Z``. See this module's docstring for the estimator, its
    cost (``B V M`` LUT lookups + ``B (|H| + m) d`` instead of ``3 B V d``), its memory and the
    optimiser recipe. Available as :meth:`torchaq.QuantizedSoftmax.sampled_softmax_loss`.

    Args:
        layer: the :class:`torchaq.QuantizedSoftmax` (``self`` when called as a method).
        num_sampled: draws, ``1 <= num_sampled <= V`` (with replacement, de-duplicated).
        sampler: ``"quantized"``, ``"uniform"``, or ``"unigram"`` (needs ``class_counts``).
        remove_accidental_hits: drop draws equal to the row's target.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (shape of ``target``). An empty batch
            gives ``0`` (``"mean"`` / ``"sum"``) or an empty tensor.
        class_counts: ``(V,)`` positive counts for the unigram proposal; with the quantized
            sampler, the floor of every row's proposal is ``(1 - alpha)`` times this unigram
            distribution instead of uniform.
        generator: a ``torch.Generator`` for reproducible draws.
        num_hard: quantized sampler: each row's LUT-top classes counted exactly.
        num_candidates: quantized sampler: LUT-top classes per row read by the scan (the hard
            set plus the tail candidates the row's proposal concentrates on).
        control_variate: quantized sampler: add the tail candidates' LUT scores as a control
            variate for ``Z`` (module docstring).
        share_draws: quantized sampler: ``False`` gives each row its own ``num_sampled`` draws
            instead of sharing them (slower; for comparison).
        candidate_share: quantized sampler, ``proposal="candidates"``: ``alpha``, the share of each
            row's proposal on its tail candidates (the rest is the floor), in ``(0, 1)``.
        proposal: quantized sampler: ``"lut"`` (default) draws from the batch mixture of every
            row's LUT softmax over all ``V`` classes with the LUT sum as control variate
            (:mod:`torchaq.training.lut_proposal`); ``"candidates"`` from each row's LUT-top
            ``num_candidates`` plus a floor (this module's docstring).
        lut_share: ``proposal="lut"``: the mixture's share on the LUT softmax, in ``(0, 1]``
            (default :data:`torchaq.training.lut_proposal.LUT_SHARE`; the rest is the floor).
        lut_rows: ``proposal="lut"``: run the LUT pass over all ``V`` classes for this many
            random rows of the batch only (default :data:`torchaq.training.lut_proposal.LUT_ROWS`;
            ``None``: every row); the others use the plain estimate with the same draws. Cost of
            the pass ``min(lut_rows, B) * V * M``.
        ignore_index: rows with this target are dropped before sampling: loss 0, zero gradient,
            and they leave the mean (an all-ignored batch: NaN for ``"mean"``, 0 for ``"sum"``),
            exactly as ``F.cross_entropy``.
        label_smoothing: eps in ``[0, 1]``: ``(1 - eps)(log Z - l_t) + eps (log Z - mean_c l_c)``. The
            mean logit is exact (``<h, mean_c W_c> + mean_c b_c``, one ``V d`` pass over ``W``); only
            ``log Z`` is estimated, as without smoothing, so the bias is the plain loss's.
        z_loss: coefficient of ``(log Z_hat)^2`` added per kept row. ``log Z_hat`` is biased low by
            about ``Var(Z_hat) / 2 Z^2`` (the loss's own bias), so the term is too: bounded by the same
            quantity times ``2 |log Z|``, and it shrinks with the draws.
        softcap: not supported by the sampled estimators (the proposals and the control variates
            are built on uncapped scores): anything but None raises ValueError.
        return_z_loss: also return the z-loss term (reduced like the loss, detached).
        draws: ``proposal="lut"``: optional ``(classes, log_pi)`` used instead of drawing (sorted
            distinct class ids and their log inclusion probabilities), to evaluate the estimate
            for given draws (the vocabulary-parallel loss is checked against it this way).
        tail_grad_rows: the weight (and bias) gradient of each row's classes outside its exact set (the
            target and the hard set) comes from the full softmax of this many random rows of the batch
            (:mod:`torchaq.training.tail_grad`: unbiased, and every class gets a gradient at every step,
            which is what Adam needs), not from the draws; the draws still give the loss and the
            gradient in ``h``. ``None`` (the default): ``max(64, ceil(B / 32))`` rows
            (:func:`torchaq.training.tail_grad.default_tail_rows`). ``0``: the draws' own Horvitz-Thompson
            weight gradient. Cost ``3 R V d`` multiply-adds in the backward for ``R = min(tail_grad_rows, B)``.
    """
    check_loss_options(softcap, label_smoothing, z_loss)
    if softcap is not None:
        raise ValueError("softcap is not supported by the sampled softmax loss (use torchaq.linear_cross_entropy)")
    if not is_int(ignore_index):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    check_sampled_args(h, target, layer.num_classes, num_sampled, sampler, reduction, ignore_index)
    tail_grad_rows = check_tail_grad_rows(tail_grad_rows, target.numel())
    if getattr(layer, "exact_reason", None) is not None:
        # a table scored exactly (too few rows or columns for codes) has no quantized proposal: its
        # exact loss costs about what the sampled one would
        out = linear_cross_entropy(layer.flat_features(h), layer.weight, target.reshape(-1), layer.bias,
                                   ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing,
                                   z_loss=z_loss, return_z_loss=return_z_loss)
        if reduction != "none":
            return out
        return tuple(t.reshape(target.shape) for t in out) if return_z_loss else out.reshape(target.shape)
    flat_h = layer.flat_features(h)
    flat_t = target.reshape(-1).long()
    kept = kept_rows(flat_t, ignore_index)
    all_kept = torch.compiler.is_compiling() or bool(kept.all())
    rows_h, rows_t = (flat_h, flat_t) if all_kept else (flat_h[kept], flat_t[kept])
    loss, hard = _layer_sampled_rows(layer, rows_h, rows_t, num_sampled, sampler, remove_accidental_hits,
                                     class_counts, generator, num_hard, num_candidates, control_variate, share_draws,
                                     candidate_share, proposal, lut_share, lut_rows, draws, tail_grad_rows == 0)
    z_rows = None
    log_z_scale = None
    if label_smoothing or z_loss:
        target_logit = exact_logits(rows_h, layer.weight, layer.bias, rows_t.unsqueeze(1)).squeeze(1)
        log_z = loss + target_logit  # log Z_hat
        if label_smoothing:
            mean_logit = rows_h.float() @ layer.weight.float().mean(0)
            if layer.bias is not None:
                mean_logit = mean_logit + layer.bias.float().mean()
            loss = loss + label_smoothing * (target_logit - mean_logit)
        if z_loss:
            z_rows = z_loss * log_z * log_z
            loss = loss + z_rows
            log_z_scale = 1.0 + 2.0 * z_loss * log_z.detach()  # d loss / d log Z of each row
    if tail_grad_rows:
        loss = loss + tail_weight_gradient(rows_h, rows_t, layer.weight, layer.bias, exact_sets(rows_t, hard),
                                           tail_grad_rows, generator, log_z_scale)
    if not all_kept:
        loss = torch.zeros(flat_t.shape, dtype=loss.dtype, device=loss.device).masked_scatter(kept, loss)
        if z_rows is not None:
            z_rows = torch.zeros_like(loss).masked_scatter(kept, z_rows.detach())
    if flat_t.numel() == 0:  # an empty batch (not an all-ignored one) gives 0, as documented above
        out = loss.reshape(target.shape) if reduction == "none" else loss.sum()
    else:
        out = reduce_loss(loss, target, reduction, ignore_index)
    if not return_z_loss:
        return out
    z_rows = torch.zeros_like(loss) if z_rows is None else z_rows
    return out, reduce_loss(z_rows.detach(), target, reduction, ignore_index)


def _layer_sampled_rows(layer, flat, flat_target, num_sampled, sampler, remove_accidental_hits, class_counts, generator,
                        num_hard, num_candidates, control_variate, share_draws, candidate_share, proposal, lut_share,
                        lut_rows, draws, draw_weight_grad) -> Tuple[Tensor, Optional[Tensor]]:
    """The per-row sampled loss of kept rows ``flat`` ``(B, d)`` (arguments of :func:`layer_sampled_softmax_loss`)
    and the rows' hard sets (``None``: no hard set)."""
    num_classes = layer.num_classes
    for name, value, low in (("num_hard", num_hard, 0), ("num_candidates", num_candidates, 1)):
        if not is_int(value) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if isinstance(candidate_share, bool) or not isinstance(candidate_share, (int, float)) or not 0 < candidate_share < 1:
        raise ValueError(f"candidate_share must be a number in (0, 1), got {candidate_share!r}")
    if proposal not in PROPOSALS:
        raise ValueError(f"proposal must be one of {PROPOSALS}, got {proposal!r}")
    if lut_share is None:
        lut_share = LUT_SHARE
    if isinstance(lut_share, bool) or not isinstance(lut_share, (int, float)) or not 0 < lut_share <= 1:
        raise ValueError(f"lut_share must be a number in (0, 1], got {lut_share!r}")
    if lut_rows is not None and (not is_int(lut_rows) or lut_rows < 1):
        raise ValueError(f"lut_rows must be None or an integer >= 1, got {lut_rows!r}")
    if sampler == "unigram":
        if class_counts is None:
            raise ValueError('sampler="unigram" needs class_counts (a (V,) tensor of positive counts)')
        proposal = unigram_proposal(class_counts.to(flat.device), num_classes)
    if flat.shape[0] == 0:  # nothing to estimate; keep the graph connected to h and the weights
        return flat.sum(1) * 0.0 + layer.weight.sum() * 0.0, None
    hard = cv_classes = cv_scores = None
    if sampler == "quantized":
        base = None if class_counts is None else unigram_proposal(class_counts.to(flat.device), num_classes)
        if proposal == "lut" and share_draws:
            return layer_lut_cv_loss(layer, flat, flat_target, num_sampled, int(num_hard), int(num_candidates),
                                     float(lut_share), base, remove_accidental_hits, generator, control_variate,
                                     None if lut_rows is None else int(lut_rows), draws, draw_weight_grad)
        proposals = row_proposals(layer, flat, int(num_hard), int(num_candidates), float(candidate_share), base)
        if not share_draws:
            loss = per_row_sampled_softmax_loss(flat, flat_target, layer.weight, layer.bias, proposals, num_sampled,
                                                remove_accidental_hits, generator, draw_weight_grad)
            return loss, proposals.hard
        classes, log_pi = proposals.shared_draws(num_sampled, generator)
        hard = proposals.hard
        if control_variate:
            cv_classes, cv_scores = proposals.tail, proposals.tail_scores
    else:
        if sampler == "uniform":
            proposal = torch.full((num_classes,), 1.0 / num_classes, dtype=torch.float64, device=flat.device)
        classes, log_pi = shared_draws(proposal, num_sampled, generator)
    loss = sampled_softmax_loss(flat, flat_target, layer.weight, layer.bias, classes, log_pi, hard,
                                remove_accidental_hits, cv_classes, cv_scores, draw_weight_grad)
    return loss, hard
