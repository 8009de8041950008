"""Proposals of the sampled softmax: which classes a batch draws, and with what probability.

* :func:`shared_draws`: ``num_sampled`` draws from one proposal ``Q`` over ``V`` classes,
  de-duplicated, with each drawn class's inclusion probability ``pi(c) = 1 - (1 - Q(c))^m``;
* :class:`RowProposals` / :func:`row_proposals`: per-row proposals read off a
  :class:`torchaq.QuantizedSoftmax`'s LUT scan (hard set + tail candidates + a floor), shared by
  the batch with the balance heuristic (:mod:`torchaq.training.sampled_softmax` has the math);
* :func:`unigram_proposal` (class frequencies) and :func:`excluded_mask` (which drawn classes a
  row must not count: its hard set, its target).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

# default number of LUT top classes of each row counted exactly (its hard set H_b): the batch
# gradient's error at 512 draws reaches the target only from here up (sampled_softmax_quality.txt)
HARD_PER_ROW = 96
# default number of LUT top classes per row (hard set + tail candidates) read by the scan
CANDIDATES_PER_ROW = 192
# share alpha of a row's proposal on its tail candidates (the rest is uniform over V)
CANDIDATE_SHARE = 0.5


def unigram_proposal(class_counts: Tensor, num_classes: int) -> Tensor:
    """``Q(c) = counts[c] / sum(counts)`` after checking the counts (float64 ``(V,)``)."""
    if not isinstance(class_counts, Tensor) or class_counts.shape != (num_classes,):
        raise ValueError(f"class_counts must be a ({num_classes},) tensor, got {getattr(class_counts, 'shape', class_counts)}")
    counts = class_counts.double()
    if not bool(torch.isfinite(counts).all()) or bool((counts <= 0).any()):
        raise ValueError("class_counts must be finite and > 0 for every class (add-one smoothing helps)")
    return counts / counts.sum()


def log_inclusion(log_miss: Tensor) -> Tensor:
    """``log pi = log(1 - exp(log_miss))`` where ``log_miss = log P(c not drawn)`` (< 0)."""
    return torch.log(-torch.expm1(log_miss.clamp(max=-1e-300)))


def shared_draws(proposal: Tensor, num_sampled: int, generator: Optional[torch.Generator] = None) -> Tuple[Tensor, Tensor]:
    """``m`` draws with replacement from ``Q`` ``(V,)``: the distinct classes ``U`` (sorted) and ``log pi(U)``.

    ``pi(c) = 1 - (1 - Q(c))^m``: the probability that ``c`` is drawn at least once.
    """
    device = proposal.device
    draw_device = generator.device if generator is not None else device
    samples = torch.multinomial(proposal.float().to(draw_device), num_sampled, replacement=True, generator=generator)
    classes = torch.unique(samples.to(device))
    log_miss = num_sampled * torch.log1p(-proposal.double()[classes])
    return classes, log_inclusion(log_miss)


class RowProposals:
    """Per-row proposals ``Q_b`` from the LUT scan (module docstring): hard sets, tail candidates, their log-probabilities.

    ``values`` / ``indices``: ``(B, C)`` LUT scores and classes, best first (``ops.lut_topk``).
    """

    def __init__(self, values: Tensor, indices: Tensor, num_hard: int, num_classes: int, share: float = CANDIDATE_SHARE,
                 base: Optional[Tensor] = None, side_rows: Optional[Tensor] = None):
        self.num_classes = num_classes
        self.hard = indices[:, :num_hard]
        if side_rows is not None and side_rows.numel():
            # the layer's exact side list (rows the codes cannot represent) joins every hard set; the
            # scan never returns those rows, so the hard set stays distinct and disjoint from the tail
            self.hard = torch.cat([self.hard, side_rows.to(indices.device).expand(indices.shape[0], -1)], dim=1)
        self.tail = indices[:, num_hard:]
        self.tail_scores = values[:, num_hard:].float()
        self.share = share if self.tail.shape[1] else 0.0
        # the floor (1 - alpha) * base(c): uniform, or a given distribution (e.g. the unigram)
        self.base = base.double() if base is not None else None
        self.floor = (1.0 - self.share) * (self.base if base is not None else
                                           torch.full((num_classes,), 1.0 / num_classes, dtype=torch.float64,
                                                      device=indices.device))
        # component probability of the tail candidates, without the floor: alpha e^s / sum e^s
        self.tail_logq = math.log(max(self.share, 1e-300)) + torch.log_softmax(self.tail_scores.double(), dim=1)

    def prob(self, rows: Tensor, classes: Tensor) -> Tensor:
        """``Q_b(c)`` (float64) for ``classes`` ``(R, n)`` of the rows ``rows`` ``(R,)``."""
        q = self.floor[classes]
        if self.tail.shape[1]:
            tail = self.tail[rows]
            order = tail.argsort(dim=1)
            sorted_tail = tail.gather(1, order)
            pos = torch.searchsorted(sorted_tail, classes.contiguous()).clamp_(max=tail.shape[1] - 1)
            hit = sorted_tail.gather(1, pos) == classes
            logq = self.tail_logq[rows].gather(1, order.gather(1, pos))
            q = q + torch.where(hit, logq.exp(), 0.0)
        return q

    def draw(self, counts: Tensor, generator: Optional[torch.Generator]) -> Tuple[Tensor, Tensor]:
        """``counts[k]`` draws from each row's ``Q_k``: ``(samples, owner)``, both ``(sum counts,)``."""
        device = self.tail.device
        draw_device = generator.device if generator is not None else device
        owner = torch.repeat_interleave(torch.arange(len(counts), device=device), counts)
        total = int(owner.numel())
        u = torch.rand(total, generator=generator, device=draw_device).to(device)
        pick = torch.rand(total, generator=generator, device=draw_device).to(device)
        if self.base is None:
            samples = torch.randint(0, self.num_classes, (total,), generator=generator, device=draw_device).to(device)
        else:
            samples = torch.multinomial(self.base.float().to(draw_device), total, replacement=True,
                                        generator=generator).to(device)
        if self.tail.shape[1]:
            cdf = self.tail_logq.exp().cumsum(1) / self.share  # per-row CDF of the tail component
            idx = torch.searchsorted(cdf[owner], (u * cdf[owner, -1]).unsqueeze(1)).squeeze(1)
            idx = idx.clamp_(max=self.tail.shape[1] - 1)
            samples = torch.where(pick < self.share, self.tail[owner, idx], samples)
        return samples, owner

    def shared_draws(self, num_sampled: int, generator: Optional[torch.Generator] = None) -> Tuple[Tensor, Tensor]:
        """Balance-heuristic draws (``n_k`` from each ``Q_k``): the distinct classes ``U`` and ``log pi(U)``.

        ``log P(c not in U) = sum_k n_k log(1 - Q_k(c))``: the floor's part is the same for
        every class; each row's tail candidates add their own correction (a scatter-add over
        the ``B x |T|`` candidates, no ``(B, |U|)`` search).
        """
        batch, device = self.tail.shape[0], self.tail.device
        counts = self._counts(batch, num_sampled, generator)
        samples, _ = self.draw(counts, generator)
        classes = torch.unique(samples)
        log_floor = torch.log1p(-self.floor.clamp(max=1 - 1e-15))
        log_miss = num_sampled * log_floor
        if self.tail.shape[1]:
            floor_tail = self.floor[self.tail]
            q = self.tail_logq.exp() + floor_tail
            delta = counts.unsqueeze(1).double().to(device) * (torch.log1p(-q.clamp(max=1 - 1e-15)) - log_floor[self.tail])
            log_miss.index_add_(0, self.tail.reshape(-1), delta.reshape(-1))
        return classes, log_inclusion(log_miss[classes])

    @staticmethod
    def _counts(batch: int, num_sampled: int, generator: Optional[torch.Generator]) -> Tensor:
        base, extra = divmod(num_sampled, batch)
        counts = torch.full((batch,), base, dtype=torch.int64)
        if extra:
            counts[random_rows(batch, extra, generator)] += 1
        return counts


def cpu_generator(generator: Optional[torch.Generator]) -> Optional[torch.Generator]:
    """``generator`` where it can drive a CPU draw (a CPU generator), else None (the global CPU generator)."""
    return generator if generator is not None and generator.device.type == "cpu" else None


def random_rows(batch: int, count: int, generator: Optional[torch.Generator] = None,
                device: Optional[torch.device] = None) -> Tensor:
    """``count`` distinct indices of ``range(batch)`` in random order, drawn on the CPU
    (:func:`cpu_generator`) and moved to ``device``."""
    rows = torch.randperm(batch, generator=cpu_generator(generator))[:count]
    return rows if device is None else rows.to(device)


def excluded_mask(classes: Tensor, excluded: Tensor) -> Tensor:
    """``(B, |U|)`` bool: ``classes[j]`` (sorted, distinct) is in row ``b``'s ``excluded`` set ``(B, e)``."""
    batch, size = excluded.shape[0], classes.numel()
    mask = torch.zeros((batch, size + 1), dtype=torch.bool, device=classes.device)  # last column: not drawn
    if size and excluded.shape[1]:
        pos = torch.searchsorted(classes, excluded).clamp_(max=size - 1)
        mask.scatter_(1, torch.where(classes[pos] == excluded, pos, size), True)
    return mask[:, :size]



def row_proposals(layer, flat: Tensor, num_hard: int = HARD_PER_ROW, num_candidates: int = CANDIDATES_PER_ROW,
                  share: float = CANDIDATE_SHARE, base: Optional[Tensor] = None) -> RowProposals:
    """The per-row proposals of ``layer`` (a :class:`torchaq.QuantizedSoftmax`) for rows ``flat`` ``(B, d)``: one ``lut_topk`` scan."""
    num_classes = layer.num_classes
    candidates = min(num_classes, max(num_candidates, num_hard, 1))
    with torch.no_grad():
        values, indices = layer.scan(flat.detach(), candidates)
    return RowProposals(values, indices, min(num_hard, indices.shape[1]), num_classes, share, base, layer.side_rows)
