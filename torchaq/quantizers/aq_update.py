"""Joint codebook update of additive quantization under the score-aware loss.

For fixed codes ``c`` an additive code decodes as ``x~_i = b_i^T C`` with ``C`` the ``(M K, d)``
stack of all codewords and ``b_i`` the 0/1 vector selecting one codeword per codebook (so ``B``,
``(N, M K)``, has ``M`` ones per row). The total score-aware loss (Guo et al., ICML 2020; the
weight ``W_i = I + (eta_i - 1) u_i u_i^T``, ``u_i = x_i / |x_i|``)::

    L(C) = sum_i (x_i - b_i^T C) W_i (x_i - b_i^T C)^T

is a convex quadratic in all codebooks at once (the same problem as the PQ update in
:mod:`torchaq.quantizers.codebook_update`, except that the decode is a sum of codewords instead of a
concatenation, so the codebooks are coupled through ``B^T B`` as well). Its normal equations::

    B^T B C + sum_i (eta_i - 1) b_i (b_i^T C u_i) u_i^T = B^T (eta * X)          (W_i x_i = eta_i x_i)

Isotropic (``eta = 1``) this is LSQ's least-squares step (Martinez et al., ECCV 2016),
``C = (B^T B)^-1 B^T X``: ``B^T B`` is only ``(M K)^2`` (codeword co-occurrence counts), factored once
by Cholesky. With anisotropy the rank-one terms couple the columns; we solve by conjugate
gradients preconditioned by that same factor (exact when ``eta = 1``, so few iterations are
needed when ``eta`` is moderate), warm-started from the current codebooks.

``B^T B`` is singular (adding ``v`` to every codeword of one codebook and subtracting it from
another changes no decode), so both solves minimise ``L(C) + ridge |C|^2`` with a tiny ridge: it
picks the smallest of the equivalent solutions (and sends unused codewords to zero). The ridge
must be in the CG operator too, not only in its preconditioner: without it the iterations drift
along the null space, and over a few warm-started updates the codewords grow until float32 can no
longer represent their sum.

Cost: ``O(N M^2)`` to count co-occurrences, ``O((M K)^3)`` to factor, ``O(N M d + (M K)^2 d)``
per CG iteration (sparse decode, sparse scatter, triangular solves).
"""
from __future__ import annotations

import warnings

import torch
from torch import Tensor

# CG iterations of the anisotropic update, and its relative residual tolerance
CG_MAX_ITERS = 15
CG_TOL = 1e-4
# ridge added to B^T B, relative to its mean diagonal
RIDGE = 1e-5
# int64 elements of one chunk of co-occurrence keys
PAIR_CHUNK = 1 << 24


def _slots(codes: Tensor, k: int) -> Tensor:
    return codes + torch.arange(codes.shape[1], device=codes.device) * k


def cooccurrence(codes: Tensor, k: int) -> Tensor:
    """``B^T B``: ``(M K, M K)`` float64 counts of rows using codeword ``a`` and codeword ``b``."""
    n, m = codes.shape
    mk = m * k
    slots = _slots(codes, k)
    out = torch.zeros(mk * mk, dtype=torch.float64, device=codes.device)
    step = max(1, PAIR_CHUNK // (m * m))
    for start in range(0, n, step):
        s = slots[start:start + step]
        keys = (s.unsqueeze(2) * mk + s.unsqueeze(1)).reshape(-1)
        out += torch.bincount(keys, minlength=mk * mk).to(torch.float64)
    return out.reshape(mk, mk)


class _Selection:
    """``B`` and ``B^T`` as sparse CSR matrices."""

    def __init__(self, codes: Tensor, k: int):
        n, m = codes.shape
        self.mk = m * k
        slots = _slots(codes, k).reshape(-1)
        rows = torch.arange(n, device=codes.device).repeat_interleave(m)
        ones = torch.ones(n * m, dtype=torch.float32, device=codes.device)
        with warnings.catch_warnings():  # "sparse CSR support is in beta": we use only CSR @ dense
            warnings.simplefilter("ignore", UserWarning)
            self.b = torch.sparse_coo_tensor(torch.stack([rows, slots]), ones, (n, self.mk),
                                             check_invariants=False).coalesce().to_sparse_csr()
            self.bt = torch.sparse_coo_tensor(torch.stack([slots, rows]), ones, (self.mk, n),
                                              check_invariants=False).coalesce().to_sparse_csr()

    def decode(self, c: Tensor) -> Tensor:
        """``B C``: ``(N, d)``."""
        return self.b @ c

    def scatter(self, v: Tensor) -> Tensor:
        """``B^T V``: ``(M K, d)``."""
        return self.bt @ v


def aq_codebook_update(x: Tensor, codes: Tensor, eta: Tensor, codebooks: Tensor,
                       max_iters: int = CG_MAX_ITERS, tol: float = CG_TOL) -> Tensor:
    """Codebooks ``(M, K, d)`` minimising the total score-aware loss of ``x`` for fixed ``codes``.

    Args:
        x: ``(N, d)`` float32 rows.
        codes: ``(N, M)`` int64 codes.
        eta: ``(N,)`` float32 per-row ``h_par / h_perp``.
        codebooks: ``(M, K, d)`` float32, the warm start of the anisotropic CG (the isotropic
            solve is direct and does not need it).
    """
    m, k, d = codebooks.shape
    gram = cooccurrence(codes, k)
    ridge = RIDGE * float(gram.diagonal().mean().clamp_min(1.0))
    factor = torch.linalg.cholesky(gram + ridge * torch.eye(m * k, dtype=torch.float64, device=x.device))
    sel = _Selection(codes, k)
    rhs = sel.scatter(eta.unsqueeze(1) * x)  # (MK, d)
    iso = torch.cholesky_solve(rhs.double(), factor).float()
    a = (eta - 1).unsqueeze(1)
    if not bool((a != 0).any()):
        return iso.reshape(m, k, d)
    # anisotropic: PCG on the normal equations, preconditioned by (B^T B + ridge)^-1
    factor32 = factor.float()
    gram32 = (gram + ridge * torch.eye(m * k, dtype=torch.float64, device=x.device)).float()
    x_norm = x.norm(dim=1, keepdim=True)
    unit = torch.where(x_norm > 0, x / x_norm.clamp_min(1e-30), torch.zeros_like(x))

    def apply(c: Tensor) -> Tensor:
        along = (sel.decode(c) * unit).sum(1, keepdim=True)
        return gram32 @ c + sel.scatter(a * along * unit)

    def precond(r: Tensor) -> Tensor:
        return torch.cholesky_solve(r, factor32)

    # start from whichever of the warm start and the isotropic solution has the lower loss
    sol = codebooks.reshape(m * k, d).float().clone()
    resid = rhs - apply(sol)
    resid_iso = rhs - apply(iso)
    # loss(C) - const = <C, A C> - 2 <C, rhs> = -<C, rhs + resid>
    if float((iso * (rhs + resid_iso)).sum()) > float((sol * (rhs + resid)).sum()):
        sol, resid = iso, resid_iso
    z = precond(resid)
    direction = z.clone()
    rz = float((resid * z).sum())
    rhs_norm = max(float(rhs.norm()), 1e-30)
    for _ in range(max_iters):
        if float(resid.norm()) <= tol * rhs_norm:
            break
        a_dir = apply(direction)
        curvature = float((direction * a_dir).sum())
        if curvature <= 0:
            break
        alpha = rz / curvature
        sol = sol + alpha * direction
        resid = resid - alpha * a_dir
        z = precond(resid)
        rz_new = float((resid * z).sum())
        direction = z + (rz_new / rz) * direction
        rz = rz_new
    return sol.reshape(m, k, d)
