"""Additive-quantization encoding with the score-aware loss: the pure-torch reference.

Additive codes write a row as a sum of ``M`` full-width codewords, ``x~ = sum_m C_m[c_m]``, with
codebooks ``C`` of shape ``(M, K, d)``. For a row ``x`` with residual ``r = x - x~`` the loss is the
score-aware loss (Guo et al., ICML 2020) with ``h_perp = 1``, ``h_par = eta``::

    L(c) = |r|^2 + (eta - 1) <r, x>^2 / |x|^2

Encoding is a discrete search (the codebooks interact through ``<C_l[a], C_m[j]>``). This is
LSQ++'s encoder (Martinez et al., "LSQ++: lower running time and higher recall in multi-codebook
quantization", ECCV 2018): iterated conditional modes (ICM) -- re-choose one codebook's code with
all others fixed, codebook after codebook -- inside iterated local search (perturb a few codes at
random, run ICM again, keep the result if its loss is lower), with the score-aware term added to
every move's cost.

Per row the state is the code vector ``c``, ``s[m, j] = sum_l <C_l[c_l], C_m[j]>`` (the cross
inner products of the current codewords with every codeword, from the precomputed Gram matrix
``G = C C^T`` of all ``M K`` codewords) and ``rx = <r, x>``. With ``p[m, j] = <x, C_m[j]>`` and
``n[m, j] = |C_m[j]|^2``, moving codebook ``m`` from ``c_m`` to ``j`` costs, up to a constant::

    cost_j = n[m, j] - 2 (p[m, j] - s[m, j] + G[(m, c_m), (m, j)])
             + (eta - 1) / |x|^2 * (rx + p[m, c_m] - p[m, j])^2

so one ICM step over codebook ``m`` costs ``O(K)`` and a change of code updates ``s`` in
``O(M K)`` (one row of ``G``). The loss of the whole code is
``|x|^2 - 2 sum_m p[m, c_m] + sum_m s[m, c_m] + (eta - 1) rx^2 / |x|^2``, ``O(M)``.

``greedy=True`` ignores the given codes and starts from the greedy residual encoding
(codebook after codebook, each the best for the residual of the ones before, score-aware term
included): the same step with no current code.

Cost: ``O(N M K d)`` for the inner products ``p`` plus ``O((M K)^2 d)`` for ``G`` (both matrix
products), then per row and per ICM sweep ``O(M K)`` plus ``O(M K)`` per code that changes, for
``(1 + R) * icm_iters`` sweeps with ``R`` perturbation rounds.
"""
from __future__ import annotations

import torch
from torch import Tensor

from torchaq.ops.schemas import LIB

# Rows whose (rows, M K) working tensors are processed at once.
CHUNK_ROWS = 1024


def check_aq_encode_args(
    x: Tensor, codebooks: Tensor, codes: Tensor, eta: Tensor, perturb: Tensor, icm_iters: int
) -> None:
    """Shapes and dtypes of :func:`aq_encode_reference`'s arguments (``torch._check``: fake-safe)."""
    torch._check(codebooks.dim() == 3, lambda: f"codebooks must be (M, K, d), got shape {tuple(codebooks.shape)}")
    torch._check(x.dim() == 2, lambda: f"x must be (N, d), got shape {tuple(x.shape)}")
    m, k, d = codebooks.shape
    torch._check(x.shape[1] == d, lambda: f"x has d = {x.shape[1]} but codebooks have d = {d}")
    torch._check(
        x.dtype == torch.float32 and codebooks.dtype == torch.float32,
        lambda: f"x and codebooks must be float32, got {x.dtype}, {codebooks.dtype}",
    )
    torch._check(
        codes.dim() == 2 and codes.shape[0] == x.shape[0] and codes.shape[1] == m,
        lambda: f"codes must be (N, M) = ({x.shape[0]}, {m}), got shape {tuple(codes.shape)}",
    )
    torch._check(codes.dtype == torch.int64, lambda: f"codes must be int64, got {codes.dtype}")
    torch._check(
        eta.dim() == 1 and eta.shape[0] == x.shape[0] and eta.dtype == torch.float32,
        lambda: f"eta must be float32 of shape ({x.shape[0]},), got {eta.dtype} {tuple(eta.shape)}",
    )
    torch._check(
        perturb.dim() == 3 and perturb.shape[1] == x.shape[0] and perturb.dtype == torch.int64,
        lambda: f"perturb must be int64 (R, N={x.shape[0]}, P), got {perturb.dtype} {tuple(perturb.shape)}",
    )
    torch._check(icm_iters >= 0, lambda: f"icm_iters must be >= 0, got {icm_iters}")
    torch._check(k >= 1 and m >= 1, lambda: "codebooks must have M >= 1 and K >= 1")
    for t, name in ((x, "x"), (codes, "codes"), (eta, "eta"), (perturb, "perturb")):
        torch._check(t.device == codebooks.device, lambda: f"{name} is on {t.device} but codebooks on {codebooks.device}")


class _Rows:
    """ICM state of a chunk of rows: codes ``c`` (n, M), cross products ``s`` (n, M K), ``rx`` (n,)."""

    def __init__(self, dots: Tensor, gram: Tensor, norms: Tensor, coef: Tensor, k: int):
        self.dots, self.gram, self.norms, self.coef, self.k = dots, gram, norms, coef, k

    def start(self, codes: Tensor, x_sq: Tensor) -> None:
        n, m = codes.shape
        slots = codes + torch.arange(m, device=codes.device) * self.k
        self.codes = codes.clone()
        self.s = torch.zeros_like(self.dots)  # (n, MK), summed codebook by codebook
        for sub in range(m):
            self.s += self.gram[slots[:, sub]]
        self.rx = x_sq - self.dots.gather(1, slots).sum(1)

    def greedy(self, x_sq: Tensor, m: int) -> None:
        n = x_sq.shape[0]
        k = self.k
        self.codes = torch.zeros((n, m), dtype=torch.int64, device=x_sq.device)
        self.s = torch.zeros_like(self.dots)
        self.rx = x_sq.clone()
        for sub in range(m):
            lo, hi = sub * k, (sub + 1) * k
            p = self.dots[:, lo:hi]
            rx_j = self.rx.unsqueeze(1) - p
            cost = self.norms[lo:hi] - 2 * (p - self.s[:, lo:hi]) + self.coef.unsqueeze(1) * rx_j * rx_j
            best = cost.argmin(1)
            self.codes[:, sub] = best
            self.s += self.gram[lo + best]
            self.rx = self.rx - p.gather(1, best.unsqueeze(1)).squeeze(1)

    def set_code(self, rows: Tensor, sub: Tensor, new: Tensor) -> None:
        """Force code ``new`` on codebook ``sub`` for ``rows`` (a perturbation), one per row."""
        k = self.k
        old = self.codes[rows, sub]
        old_slot, new_slot = sub * k + old, sub * k + new
        self.s[rows] += self.gram[new_slot] - self.gram[old_slot]
        self.rx[rows] += self.dots[rows, old_slot] - self.dots[rows, new_slot]
        self.codes[rows, sub] = new

    def sweep(self) -> None:
        """One ICM sweep: codebooks 0..M-1 in order, each moved to its best code given the others."""
        n, m = self.codes.shape
        k = self.k
        for sub in range(m):
            lo, hi = sub * k, (sub + 1) * k
            cur = self.codes[:, sub]
            cur_slot = (lo + cur).unsqueeze(1)
            p = self.dots[:, lo:hi]
            s_excl = self.s[:, lo:hi] - self.gram[lo + cur, lo:hi]
            rx_excl = self.rx + self.dots.gather(1, cur_slot).squeeze(1)
            rx_j = rx_excl.unsqueeze(1) - p
            cost = self.norms[lo:hi] - 2 * (p - s_excl) + self.coef.unsqueeze(1) * rx_j * rx_j
            best_cost, best = cost.min(1)
            better = best_cost < cost.gather(1, cur.unsqueeze(1)).squeeze(1)
            if not bool(better.any()):
                continue
            rows = better.nonzero().squeeze(1)
            new = best[rows]
            self.s[rows] += self.gram[lo + new] - self.gram[lo + cur[rows]]
            self.rx[rows] = rx_excl[rows] - p[rows, new]
            self.codes[rows, sub] = new

    def loss(self, x_sq: Tensor) -> Tensor:
        n, m = self.codes.shape
        slots = self.codes + torch.arange(m, device=self.codes.device) * self.k
        r_sq = x_sq - 2 * self.dots.gather(1, slots).sum(1) + self.s.gather(1, slots).sum(1)
        return r_sq + self.coef * self.rx * self.rx

    def copy(self) -> "_Rows":
        out = _Rows(self.dots, self.gram, self.norms, self.coef, self.k)
        out.codes, out.s, out.rx = self.codes.clone(), self.s.clone(), self.rx.clone()
        return out


def aq_encode_reference(
    x: Tensor, codebooks: Tensor, codes: Tensor, eta: Tensor, perturb: Tensor, icm_iters: int, greedy: bool
) -> Tensor:
    """Score-aware LSQ++ encoding of ``x`` ``(N, d)`` against additive codebooks ``(M, K, d)``.

    Args:
        x: ``(N, d)`` float32 rows.
        codebooks: ``(M, K, d)`` float32.
        codes: ``(N, M)`` int64 starting codes (ignored when ``greedy``).
        eta: ``(N,)`` float32 per-row ``h_par / h_perp`` (1 = plain reconstruction loss).
        perturb: ``(R, N, P)`` int64 in ``[0, M K)``: before ICM round ``r + 1``, row ``i`` gets code
            ``v % K`` on codebook ``v // K`` for each ``v = perturb[r, i, :]`` (in order). ``R = 0``:
            ICM only.
        icm_iters: ICM sweeps after the start and after every perturbation.
        greedy: start from the greedy residual encoding instead of ``codes``.
    Returns:
        ``(N, M)`` int64 codes; each row's loss is never above that of its start.
    """
    check_aq_encode_args(x, codebooks, codes, eta, perturb, icm_iters)
    m, k, d = codebooks.shape
    if not greedy and codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= k):
        raise ValueError(f"codes must be in [0, {k}), got values in [{int(codes.min())}, {int(codes.max())}]")
    if perturb.numel() and (int(perturb.min()) < 0 or int(perturb.max()) >= m * k):
        raise ValueError(f"perturb must be in [0, M*K = {m * k}), got values in [{int(perturb.min())}, {int(perturb.max())}]")
    flat = codebooks.reshape(m * k, d)
    gram = flat @ flat.T
    norms = gram.diagonal().clone()
    out = torch.empty_like(codes)
    rounds = perturb.shape[0]
    for start in range(0, x.shape[0], CHUNK_ROWS):
        stop = min(x.shape[0], start + CHUNK_ROWS)
        xc = x[start:stop]
        x_sq = (xc * xc).sum(1)
        coef = torch.where(x_sq > 0, (eta[start:stop] - 1) / x_sq.clamp_min(1e-30), torch.zeros_like(x_sq))
        best = _Rows(xc @ flat.T, gram, norms, coef, k)
        if greedy:
            best.greedy(x_sq, m)
        else:
            best.start(codes[start:stop], x_sq)
        for _ in range(icm_iters):
            best.sweep()
        best_loss = best.loss(x_sq)
        rows = torch.arange(stop - start, device=x.device)
        for r in range(rounds):
            cand = best.copy()
            for j in range(perturb.shape[2]):
                v = perturb[r, start:stop, j]
                cand.set_code(rows, v // k, v % k)
            for _ in range(icm_iters):
                cand.sweep()
            cand_loss = cand.loss(x_sq)
            keep = cand_loss < best_loss
            best.codes[keep], best.s[keep], best.rx[keep] = cand.codes[keep], cand.s[keep], cand.rx[keep]
            best_loss = torch.where(keep, cand_loss, best_loss)
        out[start:stop] = best.codes
    return out


@torch.library.register_fake("torchaq::aq_encode")
def _aq_encode_fake(x, codebooks, codes, eta, perturb, icm_iters, greedy):
    check_aq_encode_args(x, codebooks, codes, eta, perturb, icm_iters)
    return codes.new_empty(codes.shape)


def aq_encode(
    x: Tensor, codebooks: Tensor, codes: Tensor, eta: Tensor, perturb: Tensor, icm_iters: int, greedy: bool
) -> Tensor:
    """Additive codes ``(N, M)`` int64 of ``x`` minimising ``|r|^2 + (eta - 1) <r, x>^2 / |x|^2`` (LSQ++ search).

    See :func:`aq_encode_reference` for the arguments and the algorithm.
    """
    return torch.ops.torchaq.aq_encode(x, codebooks, codes, eta, perturb, icm_iters, greedy)


torch.library.impl(LIB, "aq_encode", "CompositeExplicitAutograd")(aq_encode_reference)
