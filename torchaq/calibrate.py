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
from typing import List, Optional

import torch
from torch import Tensor

from . import ops

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


def retrieval_recall(
    queries: Tensor,
    database: Tensor,
    codes: Tensor,
    codebooks: Tensor,
    k: int = RECALL_K,
    candidates: int = RECALL_CANDIDATES,
) -> float:
    """Recall of the exact inner-product top-``k`` in the approximate top-``k`` and top-``candidates``, averaged.

    ``0.5 * (recall k@k + recall k@candidates)``: the first is what the LUT ranking gives alone,
    the second what an exact re-rank of the candidates can recover.

    Args:
        queries: ``(B, D)`` (already padded like ``database``).
        database: ``(N, D)`` the exact rows.
        codes: ``(N, M)`` codes of the rows; ``codebooks``: ``(M, K, dsub)``.
    """
    n = database.shape[0]
    k, candidates = min(k, n), min(candidates, n)
    exact = (queries @ database.T).topk(k, dim=1).indices
    lut = ops.compute_lut(queries, codebooks)
    approx = ops.lut_score(lut, ops.pack_codes(codes.to(torch.uint8), ops.BITS_OF_K[codebooks.shape[1]]), n)
    top = approx.topk(candidates, dim=1).indices
    hit_k = (exact.unsqueeze(2) == top[:, :k].unsqueeze(1)).any(2).float().mean()
    hit_c = (exact.unsqueeze(2) == top.unsqueeze(1)).any(2).float().mean()
    return 0.5 * float(hit_k + hit_c)
