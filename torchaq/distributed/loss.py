"""The sampled softmax over a vocabulary split across ranks (:meth:`VocabParallelQuantizedSoftmax.sampled_softmax_loss`)."""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

from torchaq import ops
from torchaq.checks import is_int
from torchaq.distributed.groups import shard_sizes
from torchaq.distributed.lut_loss import vp_lut_loss
from torchaq.distributed.mappings import copy_to_parallel_region, parallel_logsumexp, reduce_from_parallel_region
from torchaq.distributed.tail_grad import vp_tail_weight_gradient
from torchaq.ops.class_logits import class_logits
from torchaq.ops.rescore import exact_logits
from torchaq.training.conventions import check_reduction, reduce_loss
from torchaq.training.lut_proposal import LUT_ROWS, LUT_SHARE
from torchaq.training.proposals import CANDIDATES_PER_ROW, HARD_PER_ROW
from torchaq.training.sampled_softmax import SAMPLERS
from torchaq.training.tail_grad import check_tail_grad_rows, exact_sets

# the vocabulary-parallel quantized proposal (its own stratified estimator, one proposal shared by
# the batch): the mean LUT softmax of up to PROPOSAL_ROWS rows of the batch, mixed with
# UNIFORM_FLOOR of the uniform distribution so that every class stays reachable
PROPOSAL_ROWS = 32
UNIFORM_FLOOR = 0.1


def vocab_parallel_sampled_softmax_loss(
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
    proposal: str = "lut",
    num_candidates: int = CANDIDATES_PER_ROW,
    lut_share: Optional[float] = None,
    lut_rows: Optional[int] = LUT_ROWS,
    draws: Optional[Tuple[Tensor, Tensor]] = None,
    tail_grad_rows: Optional[int] = None,
) -> Tensor:
    """Sampled-softmax cross-entropy over the whole vocabulary (every rank returns the same loss).

    The call starts with the header agreement (:mod:`torchaq.distributed.agreement`, targets'
    checksum included): a bad target or a NaN in ``h`` on one rank raises the same error on all.

    ``sampler="quantized"``, ``proposal="lut"`` (the default): the single-device layer's ``lut``
    proposal and control variate, split over the ranks (:mod:`torchaq.distributed.lut_loss`;
    ``num_candidates``, ``lut_share``, ``lut_rows`` as in
    :meth:`torchaq.QuantizedSoftmax.sampled_softmax_loss`; ``draws=(classes, log_pi)`` evaluates
    it for given global draws). ``proposal="shared"``: the stratified estimator below, with one
    proposal shared by the batch.

    ``loss = log Z_hat - l_t`` with ``Z_hat = sum_r Z_hat_r``: rank ``r`` estimates the mass of
    its slice as :mod:`torchaq.training.sampled_softmax` does on one device,

        Z_hat_r = [t in slice r] exp(l_t) + sum_{c in H_b^r, c != t} exp(l_c)
                  + (1 - Q_r(E_b^r)) / m'_r * sum_{kept draws s} exp(l_s) / Q_r(s),

    with ``H_b^r`` the row's ``num_hard`` LUT-best classes of the slice (the rank's own
    scan, quantized sampler), ``m_r`` draws from a proposal ``Q_r`` over the slice (draws
    that hit ``E_b^r = H_b^r u {t}`` are dropped, ``m'_r`` kept), and the ``num_sampled``
    draws split over ranks in proportion to the proposal's mass on each slice (at least one
    per rank; stratified sampling). Each ``Z_hat_r`` is unbiased for its slice's mass, so
    ``E[Z_hat] = Z``, the loss converges to the full cross-entropy as the draws grow, and
    equals it exactly when every class is in a hard set (``num_hard >= V_r``). The pieces
    are combined as ``logsumexp_r log Z_hat_r`` (all-reduce max, then sum) and ``l_t`` by an
    all-reduce of the owner's value (Megatron's ``vocab_parallel_cross_entropy``). Gradients
    flow to ``h`` (summed over ranks in backward) and to each rank's own slice.

    Proposals: ``"uniform"`` (``Q_r = 1 / V_r``, draws in proportion to ``V_r``),
    ``"unigram"`` (``class_counts`` is this rank's ``(V_r,)`` slice of the counts; draws in
    proportion to each slice's total count), ``"quantized"`` (``Q`` = 90% of the mean LUT
    softmax over up to ``PROPOSAL_ROWS`` evenly spaced rows of the batch + 10% uniform, the
    single-device proposal, restricted to each slice). ``generator`` drives this rank's
    draws. Communication: all-gathers of ``P`` floats (the allocation) and all-reduces of
    ``B`` and ``PROPOSAL_ROWS`` floats; no ``(B, V)`` tensor anywhere.

    ``tail_grad_rows`` (both proposals): as on one device, the weight gradient of each row's classes
    outside its exact set comes from the full softmax of that many random rows of the batch
    (:mod:`torchaq.distributed.tail_grad`; ``None``, the default: ``max(64, ceil(B / 32))`` rows;
    ``0``: from the draws).
    """
    def check():
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
        if proposal not in ("lut", "shared"):
            raise ValueError(f'proposal must be "lut" or "shared", got {proposal!r}')
        check_reduction(reduction)
        check_tail_grad_rows(tail_grad_rows)
        if not is_int(num_sampled) or not layer.world_size <= num_sampled:
            raise ValueError(f"num_sampled must be an integer >= the world size {layer.world_size} (one draw per rank at least), got {num_sampled!r}")
        if not is_int(num_hard) or num_hard < 0:
            raise ValueError(f"num_hard must be an integer >= 0, got {num_hard!r}")
        if lut_share is not None and (isinstance(lut_share, bool) or not isinstance(lut_share, (int, float)) or not 0 < lut_share <= 1):
            raise ValueError(f"lut_share must be a number in (0, 1], got {lut_share!r}")
        if sampler == "unigram" or (class_counts is not None and sampler == "quantized"):
            v_r = layer.local_classes
            if class_counts is None or not isinstance(class_counts, Tensor) or class_counts.shape != (v_r,):
                raise ValueError(f'sampler="unigram" needs class_counts: this rank\'s ({v_r},) slice of positive counts, got {getattr(class_counts, "shape", class_counts)}')
            if not bool(torch.isfinite(class_counts).all()) or bool((class_counts <= 0).any()):
                raise ValueError("class_counts must be finite and > 0 for every class (add-one smoothing helps)")

    layer.begin("sampled_softmax_loss", h, target=target, check=check)
    tail_grad_rows = check_tail_grad_rows(tail_grad_rows, target.numel())
    if sampler == "quantized" and proposal == "lut":
        flat = layer.local.flat_features(h)
        flat_target = target.reshape(-1).long().to(flat.device)
        base = None
        if class_counts is not None:
            counts = class_counts.double().to(flat.device)
            base = counts / reduce_sum(counts.sum().reshape(1), layer.group)
        loss, exact = vp_lut_loss(layer, flat, flat_target, num_sampled, int(num_hard), int(num_candidates),
                                  float(LUT_SHARE if lut_share is None else lut_share), base, remove_accidental_hits,
                                  generator, None if lut_rows is None else int(lut_rows), draws, tail_grad_rows == 0)
        loss = loss + vp_tail_weight_gradient(layer, flat, exact, int(tail_grad_rows), generator)
        return reduce_loss(loss, target, reduction)
    local, group = layer.local, layer.group
    flat = local.flat_features(h)
    device = flat.device
    flat_target = target.reshape(-1).long().to(device)
    batch, v_r = flat.shape[0], layer.local_classes
    start, stop = layer.vocab_range
    owned = (flat_target >= start) & (flat_target < stop)
    local_target = torch.where(owned, flat_target - start, torch.zeros_like(flat_target))

    # the proposal over this slice and its share of the global proposal's mass
    with torch.no_grad():
        hard = torch.zeros((batch, 0), dtype=torch.int64, device=device)
        if sampler == "uniform":
            proposal = torch.full((v_r,), 1.0 / v_r, device=device)
            mass = float(v_r)
        elif sampler == "unigram":
            counts = class_counts.double().to(device)
            proposal = (counts / counts.sum()).float()
            mass = float(counts.sum())
        else:
            lut = local.quantizer.lut(flat.detach().float())
            if num_hard:  # the slice's LUT-best rows plus its exact side list, counted exactly
                _, hard = local.scan(flat.detach(), min(num_hard, v_r))
                if local.side_rows.numel():
                    hard = torch.cat([hard, local.side_rows.expand(hard.shape[0], -1)], dim=1)
            rows = min(batch, PROPOSAL_ROWS)
            pick = torch.linspace(0, batch - 1, rows, device=device).round().long()
            scores = ops.lut_score(lut[pick], local.packed_codes, v_r, local.float_bias())  # (S, V_r)
            row_lse = torch.logsumexp(scores, dim=1)
            global_lse = parallel_logsumexp(row_lse, group)
            # global Q restricted to the slice: 0.9 mean_rows softmax_global + 0.1 / V
            q_slice = (1 - UNIFORM_FLOOR) * (scores - global_lse.unsqueeze(1)).exp().mean(0) + UNIFORM_FLOOR / layer.num_classes
            mass = float(q_slice.sum())  # = 0.9 mean_rows(share of the row's mass) + 0.1 V_r / V
            proposal = (q_slice / q_slice.sum()).float()
        # on the data's device: NCCL only moves device tensors
        masses = [torch.zeros(1, dtype=torch.float64, device=device) for _ in range(layer.world_size)]
        dist.all_gather(masses, torch.tensor([mass], dtype=torch.float64, device=device), group=group)
        draws = shard_sizes(num_sampled, [float(m) for m in masses])[layer.rank]
        draw_device = generator.device if generator is not None else device
        samples = torch.multinomial(proposal.to(draw_device), draws, replacement=True, generator=generator).to(device)

    hin = copy_to_parallel_region(flat, group) if torch.is_grad_enabled() and flat.requires_grad else flat
    piece = slice_log_mass(
        hin, local.weight, local.bias, local_target, owned, hard, samples, proposal, remove_accidental_hits,
        tail_grad_rows == 0,
    )
    log_z = parallel_logsumexp(piece, group)
    mine = exact_logits(hin, local.weight, local.bias, local_target.unsqueeze(1)).squeeze(1)
    target_logit = reduce_from_parallel_region(torch.where(owned, mine, torch.zeros_like(mine)), group)
    loss = log_z - target_logit
    if tail_grad_rows:
        exact = exact_sets(local_target, hard, owned)
        loss = loss + vp_tail_weight_gradient(layer, flat, exact, int(tail_grad_rows), generator)
    return reduce_loss(loss, target, reduction)


def reduce_sum(x: Tensor, group) -> Tensor:
    """All-reduce sum of a small tensor (no autograd)."""
    x = x.clone()
    if dist.get_world_size(group) > 1:
        dist.all_reduce(x, group=group)
    return x


def slice_log_mass(
    h: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    local_target: Tensor,
    owned: Tensor,
    hard: Tensor,
    samples: Tensor,
    proposal: Tensor,
    remove_accidental_hits: bool,
    draw_weight_grad: bool = True,
) -> Tensor:
    """``log Z_hat_r`` per row for one slice (local class ids; see ``sampled_softmax_loss``;
    ``draw_weight_grad=False``: the draws' logits pass gradient to ``h`` only).

    The exact terms are the owned target and the hard set (minus the target); the draws that
    land in ``E_b = H_b u {t if owned}`` are dropped for that row (``remove_accidental_hits=False``:
    only the hard set is excluded) and the kept ones weighted by ``(1 - Q(E_b)) / (m' Q(s))``.
    """
    batch = h.shape[0]
    (hard_logits, target_logit), draw_logits = class_logits(h, weight, bias, [hard, local_target.unsqueeze(1)], samples,
                                                            shared_weight_grad=draw_weight_grad)
    target_logit = target_logit.squeeze(1)
    hard_is_target = (hard == local_target.unsqueeze(1)) & owned.unsqueeze(1)
    # excluded classes per row, sorted, padded with -1 (never a class id)
    sentinel = torch.full_like(local_target, -1)
    excl_target = torch.where(owned, local_target, sentinel) if remove_accidental_hits else sentinel
    excluded = torch.cat([hard, excl_target.unsqueeze(1)], 1).sort(dim=1).values  # (B, n + 1)
    probe = samples.unsqueeze(0).expand(batch, -1).contiguous()
    pos = torch.searchsorted(excluded, probe).clamp_(max=excluded.shape[1] - 1)
    keep = excluded.gather(1, pos) != probe  # (B, m)
    # Q(E_b): hard set, plus the owned target when it is excluded and not already in the hard set
    q_excluded = proposal[hard].sum(1)
    if remove_accidental_hits:
        q_excluded = q_excluded + torch.where(owned & ~hard_is_target.any(1), proposal[local_target], torch.zeros_like(q_excluded))
    kept = keep.sum(1, keepdim=True).clamp_min(1)
    log_weight = (
        torch.log((1 - q_excluded).clamp_min(1e-12)).unsqueeze(1) - torch.log(kept.float()) - torch.log(proposal[samples]).unsqueeze(0)
    )
    terms = torch.cat(
        [
            target_logit.masked_fill(~owned, -math.inf).unsqueeze(1),
            hard_logits.masked_fill(hard_is_target, -math.inf),
            (draw_logits + log_weight).masked_fill(~keep, -math.inf),
        ],
        dim=1,
    )
    return torch.logsumexp(terms, dim=1)
