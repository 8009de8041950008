"""Joint anisotropic codebook update: the minimiser of the score-aware loss over all codebooks.

For fixed codes the loss of the whole data set is quadratic in the stacked codebooks ``C``
(Guo et al. 2020, section 4.2, "codebook update")::

    L(C) = sum_i (x_i - B_i C)^T W_i (x_i - B_i C),   W_i = I + (eta_i - 1) u_i u_i^T,   u_i = x_i / |x_i|

where ``B_i`` selects codeword ``c_im`` in every subspace (so ``B_i C = x~_i``), ``h_perp = 1`` and
``h_par = eta_i``. The minimiser solves the normal equations::

    (sum_i B_i^T W_i B_i) C = sum_i B_i^T W_i x_i = sum_i eta_i B_i^T x_i

The matrix is block-diagonal codeword counts plus a sum of rank-one terms that couple all
subspaces (``r_par`` involves every subspace), far too large to form for real sizes
(``(M K dsub)^2``). We solve it matrix-free with preconditioned conjugate gradients: applying
the matrix is one decode plus one scatter-add over the data (``torch.ops.torchaq.anisotropic_normal_apply``), and the Jacobi preconditioner is
its exact diagonal. ScaNN itself only runs per-subspace k-means and applies the anisotropic
loss at encoding time; this joint update is where we improve on it.
"""
from __future__ import annotations

import torch
from torch import Tensor

from torchaq import ops

CG_MAX_ITERS = 50
CG_TOL = 1e-5


class _NormalEquations:
    """``A C = b`` of the joint update for fixed codes; ``C`` is ``(M, K, dsub)``."""

    def __init__(self, x: Tensor, codes: Tensor, eta: Tensor, num_codewords: int):
        n, m = codes.shape
        self.x, self.m, self.k = x, m, num_codewords
        self.dsub = x.shape[1] // m
        x_sq = torch.linalg.vector_norm(x, dim=1) ** 2
        # coef_i = (eta_i - 1) / |x_i|^2, so that (eta - 1) <u, v> u = coef <x, v> x; zero rows: 0
        self.coef = torch.where(x_sq > 0, (eta - 1) / x_sq.clamp_min(1e-30), torch.zeros_like(x_sq)).float()
        # the product reads the codes once per CG iteration: one byte each when they fit
        self.codes = codes.to(torch.uint8) if num_codewords <= 256 else codes.long()
        # b and the exact diagonal of A (sum over the points using codeword j of 1 + coef x_{m,t}^2)
        self.rhs, diag = ops.anisotropic_normal_rhs(x, self.codes, eta.float().contiguous(), self.coef, num_codewords)
        self.diag = torch.where(diag > 0, diag, torch.ones_like(diag))

    def apply(self, c: Tensor) -> Tensor:
        """``A c = sum_i B_i^T (x~_i + coef_i <x_i, x~_i> x_i)`` with ``x~_i = B_i c``
        (``torch.ops.torchaq.anisotropic_normal_apply``: C++ on CPU, :mod:`torchaq.ops.normal_apply`'s
        reference elsewhere)."""
        return ops.anisotropic_normal_apply(self.x, self.codes, self.coef, c.contiguous())


def _dot(a: Tensor, b: Tensor) -> float:
    return float((a.double() * b.double()).sum())


def joint_codebook_update(
    x: Tensor,
    codes: Tensor,
    eta: Tensor,
    codebooks: Tensor,
    max_iters: int = CG_MAX_ITERS,
    tol: float = CG_TOL,
) -> Tensor:
    """Codebooks minimising the total score-aware loss for fixed ``codes`` (preconditioned CG).

    Warm-started from ``codebooks``; every CG iterate lowers the (convex quadratic) loss, so the
    result is never worse than the start. Codewords that no point uses keep their value.

    Args:
        x: ``(N, D)`` float32 datapoints (``D = M * dsub``).
        codes: ``(N, M)`` int64 codes.
        eta: ``(N,)`` per-point ``h_par / h_perp``.
        codebooks: ``(M, K, dsub)`` starting point.
    Returns:
        ``(M, K, dsub)`` float32 codebooks.
    """
    system = _NormalEquations(x, codes, eta, codebooks.shape[1])
    sol = codebooks.clone()
    resid = system.rhs - system.apply(sol)
    precond = resid / system.diag
    direction = precond.clone()
    rz = _dot(resid, precond)
    rhs_norm = max(_dot(system.rhs, system.rhs) ** 0.5, 1e-30)
    for _ in range(max_iters):
        if _dot(resid, resid) ** 0.5 <= tol * rhs_norm:
            break
        a_dir = system.apply(direction)
        curvature = _dot(direction, a_dir)
        if curvature <= 0:  # only unused codewords left in the direction: nothing to improve
            break
        alpha = rz / curvature
        sol += alpha * direction
        resid -= alpha * a_dir
        precond = resid / system.diag
        rz_new = _dot(resid, precond)
        direction = precond + (rz_new / rz) * direction
        rz = rz_new
    return sol
