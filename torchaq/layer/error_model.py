"""The LUT score's error model: the scale of ``<h, x_i> - <h, x~_i>`` for each class.

The sampler's tail bound (:mod:`torchaq.layer.exact_sampling`) needs, for every class, the scale
of its score error ``e_i = <h, r_i>`` (``r_i = x_i - x~_i``, ``x~_i`` the decoded code). Were
``r_i``'s direction unrelated to the query's, ``e_i / (|h| |r_i|)`` would behave like ``N(0, 1/d)``
and the scale would be ``|r_i| / sqrt(d)``. That holds on the MiniLM table with real states, but
not where residuals lean toward the directions queries use: on a low-rank Llama-3-shaped head
(``d = 4096``, queries in the rows' subspace) some classes' errors are several times that scale
and the bound failed far above its nominal rate (``benchmarks/results/sampling_llm_llama.txt``).

**Model.** Queries are taken to share the second moment of the rows' directions,
``S = E[x^ x^T]`` (``x^ = x / |x|``, trace 1), estimated as rank ``k`` plus isotropic:
``S ~= U diag(lam) U^T + c (I - U U^T)``, ``c = (1 - sum lam) / (d - k)``, from at most
``ERROR_SAMPLE_ROWS`` rows by a seeded randomized subspace iteration (:func:`fit_error_model`).
For a query with that second moment ``Var(e_i) = |h|^2 r_i^T S r_i``, so the error scale of class
``i`` is

    ``rho_i = max(|r_i| / sqrt(d), sqrt(c |r_i|^2 + sum_j (lam_j - c) <u_j, r_i>^2))``

(:func:`error_scales`): the larger of the isotropic model and the row-subspace model, so the bound
is never narrower than the isotropic one where queries are unlike rows. The sampler's bound is
``z |h| rho_i``; ``benchmarks/sampling.py`` and ``benchmarks/sampling_llm.py`` measure the
quantiles of ``e_i / (|h| rho_i)`` against ``N(0, 1)`` and count the bound's failures.

Cost: ``O(n d k)`` for the subspace (``n`` sampled rows) at a full re-encode, ``O(V d k)`` for the
scales (``O(m d k)`` for the ``m`` rows an incremental refresh re-encodes); ``V`` floats kept.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

ERROR_RANK = 64              # directions of the row subspace modelled exactly (at most d / 4)
ERROR_SAMPLE_ROWS = 4096     # rows sampled (seeded) to estimate them
SUBSPACE_ITERS = 3           # power iterations of the randomized range finder
OVERSAMPLE = 8               # extra directions the range finder carries


class ErrorModel(NamedTuple):
    """``S ~= U diag(lam) U^T + c (I - U U^T)`` as ``directions`` ``U`` ``(d, k)``, ``excess``
    ``lam - c`` ``(k,)`` and ``floor`` ``c`` (a 0-d tensor), float32 on the weight's device."""

    directions: Tensor
    excess: Tensor
    floor: Tensor

    def to(self, device) -> "ErrorModel":
        return ErrorModel(*(t.to(device) for t in self))


@torch.no_grad()
def fit_error_model(weight: Tensor, rank: int = ERROR_RANK, sample_rows: int = ERROR_SAMPLE_ROWS) -> ErrorModel:
    """The row-direction second moment of ``weight`` ``(V, d)`` (module docstring), from at most
    ``sample_rows`` rows with a non-zero finite norm (a seeded choice: the same model for the same
    weight). Cost ``O(n d k)``."""
    w = weight.detach()
    d = w.shape[1]
    k = max(1, min(rank, d // 4))
    gen = torch.Generator().manual_seed(0x5CA1E)
    norms = w.float().norm(dim=1)
    usable = ((norms > 0) & torch.isfinite(norms)).nonzero().squeeze(1).cpu()
    if usable.numel() == 0:  # no direction to learn: the isotropic model alone
        return ErrorModel(w.new_zeros((d, k), dtype=torch.float32), w.new_zeros(k, dtype=torch.float32),
                          torch.tensor(1.0 / d, device=w.device))
    pick = usable[torch.randperm(usable.numel(), generator=gen)[:sample_rows]].to(w.device)
    x = w[pick].float() / norms[pick].unsqueeze(1)
    # randomized subspace iteration on S = x^T x / n (never formed: d x d is 64 MB at d = 4096)
    q = torch.randn(d, min(d, k + OVERSAMPLE), generator=gen).to(w.device)
    for _ in range(SUBSPACE_ITERS):
        q = torch.linalg.qr(x.T @ (x @ q)).Q
    b = x @ q
    lam, vec = torch.linalg.eigh(b.T @ b / x.shape[0])  # ascending
    lam, directions = lam[-k:].clamp_min(0.0), q @ vec[:, -k:]
    floor = ((1.0 - lam.sum()) / (d - k)).clamp_min(0.0) if d > k else lam.new_zeros(())
    # an eigenvalue below the isotropic rest (rare) is modelled as the rest: wider, never narrower
    return ErrorModel(directions.contiguous(), (lam - floor).clamp_min(0.0), floor)


def error_scales(residuals: Tensor, residual_norms: Tensor, model: ErrorModel) -> Tensor:
    """``rho_i`` ``(n,)`` float32 of residual rows ``residuals`` ``(n, d)`` whose norms are ``residual_norms``
    (module docstring): ``max(|r| / sqrt(d), sqrt(c |r|^2 + sum_j (lam_j - c) <u_j, r>^2))``. Cost ``O(n d k)``."""
    d = residuals.shape[1]
    iso = residual_norms.float() / math.sqrt(d)
    if residuals.shape[0] == 0:
        return iso
    model = model.to(residuals.device)
    # the projections of huge rows can overflow float32: their scale is then inf (side rows take them)
    proj = residuals.float() @ model.directions
    along = model.floor * residual_norms.float().square() + (proj.square() * model.excess).sum(dim=1)
    return torch.maximum(iso, along.clamp_min(0.0).sqrt())
