"""Sampled softmax whose proposal is the whole LUT softmax, with the LUT sum as a control variate.

The quantized index gives an approximate logit ``s_bc = <h_b, x~_c> (+ bias_c)`` for every class
``c`` (``x~_c`` the decoded code of row ``c``), ``ops.lut_score``: ``B V M`` float lookups for
``M`` subspaces. With all ``B x V`` of them at hand, two things are exact and cheap next to
the exact logits of the drawn classes:

* the **LUT sum** ``S_b = sum_{c not in E_b} e^{s_bc}`` over every class outside the row's exact
  set ``E_b`` (its hard set ``H_b`` -- the LUT top ``num_hard`` plus the layer's exact side
  rows -- and, with ``remove_accidental_hits``, the target);
* the **mixture proposal** ``Q(c) = alpha r(c) + (1 - alpha) u(c)`` with

      r(c) proportional to sum_b a_b 1[c not in E_b] e^{s_bc},   a_b = 1 / sum_{c in T_b} e^{s_bc}

  (``T_b`` the row's next LUT-top classes after ``H_b``, with the scan's scores: ``a_b`` makes
  every row weigh about the same in the mixture; any positive ``a_b`` keeps the estimator exact), ``u`` uniform or the unigram distribution (``class_counts``), and
  ``alpha = lut_share``. Every class with ``e^{s_bc} > 0`` for some row can be drawn: no
  class outside a top-``C`` list is left to the floor alone. ``m`` draws are made with
  replacement from ``Q`` and de-duplicated into ``U``; ``pi(c) = 1 - (1 - Q(c))^m`` is the
  exact inclusion probability (Horvitz & Thompson, JASA 1952). Drawing from the batch mean of
  the rows' proposals is the balance heuristic (Veach & Guibas 1995): one ``(B, |U|)`` matmul
  gives every row the exact logits of all draws.

The estimate of ``Z_b = sum_c e^{l_bc}`` samples only the quantization error (a control
variate):

    Z_hat_b = e^{l_bt} + R_hat_b,
    R_hat_b = sum_{c in H_b, c != t} e^{l_bc} + S_b + sum_{c in U \\ E_b} (e^{l_bc} - e^{s_bc}) / pi(c)

``E[Z_hat_b] = Z_b`` exactly; the loss is ``log Z_hat_b - l_bt`` (target uncorrected, hard set
counted once), evaluated as ``softplus(log R_hat_b - l_bt)``: for a confident row (``p_t`` near
1) its gradient ``-(1 - p_t)`` comes from ``R_hat_b`` instead of from ``p_t - 1``, which float32
rounds away (the float32 full softmax itself has that error). ``R_hat_b`` is clamped below at
its exact terms (the correction can be negative).

**Gradient.** ``s`` is treated as a constant (the codes are discrete and ``S_b`` is not
differentiated), so autograd of the loss gives

    d/dh_b  = [sum_{c in E_b} e^{l_bc} w_c + sum_{c in U \\ E_b} e^{l_bc} w_c / pi(c)] / Z_hat_b - w_t
    d/dw_c  = e^{l_bc} / (pi(c) Z_hat_b) h_b    (c drawn; the exact set without 1 / pi)

the Horvitz-Thompson estimate of ``dZ_b`` (unbiased) over the control-variate ``Z_hat_b``:
``E[dZ_hat_b] = dZ_b``, and the ratio converges to the full softmax's gradient as the draws
grow. Differentiating ``S_b`` through the decoded codes (``sum_c e^{s_bc} x~_c``) would need a
``(B, V) x (V, d)`` product, the cost of the full softmax's forward, so it is not done.

**Row subsample** (``lut_rows = R < B``): the pass over ``V`` runs for ``R`` rows drawn at
random; ``r`` is their mixture and only they get the control variate, the other rows the plain
Horvitz-Thompson estimate with the same draws. Still exact in expectation (the proposal does
not depend on the draws; ``pi`` is exact), at ``R / B`` of the pass's cost.

**Cost** per step: the ``lut_topk`` scan for ``H_b`` and ``T_b``, one ``lut_score`` pass over
``V`` in chunks of classes (``B V M`` lookups, ``B V`` exponentials and two ``B V`` reductions;
memory ``O(B chunk)``, never ``(B, V)``), ``m`` draws from a ``(V,)`` distribution, the decoded
codes of ``U`` and ``B (|H| + |U|) d`` multiply-adds for the exact and approximate logits of the
used classes. ``benchmarks/sampled_softmax.py`` measures it against the top-candidate proposal
of :mod:`torchaq.training.sampled_softmax` and the full softmax.
"""
from __future__ import annotations

import logging
import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from torchaq import ops
from torchaq.ops.class_logits import class_logits
from torchaq.training.proposals import excluded_mask, random_rows, row_proposals

logger = logging.getLogger("torchaq")

# default share alpha of the mixture proposal on the LUT softmax (the rest is the floor u)
LUT_SHARE = 0.9
# default number of rows of the batch whose LUT pass over V forms the mixture (None: all rows)
LUT_ROWS = 64
# (B, chunk) float32 blocks of LUT scores: about this many elements
_CHUNK_ELEMENTS = 8 << 20


def codes_of(layer, classes: Tensor) -> Tensor:
    """The ``(n, M)`` codes of the rows ``classes`` ``(n,)`` read from the layer's packed buffer (no full unpack)."""
    packed = layer.packed_codes
    block = packed.shape[2]
    rows = packed[classes // block, :, classes % block]  # (n, P) uint8
    return ops.codes_of_packed_rows(rows, layer.quantizer.num_subspaces, layer.quantizer.bits)


def lut_logits(layer, h: Tensor, classes: Tensor) -> Tensor:
    """``s_bc = <h_b, x~_c> + scan bias_c`` ``(B, n)`` for ``classes`` ``(n,)``: the LUT score through the decoded codes."""
    recon = layer.quantizer.decode(codes_of(layer, classes), dtype=torch.float32)
    out = h.detach().float() @ recon.T
    bias = layer.scan_bias()
    if bias is not None:
        out = out + bias[classes]
    return out


class LutMixture:
    """One chunked pass over the LUT scores of every class: ``S_b`` and the mixture ``Q`` (module docstring).

    ``lut`` ``(B, M, K)``; ``exact`` ``(B, e)`` each row's excluded classes (``-1``: padding, a
    class may repeat); ``shift`` ``(B,)`` a per-row reference score (exponents are taken
    relative to it); ``row_weight`` ``(B,)`` the ``a_b``.
    """

    def __init__(self, layer, lut: Tensor, exact: Tensor, shift: Tensor, row_weight: Tensor, lut_share: float,
                 base: Optional[Tensor] = None):
        num_classes = layer.num_classes
        batch, device = lut.shape[0], lut.device
        packed, bias = layer.packed_codes, layer.scan_bias()
        block = packed.shape[2]
        chunk = max(block, _CHUNK_ELEMENTS // max(1, batch) // block * block)
        rest = torch.zeros(batch, dtype=torch.float64, device=device)
        mix = torch.empty(num_classes, dtype=torch.float32, device=device)
        row_base = torch.arange(batch, device=device).unsqueeze(1)
        valid = exact >= 0
        lut = lut.clone()
        lut[:, 0, :] -= shift.unsqueeze(1)  # every score of row b comes out as s_bc - shift_b (no extra pass)
        for start in range(0, num_classes, chunk):
            stop = min(num_classes, start + chunk)
            scores = ops.lut_score(lut, packed[start // block: (stop + block - 1) // block], stop - start,
                                   None if bias is None else bias[start:stop])
            e = scores.clamp_(max=80.0).exp_()
            inside = valid & (exact >= start) & (exact < stop)
            if bool(inside.any()):  # drop each row's exact classes from its LUT sum and its mixture part
                pos = (row_base * (stop - start) + (exact - start)).masked_select(inside)
                e.view(-1).index_fill_(0, pos, 0.0)
            rest += e.sum(1).double()
            mix[start:stop] = e.T @ row_weight
        total = float(mix.sum(dtype=torch.float64))
        #: the unnormalised LUT part of the mixture ``(V,)`` and its sum (a vocabulary split over ranks
        #: normalises by the sum over all ranks: :mod:`torchaq.distributed.lut_loss`)
        self.mix, self.mix_total = mix, total
        self.log_rest = torch.log(rest) + shift.double()  # log S_b (-inf when nothing is left)
        share = lut_share if total > 0 and math.isfinite(total) else 0.0
        floor = base.double() if base is not None else torch.full((num_classes,), 1.0 / num_classes,
                                                                  dtype=torch.float64, device=device)
        self.proposal = (1.0 - share) * floor
        if share:
            self.proposal += share * (mix.double() / total)

    def draws(self, num_sampled: int, generator: Optional[torch.Generator] = None) -> Tuple[Tensor, Tensor]:
        """``m`` draws with replacement from ``Q``: the distinct classes ``U`` (sorted) and ``log pi(U)``."""
        draw_device = generator.device if generator is not None else self.proposal.device
        samples = torch.multinomial(self.proposal.float().to(draw_device), num_sampled, replacement=True,
                                    generator=generator).to(self.proposal.device)
        classes = torch.unique(samples)
        q = self.proposal[classes].clamp(max=1 - 1e-15)
        log_pi = torch.log((-torch.expm1(num_sampled * torch.log1p(-q))).clamp_min(1e-300))
        return classes, log_pi


def lut_cv_loss(h: Tensor, target: Tensor, weight: Tensor, bias: Optional[Tensor], hard: Tensor, classes: Tensor,
                log_pi: Tensor, draw_lut: Tensor, log_rest: Tensor, remove_accidental_hits: bool = True,
                draw_weight_grad: bool = True) -> Tensor:
    """Per-row ``log Z_hat_b - l_bt`` (module docstring) for rows ``h`` ``(B, d)``.

    ``hard`` ``(B, n)``: distinct exact classes per row; ``classes`` ``(u,)`` sorted distinct
    draws with ``log_pi``; ``draw_lut`` ``(B, u)`` their LUT scores; ``log_rest`` ``(B,)`` ``log
    S_b`` over the classes outside each row's exact set. Gradients flow through the exact logits
    (``draw_weight_grad=False``: the draws' logits give ``h`` its gradient but not the weights).
    """
    (hard_logits, target_logit), draw_logits = class_logits(h, weight, bias, [hard, target.unsqueeze(1)], classes,
                                                            shared_weight_grad=draw_weight_grad)
    target_logit = target_logit.squeeze(1)
    hard_is_target = hard == target.unsqueeze(1)
    excluded = torch.cat([hard, target.unsqueeze(1)], 1) if remove_accidental_hits else hard
    drop = excluded_mask(classes, excluded)
    others = hard_logits.masked_fill(hard_is_target, -math.inf)  # the hard set without the target
    with torch.no_grad():  # a reference among the non-target terms, so that their sum cannot underflow
        shift = torch.maximum(others.amax(1) if others.shape[1] else log_rest.float(), log_rest.float())
        if classes.numel():
            shift = torch.maximum(shift, draw_logits.masked_fill(drop, -math.inf).amax(1))
        shift = torch.where(torch.isfinite(shift), shift, target_logit.detach() - 100.0)
    sh = shift.unsqueeze(1)
    hard_part = torch.exp(others - sh).sum(1)
    inv_pi = torch.exp(-log_pi.float()).unsqueeze(0)
    corr = ((torch.exp(draw_logits - sh) - torch.exp(draw_lut.float() - sh)) * inv_pi).masked_fill(drop, 0.0).sum(1)
    rest = hard_part + torch.exp(log_rest.float() - shift) + corr
    rest = torch.maximum(rest, hard_part).clamp_min(1e-30)  # the correction can be negative: never below the exact terms
    if logger.isEnabledFor(logging.DEBUG) and h.shape[0]:
        with torch.no_grad():
            w = (torch.exp(draw_logits - sh) * inv_pi).masked_fill(drop, 0.0)
            ess = w.sum(1) ** 2 / (w * w).sum(1).clamp_min(1e-30)
            logger.debug("torchaq sampled softmax (LUT proposal): %d distinct draws, ESS per row mean %.1f min %.1f",
                         classes.numel(), float(ess.mean()), float(ess.min()))
    # log Z_hat - l_t = log(1 + R_hat e^{-l_t}): its derivative in l_t is -(1 - p_t) computed from R_hat, not 1 - p_t
    # (which float32 rounds to 0 for a confident row)
    return F.softplus(shift + torch.log(rest) - target_logit)


def layer_lut_cv_loss(layer, flat: Tensor, target: Tensor, num_sampled: int, num_hard: int, num_candidates: int,
                      lut_share: float, base: Optional[Tensor], remove_accidental_hits: bool,
                      generator: Optional[torch.Generator], control_variate: bool = True,
                      lut_rows: Optional[int] = None, draws: Optional[Tuple[Tensor, Tensor]] = None,
                      draw_weight_grad: bool = True) -> Tuple[Tensor, Tensor]:
    """The per-row loss for ``layer`` (flattened rows ``flat``, ``target`` ``(B,)``): scan, LUT pass, draws,
    loss; returns ``(loss (B,), hard (B, n))``, the rows' hard sets with it.

    ``control_variate=False`` keeps the proposal but drops ``S_b`` and the ``e^{s}`` corrections
    (the plain Horvitz-Thompson estimate, for comparison). ``lut_rows = R < B``: the LUT pass
    runs on ``R`` rows drawn at random (cost ``R V M`` instead of ``B V M``); the mixture is
    theirs, and the other rows use the plain estimate (still unbiased: the proposal does not
    depend on the draws and ``pi`` is exact). ``draws = (classes, log_pi)`` replaces the draws (sorted
    distinct classes and their log inclusion probabilities): the same estimate for given draws, e.g. to
    compare with the vocabulary-parallel loss."""
    with torch.no_grad():
        props = row_proposals(layer, flat, num_hard, max(num_candidates, num_hard + 1), 0.5, None)
        hard = props.hard
        lut = layer.quantizer.lut(flat.detach())
        tail_s = props.tail_scores  # (B, T) the scan's scores of each row's tail candidates
        shift = tail_s.amax(1) if tail_s.shape[1] else torch.zeros(flat.shape[0], device=flat.device)
        row_weight = (1.0 / torch.exp(tail_s - shift.unsqueeze(1)).sum(1)) if tail_s.shape[1] else \
            torch.ones(flat.shape[0], device=flat.device)
        excluded = torch.cat([hard, target.unsqueeze(1)], 1) if remove_accidental_hits else hard
        if remove_accidental_hits:  # the target counted once: drop its copy when it is in the hard set
            excluded = excluded.clone()
            excluded[:, -1] = torch.where((hard == target.unsqueeze(1)).any(1), -1, target)
        batch = flat.shape[0]
        rows = None
        if lut_rows is not None and lut_rows < batch:
            rows = random_rows(batch, lut_rows, generator).sort().values.to(flat.device)
            lut, excluded, shift, row_weight = lut[rows], excluded[rows], shift[rows], row_weight[rows]
        mixture = LutMixture(layer, lut, excluded, shift.float(), row_weight.float(), lut_share, base)
        classes, log_pi = mixture.draws(num_sampled, generator) if draws is None else draws
        if rows is None:
            draw_lut = lut_logits(layer, flat, classes)
            log_rest = mixture.log_rest
        else:  # the control variate for the rows of the pass only
            draw_lut = torch.full((batch, classes.numel()), -math.inf, device=flat.device)
            draw_lut[rows] = lut_logits(layer, flat[rows], classes)
            log_rest = torch.full((batch,), -math.inf, dtype=torch.float64, device=flat.device)
            log_rest[rows] = mixture.log_rest
        if not control_variate:
            draw_lut, log_rest = torch.full_like(draw_lut, -math.inf), torch.full_like(log_rest, -math.inf)
    return lut_cv_loss(flat, target, layer.weight, layer.bias, hard, classes, log_pi, draw_lut, log_rest,
                       remove_accidental_hits, draw_weight_grad), hard

