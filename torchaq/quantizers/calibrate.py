"""Query calibration: choose the anisotropy from sample queries instead of the sphere formula.

The paper's ``eta(T, d, |x|)`` assumes queries uniform on the unit sphere. Real queries (the
hidden states of a model) live in a subspace of far lower effective dimension, and on such data
the formula's setting can be *worse* than isotropic PQ: the parallel residual it protects is not
where real queries' score errors come from (``benchmarks/quality.py`` compares the threshold rule,
isotropic and calibrated fits on real hidden states). Given sample
queries we therefore pick the anisotropy rule that maximises retrieval recall of the exact top-k
on held-out queries, with isotropic (``eta = 1``) always among the candidates, so the result is
never worse than isotropic on the selection slice; :class:`torchaq.AnisotropicPQ` then checks the
final fit on a second, disjoint slice and falls back to isotropic if it lost there.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from torchaq import ops

# Constant-eta candidates tried besides isotropic and the user's own rule. eta is the weight of
# the parallel residual relative to the perpendicular one; the sphere formula gives ~4 at
# T = 0.2, d = 100 and grows linearly with d, which real queries do not justify.
ETA_GRID = (1.25, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0)
RECALL_K = 10
RECALL_CANDIDATES = 100


@dataclass(frozen=True)
class AnisotropyRule:
    """How a row's ``eta`` is set: ``"isotropic"`` (1), ``"eta"`` (a constant) or ``"threshold"``
    (the paper's per-row formula ``eta(T, d, |x|)``)."""

    kind: str
    value: Optional[float] = None

    def __str__(self) -> str:
        return self.kind if self.value is None else f"{self.kind}={self.value:g}"


def candidate_rules(user_rule: AnisotropyRule) -> List[AnisotropyRule]:
    """Isotropic, the user's rule, and the constant-eta grid (without repeats)."""
    rules = [AnisotropyRule("isotropic"), user_rule] + [AnisotropyRule("eta", v) for v in ETA_GRID]
    seen, out = set(), []
    for rule in rules:
        if rule not in seen:
            seen.add(rule)
            out.append(rule)
    return out


def exact_top(queries: Tensor, database: Tensor, k: int = RECALL_K) -> Tensor:
    """Indices ``(B, k)`` of the exact inner-product top-``k`` (computed once per slice, reused per rule)."""
    return (queries @ database.T).topk(min(k, database.shape[0]), dim=1).indices


def successive_halving(
    rules: List[AnisotropyRule],
    train: Callable[[AnisotropyRule, Optional[Tensor], int], Tensor],
    score: Callable[[AnisotropyRule, Tensor], float],
    iso_codebooks: Tensor,
) -> Tuple[AnisotropyRule, Tensor, int, Dict[str, float]]:
    """Successive halving over the candidate rules (Jamieson & Talwalkar 2016; Karnin et al. 2013).

    ``rules[0]`` is isotropic, already trained (``iso_codebooks``). Each stage gives every
    surviving candidate one more alternation (``train(rule, codebooks or None, 1)``) and scores it;
    candidates below isotropic are dropped (early stopping), and of the rest the better half
    survives, until one is left. With ``c`` candidates this costs about ``2 c`` alternations
    (``c + c/2 + ...``) instead of ``rounds * c``.

    Returns ``(winner, its codebooks, alternations it got, {rule: last score})``; the winner is
    isotropic when no candidate ever scored above it, so its score is never below isotropic's.
    """
    iso = rules[0]
    scores = {str(iso): score(iso, iso_codebooks)}
    alive: Dict[AnisotropyRule, Optional[Tensor]] = {rule: None for rule in rules[1:]}
    rounds = 0
    while alive:
        rounds += 1
        for rule in list(alive):
            alive[rule] = train(rule, alive[rule], 1)
            scores[str(rule)] = score(rule, alive[rule])
        ranked = sorted((r for r in alive if scores[str(r)] > scores[str(iso)]), key=lambda r: -scores[str(r)])
        if len(ranked) <= 1:
            if not ranked:
                return iso, iso_codebooks, 0, scores
            return ranked[0], alive[ranked[0]], rounds, scores
        alive = {rule: alive[rule] for rule in ranked[: (len(ranked) + 1) // 2]}
    return iso, iso_codebooks, 0, scores


def retrieval_recall(
    queries: Tensor,
    database: Tensor,
    codes: Tensor,
    codebooks: Tensor,
    k: int = RECALL_K,
    candidates: int = RECALL_CANDIDATES,
    exact: Optional[Tensor] = None,
) -> float:
    """Recall of the exact inner-product top-``k`` in the approximate top-``k`` and top-``candidates``, averaged.

    ``0.5 * (recall k@k + recall k@candidates)``: the first is what the LUT ranking gives alone,
    the second what an exact re-rank of the candidates can recover.

    Args:
        queries: ``(B, D)`` (already padded like ``database``).
        database: ``(N, D)`` the exact rows.
        codes: ``(N, M)`` codes of the rows; ``codebooks``: ``(M, K, dsub)``.
        exact: optional precomputed :func:`exact_top` of ``queries`` (saves ``O(B N D)`` per call).

    The approximate ranking is :func:`torchaq.ops.lut_topk` (what the layer's search runs: on
    CPU a SIMD scan over quantized tables), ``O(B N M)``.
    """
    n = database.shape[0]
    k, candidates = min(k, n), min(candidates, n)
    if exact is None:
        exact = exact_top(queries, database, k)
    lut = ops.compute_lut(queries, codebooks)
    packed = ops.pack_codes(codes.to(torch.uint8), ops.BITS_OF_K[codebooks.shape[1]])
    top = ops.lut_topk(lut, packed, n, candidates)[1]
    hit_k = (exact.unsqueeze(2) == top[:, :k].unsqueeze(1)).any(2).float().mean()
    hit_c = (exact.unsqueeze(2) == top.unsqueeze(1)).any(2).float().mean()
    return 0.5 * float(hit_k + hit_c)
