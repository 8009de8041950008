"""World-size-invariant candidates: the single-device :class:`torchaq.QuantizedSoftmax` answer, bit for bit, over a split vocabulary.

The single-device layer picks its candidates in steps whose every per-class number is a function
of the class alone -- the scan score (the LUT is the same on every rank: same codebooks, same
``h``), the int8 shortlist score, the exact logit (the re-score kernel computes each dot product
alone) -- and whose every choice is "the best ``n`` by (value descending, id ascending)". Rank
``r`` holds the contiguous ids ``[offset_r, offset_r + V_r)``, so rank order is id order and each
choice can be made from per-rank lists:

1. **scan** (round A): each rank scans its slice for its ``scan_k`` best (sorted, ties to the lower
   id; ``scan_k = min(candidates, V - S)`` with the global side list of ``S`` rows, the side rows
   pushed out of the scan under the single-device rule); one all-gather of those ``B scan_k``
   float scores per rank. A stable descending sort of the concatenation gives the global
   ``scan_k`` best, i.e. how many of its list each rank contributes (a prefix of it).
2. **re-score** (round B): each rank scores its share of the candidates plus its side rows
   (duplicates once) and sends its best:

   * :func:`invariant_topk` when :meth:`torchaq.QuantizedSoftmax.topk` uses its int8 shortlist
     (``C = scan_k + S > R``): its ``R`` best by int8 score (computed as the C++ kernel does:
     ``float(sum h16 w8) * (h_scale * row_scale) + bias``, exact integer sums), their exact
     logits, and its count of distinct candidates -- ``3 R + 1`` values per row; every rank then
     keeps the global ``R`` best by int8 score (or all, when there are at most ``R`` distinct) and
     their ``k`` best by exact logit;
   * otherwise (and for :meth:`log_softmax_topk` / :meth:`sample`, which re-score every
     candidate): its ``k`` best by exact logit, ``2 k`` values per row.

``log Z`` (:func:`torchaq.layer.partition.log_partition` with a ``comm``) sums fixed-point
integers, so it is bitwise the single-device value too (three more small collectives: a max of
``B`` floats, ``2 B`` int64 totals, ``B n`` sampled ratios).

Bytes per rank and call: round A ``4 B scan_k``, round B ``4 B (3 R + 1)`` or ``8 B k``, plus the
header (which carries round A when it fits); the cheaper per-rank mode (``invariant=False``) sends ``8 B k``.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

from torchaq import ops
from torchaq.layer.partition import log_partition, pointwise_logits
from torchaq.layer.side_list import SCAN_EXCLUDED
from torchaq.quantizers.pq import AnisotropicPQ

from torchaq.distributed.groups import all_gather_rows


def best_first(values: Tensor, ids: Tensor, n: int) -> Tuple[Tensor, Tensor]:
    """The ``n`` best per row by (value descending, id ascending): ``(values, ids)`` ``(B, n)``."""
    by_id = ids.argsort(dim=1, stable=True)
    values, ids = values.gather(1, by_id), ids.gather(1, by_id)
    order = values.argsort(dim=1, descending=True, stable=True)[:, :n]
    return values.gather(1, order), ids.gather(1, order)


def best_padded(values: Tensor, ids: Tensor, n: int, pad_id: int) -> Tuple[Tensor, Tensor]:
    """:func:`best_first`, padded to ``n`` columns (``-inf`` values, id ``pad_id``) when a row has fewer."""
    values, ids = best_first(values, ids, min(n, ids.shape[1]))
    short = n - ids.shape[1]
    if short > 0:
        values = torch.cat([values, values.new_full((values.shape[0], short), -math.inf)], 1)
        ids = torch.cat([ids, ids.new_full((ids.shape[0], short), pad_id)], 1)
    return values, ids


def _scan_bias(layer, exclude: bool) -> Optional[Tensor]:
    """The bias this rank's scan ranks with: the single-device layer's ``scan_bias`` restricted to the slice."""
    local = layer.local
    if not exclude:
        return local.float_bias()
    base = torch.zeros(layer.local_classes, device=local.weight.device) if local.bias is None else local.bias.detach().float()
    return base.index_fill(0, local.side_rows, SCAN_EXCLUDED)


def scan_share(layer, flat: Tensor, lut: Tensor, scan_k: int, exclude: bool, positions: bool = False,
               agreement=None):
    """Round A: this rank's scan classes (slice ids ``(B, c_r)``) and which of them are global candidates.

    ``positions=True`` also returns each class's place in the global ranking ``(B, c_r)`` (``scan_k``
    when not a candidate) and the global ``scan_k`` best scores ``(B, scan_k)``, sorted."""
    local = layer.local
    c_r = min(scan_k, layer.local_classes)
    scores, classes = ops.lut_topk(lut, local.packed_codes, layer.local_classes, c_r, _scan_bias(layer, exclude))
    padded = scores.new_full((flat.shape[0], scan_k), -math.inf)
    padded[:, :c_r] = scores
    # (P, B, scan_k); with the call's header agreement, which carries it when it is small
    every = all_gather_rows(padded, layer.group, layer.world_size) if agreement is None else agreement.gather(padded)
    joined = every.permute(1, 0, 2).reshape(flat.shape[0], -1)
    order = joined.argsort(dim=1, descending=True, stable=True)[:, :scan_k]
    owner = order // scan_k
    count = (owner == layer.rank).sum(1, keepdim=True)
    valid = torch.arange(c_r, device=flat.device).unsqueeze(0) < count
    if not positions:
        return classes, valid
    place = torch.full((flat.shape[0], scan_k + 1), scan_k, dtype=torch.int64, device=flat.device)
    slot = torch.where(owner == layer.rank, order % scan_k, scan_k)  # my entry at each global place
    place.scatter_(1, slot, torch.arange(scan_k, device=flat.device).expand_as(slot))
    return classes, valid, place[:, :c_r], joined.gather(1, order)


def _candidates(layer, classes: Tensor, valid: Tensor) -> Tuple[Tensor, Tensor]:
    """Scan share + this rank's side rows, slice ids ``(B, w)`` (``-1``: not a candidate or a repeat)."""
    side = layer.local.side_rows.to(classes.device)
    cand = classes.masked_fill(~valid, -1)
    if side.numel():
        repeat = (cand.unsqueeze(2) == side.view(1, 1, -1)).any(2)  # a side row the scan returned too
        cand = torch.cat([cand.masked_fill(repeat, -1), side.expand(cand.shape[0], -1)], 1)
    return cand, cand >= 0


def _exact(layer, flat: Tensor, cand: Tensor, ok: Tensor) -> Tensor:
    """Exact logits ``(B, w)`` of the slice ids ``cand`` (``-inf`` where not ``ok``)."""
    local = layer.local
    out = torch.full(cand.shape, -math.inf, device=flat.device)
    rows, cols = ok.nonzero(as_tuple=True)
    bias = None if local.bias is None else local.bias.detach()
    out[rows, cols] = pointwise_logits(flat[rows], local.weight.detach(), bias, cand[rows, cols])
    return out


def _int8_scores(layer, flat: Tensor, cand: Tensor, ok: Tensor, w8: Tensor, scale: Tensor) -> Tensor:
    """The int8 shortlist score of ``layer_topk``'s CPU kernel, bit for bit (``-inf`` where not ``ok``)."""
    d = flat.shape[1]
    limit = float(min(32767, ((1 << 31) - 1) // (127 * max(d, 1))))
    h = flat.float()
    mx = h.abs().amax(1)
    hs = torch.where(mx > 0, mx / limit, torch.ones_like(mx))
    inv = 1.0 / hs
    h16 = torch.round(h * inv.unsqueeze(1)).clamp(-limit, limit)
    safe = cand.clamp(min=0)
    # the integer sums sum_i h16_i w8_i, exactly, with float32 matrix products: h16 = 256 hi + lo with
    # lo in [0, 256), |hi| <= 128, so every partial sum over 512 dimensions stays below 2^24
    lo = torch.remainder(h16, 256.0)
    parts = torch.stack([(h16 - lo) / 256.0, lo], 2)  # (B, d, 2)
    isum = torch.zeros(cand.shape, dtype=torch.int64, device=flat.device)
    gathered = w8.index_select(0, safe.reshape(-1)).view(cand.shape[0], cand.shape[1], d)  # row copies
    for d0 in range(0, d, 512):
        rows = gathered[:, :, d0: d0 + 512].float()  # (B, w, <=512)
        both = torch.bmm(rows, parts[:, d0: d0 + 512]).to(torch.int64)  # exact integers
        isum += both[:, :, 0] * 256 + both[:, :, 1]
    v = isum.float() * (hs.unsqueeze(1) * scale[safe])
    if layer.local.bias is not None:
        v = v + layer.local.bias.detach().float()[safe]
    return v.masked_fill(~ok, -math.inf)


def _payload_gather(layer, parts) -> Tensor:
    """All-gather per-rank ``(B, w)`` int32 views of float / int parts: ``(B, P, w)``."""
    payload = torch.cat([p.contiguous().view(torch.int32) if p.dtype == torch.float32 else p.to(torch.int32)
                         for p in parts], 1)
    return all_gather_rows(payload, layer.group, layer.world_size).permute(1, 0, 2)


def invariant_topk(layer, flat: Tensor, k: int, candidates: int, agreement=None) -> Tuple[Tensor, Tensor]:
    """:meth:`torchaq.QuantizedSoftmax.topk` of the whole vocabulary (module docstring): ``(B, k)`` values, global ids."""
    local, num_side = layer.local, layer.num_side_rows
    scan_k = min(candidates, layer.num_classes - num_side)
    exclude = num_side > 0 and scan_k + num_side >= layer.num_classes
    lut = local.quantizer.lut(flat)
    classes, valid = scan_share(layer, flat, lut, scan_k, exclude, agreement=agreement)
    cand, ok = _candidates(layer, classes, valid)
    # the single-device fast path (and its int8 shortlist) is for PQ layers only
    w8, scale = local.shortlist_rows() if isinstance(local.quantizer, AnisotropicPQ) else (None, None)
    keep = local.shortlist_size(k)
    batch = flat.shape[0]
    if w8 is None or scan_k + num_side <= keep:
        exact = _exact(layer, flat, cand, ok)
        vals, ids = best_padded(exact, (cand + layer.offset).masked_fill(~ok, layer.num_classes), k, layer.num_classes)
        allp = _payload_gather(layer, [vals, ids])
        return best_first(allp[:, :, :k].contiguous().view(torch.float32).reshape(batch, -1),
                          allp[:, :, k:].long().reshape(batch, -1), k)
    score = _int8_scores(layer, flat, cand, ok, w8, scale)
    gid = (cand + layer.offset).masked_fill(~ok, layer.num_classes)
    s8, sid = best_padded(score, gid, keep, layer.num_classes)
    mine = sid < layer.num_classes
    local_ids = (sid - layer.offset).clamp(0, layer.local_classes - 1)
    exact = _exact(layer, flat, local_ids, mine)
    distinct = ok.sum(1, keepdim=True).to(torch.int32)
    allp = _payload_gather(layer, [s8, exact, sid, distinct])  # (B, P, 3 keep + 1)
    a8 = allp[:, :, :keep].contiguous().view(torch.float32).reshape(batch, -1)
    aex = allp[:, :, keep: 2 * keep].contiguous().view(torch.float32).reshape(batch, -1)
    aid = allp[:, :, 2 * keep: 3 * keep].long().reshape(batch, -1)
    total = allp[:, :, 3 * keep].sum(1)  # distinct candidates per row
    # rows with more than `keep` distinct candidates: the global `keep` best by int8 score go on
    by_id = aid.argsort(dim=1, stable=True)
    a8, aex, aid = a8.gather(1, by_id), aex.gather(1, by_id), aid.gather(1, by_id)
    order = a8.argsort(dim=1, descending=True, stable=True)
    rank_of = torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    shortlisted = (rank_of < keep) | (total <= keep).unsqueeze(1)
    aex = aex.masked_fill(~shortlisted | (aid >= layer.num_classes), -math.inf)
    return best_first(aex, aid, k)


class _Comm:
    """The ``comm`` of :func:`torchaq.layer.partition.log_partition` over the layer's group."""

    def __init__(self, layer):
        self.layer, self.rank = layer, layer.rank

    def max(self, x: Tensor) -> Tensor:
        x = x.clone()
        if self.layer.world_size > 1:
            dist.all_reduce(x, op=dist.ReduceOp.MAX, group=self.layer.group)
        return x

    def totals(self, x: Tensor) -> Tensor:
        return all_gather_rows(x, self.layer.group, self.layer.world_size)

    def merge_samples(self, x: Tensor) -> Tensor:
        return self.max(x)


def invariant_candidates(layer, flat: Tensor, k: int, candidates: int, with_log_z: bool, agreement=None):
    """The single-device ``candidate_logits`` path (``log_softmax_topk``, ``sample``): the ``k`` best
    ``(values, global ids)`` of every candidate, and ``log Z`` when asked (module docstring)."""
    local, num_side = layer.local, layer.num_side_rows
    scan_k = min(candidates, layer.num_classes - num_side)
    lut = local.quantizer.lut(flat)
    classes, valid = scan_share(layer, flat, lut, scan_k, num_side > 0, agreement=agreement)
    cand, ok = _candidates(layer, classes, valid)
    exact = _exact(layer, flat, cand, ok)
    batch = flat.shape[0]
    gid = (cand + layer.offset).masked_fill(~ok, layer.num_classes)
    vals, ids = best_padded(exact, gid, k, layer.num_classes)
    # the single-device layer keeps the best `candidates` of the scan_k + S re-scored classes: the
    # n worst (value ascending, id descending) are dropped to the rest, where they count by LUT score
    drop = max(0, scan_k + num_side - candidates) if with_log_z else 0
    parts = [vals, ids]
    if drop:
        low, low_ids = best_padded(-exact.masked_fill(~ok, math.inf), -gid.masked_fill(~ok, -1), drop, 1)
        parts += [low, low_ids]
    allp = _payload_gather(layer, parts)
    top_values, top_ids = best_first(allp[:, :, :k].contiguous().view(torch.float32).reshape(batch, -1),
                                     allp[:, :, k: 2 * k].long().reshape(batch, -1), k)
    if drop:
        _, dropped = best_first(allp[:, :, 2 * k: 2 * k + drop].contiguous().view(torch.float32).reshape(batch, -1),
                                allp[:, :, 2 * k + drop:].long().reshape(batch, -1), drop)
        ok = ok & ~(gid.unsqueeze(2) == (-dropped).unsqueeze(1)).any(2)
        exact = exact.masked_fill(~ok, -math.inf)
    log_z = None
    if with_log_z:
        approx = ops.lut_score(lut, local.packed_codes, layer.local_classes, local.float_bias())
        # a -inf column stands for "not a candidate here": it takes the scatter of the padding
        approx = torch.cat([approx, approx.new_full((batch, 1), -math.inf)], 1)
        cls = cand.masked_fill(~ok, layer.local_classes)
        bias = None if local.bias is None else local.bias.detach()
        log_z = log_partition(flat, local.weight.detach(), bias, exact, cls, approx, comm=_Comm(layer),
                              num_classes=layer.num_classes)
    return top_values, top_ids, log_z
