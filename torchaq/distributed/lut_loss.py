"""The vocabulary-parallel sampled softmax with the single-device ``lut`` proposal (:mod:`torchaq.training.lut_proposal`).

Every piece of the single-device estimator is a sum over classes, so it splits over the ranks'
slices; the choices in it are made globally, so the estimate is the single-device one:

* **hard set and tail** (the row's ``num_hard`` LUT-best classes, counted exactly, and the next
  ones, whose scores weight the rows in the mixture): the global scan ranking of
  :func:`torchaq.distributed.invariant.scan_share` (one all-gather of ``B C`` scores per rank),
  plus the global exact side list; ``shift_b`` and ``a_b`` come from the gathered tail scores,
  the same on every rank;
* **LUT pass**: each rank runs :class:`torchaq.training.lut_proposal.LutMixture` on its slice; the
  LUT sums ``S_b`` and the mixture's total are all-reduced (``B + 1`` float64), so ``Q`` restricted
  to a slice is the single-device ``Q`` there;
* **draws**: group rank 0 splits the ``m`` draws over the ranks by ``Multinomial(m, Q(slice_r))``
  and broadcasts the ``P`` counts; each rank draws its count from ``Q`` on its slice. That is
  ``m`` independent draws from ``Q`` (grouped by slice), so ``pi(c) = 1 - (1 - Q(c))^m`` as on one
  device;
* **loss**: the exact terms, ``S_b`` and the control-variate corrections are summed over ranks
  (all-reduces of ``B`` values; backward needs no communication but the ``dL/dh`` all-reduce).
  For the same draws (``draws=``) the loss and its gradients are the single-device ones up to
  float summation order.

Cost per rank: the single-device cost on ``V_r`` classes, plus the all-gather of ``B C`` floats
and all-reduces of ``O(B)`` values.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from torchaq.distributed.groups import all_gather_rows
from torchaq.distributed.invariant import scan_share
from torchaq.distributed.mappings import copy_to_parallel_region, reduce_from_parallel_region
from torchaq.ops.rescore import exact_logits
from torchaq.training.lut_proposal import LutMixture, lut_logits
from torchaq.training.proposals import cpu_generator, excluded_mask, random_rows
from torchaq.training.tail_grad import exact_sets


def _all_reduce(x: Tensor, layer, op=dist.ReduceOp.SUM) -> Tensor:
    x = x.clone()
    if layer.world_size > 1:
        dist.all_reduce(x, op=op, group=layer.group)
    return x


def vp_lut_loss(layer, flat: Tensor, target: Tensor, num_sampled: int, num_hard: int, num_candidates: int,
                lut_share: float, base: Optional[Tensor], remove_accidental_hits: bool,
                generator: Optional[torch.Generator], lut_rows: Optional[int],
                draws: Optional[Tuple[Tensor, Tensor]] = None, draw_weight_grad: bool = True) -> Tuple[Tensor, Tensor]:
    """Per-row loss ``(B,)`` (module docstring) and each row's exact set on this slice ``(B, n)`` (local
    ids, ``-1``: none); ``base``: this rank's slice of the floor distribution (normalised over all ``V``)
    or None (uniform); ``draws``: optional global ``(classes, log_pi)``; ``draw_weight_grad=False``: the
    draws' logits pass gradient to ``h`` only."""
    local = layer.local
    batch, device = flat.shape[0], flat.device
    start, stop = layer.vocab_range
    num_side = layer.num_side_rows
    with torch.no_grad():
        candidates = min(layer.num_classes, max(num_candidates, num_hard + 1, 1))
        scan_k = min(candidates, layer.num_classes - num_side)
        n_hard = min(num_hard, scan_k)
        lut = local.quantizer.lut(flat.detach())
        classes, valid, place, top = scan_share(layer, flat.detach(), lut, scan_k, num_side > 0, positions=True)
        tail_s = top[:, n_hard:].float()
        shift = tail_s.amax(1) if tail_s.shape[1] else torch.zeros(batch, device=device)
        row_weight = (1.0 / torch.exp(tail_s - shift.unsqueeze(1)).sum(1)) if tail_s.shape[1] else torch.ones(batch, device=device)
        hard = classes.masked_fill(~(valid & (place < n_hard)), -1)
        side = local.side_rows.to(device)
        if side.numel():
            hard = torch.cat([hard, side.expand(batch, -1)], 1)
        owned = (target >= start) & (target < stop)
        local_target = torch.where(owned, target - start, torch.zeros_like(target))
        hard_is_target = (hard == local_target.unsqueeze(1)) & owned.unsqueeze(1)
        excluded = hard
        if remove_accidental_hits:
            extra = torch.where(owned & ~hard_is_target.any(1), local_target, -1)
            excluded = torch.cat([hard, extra.unsqueeze(1)], 1)
        rows = None
        if lut_rows is not None and lut_rows < batch:  # group rank 0 picks the rows of the LUT pass
            rows = random_rows(batch, lut_rows, generator).sort().values.to(device)
            if layer.world_size > 1:
                dist.broadcast(rows, src=layer.root, group=layer.group)
        sub = (lambda t: t) if rows is None else (lambda t: t[rows])
        mixture = LutMixture(local, sub(lut), sub(excluded), sub(shift).float(), sub(row_weight).float(), lut_share)
        # S_b and the mixture's total over all ranks
        sums = torch.cat([torch.exp(mixture.log_rest - sub(shift).double()),
                          torch.tensor([mixture.mix_total], dtype=torch.float64, device=device)])
        sums = _all_reduce(sums, layer)
        rest_total, total = sums[:-1], float(sums[-1])
        share = lut_share if total > 0 and math.isfinite(total) else 0.0
        floor = base.double() if base is not None else torch.full((layer.local_classes,), 1.0 / layer.num_classes,
                                                                 dtype=torch.float64, device=device)
        proposal = (1.0 - share) * floor + (share * mixture.mix.double() / total if share else 0.0)
        log_rest = torch.log(rest_total) + sub(shift).double()
        if draws is None:
            masses = all_gather_rows(proposal.sum().reshape(1), layer.group, layer.world_size).reshape(-1)
            counts = torch.multinomial(masses.float().cpu(), num_sampled, replacement=True,
                                       generator=cpu_generator(generator))
            counts = torch.bincount(counts, minlength=layer.world_size).to(device)
            if layer.world_size > 1:
                dist.broadcast(counts, src=layer.root, group=layer.group)
            mine = int(counts[layer.rank])
            if mine:
                draw_device = generator.device if generator is not None else device
                picked = torch.multinomial((proposal / proposal.sum()).float().to(draw_device), mine, replacement=True,
                                           generator=generator).to(device)
                drawn = torch.unique(picked)
            else:
                drawn = torch.zeros(0, dtype=torch.int64, device=device)
            q = proposal[drawn].clamp(max=1 - 1e-15)
            log_pi = torch.log((-torch.expm1(num_sampled * torch.log1p(-q))).clamp_min(1e-300))
        else:
            g_classes, g_log_pi = draws
            sel = (g_classes >= start) & (g_classes < stop)
            drawn, log_pi = (g_classes[sel] - start).to(device), g_log_pi[sel].to(device)
        if rows is None:
            draw_lut = lut_logits(local, flat, drawn)
        else:
            draw_lut = torch.full((batch, drawn.numel()), -math.inf, device=device)
            draw_lut[rows] = lut_logits(local, flat[rows], drawn)
            full_rest = torch.full((batch,), -math.inf, dtype=torch.float64, device=device)
            full_rest[rows] = log_rest
            log_rest = full_rest

    hin = copy_to_parallel_region(flat, layer.group) if torch.is_grad_enabled() and flat.requires_grad else flat
    weight, bias = local.weight, local.bias
    ok_hard = hard >= 0
    hard_logits = exact_logits(hin, weight, bias, hard.clamp(min=0)).masked_fill(~ok_hard, -math.inf)
    mine_t = exact_logits(hin, weight, bias, local_target.unsqueeze(1)).squeeze(1)
    target_logit = reduce_from_parallel_region(torch.where(owned, mine_t, torch.zeros_like(mine_t)), layer.group)
    draw_w, draw_b = (weight, bias) if draw_weight_grad else (weight.detach(), None if bias is None else bias.detach())
    draw_logits = hin.float() @ draw_w.index_select(0, drawn).float().T
    if draw_b is not None:
        draw_logits = draw_logits + draw_b[drawn].float()
    drop = excluded_mask(drawn, excluded.masked_fill(excluded < 0, -1))
    others = hard_logits.masked_fill(hard_is_target, -math.inf)
    with torch.no_grad():  # a reference among the non-target terms (the max over ranks)
        shift_l = torch.maximum(others.amax(1) if others.shape[1] else log_rest.float(), log_rest.float())
        if drawn.numel():
            shift_l = torch.maximum(shift_l, draw_logits.masked_fill(drop, -math.inf).amax(1))
        shift_l = _all_reduce(shift_l, layer, dist.ReduceOp.MAX)
        ref = torch.where(torch.isfinite(shift_l), shift_l, target_logit.detach() - 100.0)
    sh = ref.unsqueeze(1)
    hard_part = reduce_from_parallel_region(torch.exp(others - sh).sum(1), layer.group)
    inv_pi = torch.exp(-log_pi.float()).unsqueeze(0)
    corr = ((torch.exp(draw_logits - sh) - torch.exp(draw_lut.float() - sh)) * inv_pi).masked_fill(drop, 0.0).sum(1)
    corr = reduce_from_parallel_region(corr, layer.group)
    rest = hard_part + torch.exp(log_rest.float() - ref) + corr
    rest = torch.maximum(rest, hard_part).clamp_min(1e-30)
    return F.softplus(ref + torch.log(rest) - target_logit), exact_sets(local_target, hard, owned)
