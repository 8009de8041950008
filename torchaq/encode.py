"""Product-quantization encoding: plain L2 and anisotropic (score-aware) coordinate descent.

Shapes used throughout: datapoints ``x`` are ``(N, D)`` with ``D = M * dsub`` (the quantizer pads
the input dimension), codebooks ``C`` are ``(M, K, dsub)`` and codes ``(N, M)`` integer. A
datapoint's quantization is the concatenation ``x~ = [C_0[c_0], ..., C_{M-1}[c_{M-1}]]``.
"""
from __future__ import annotations

from typing import Iterator, Tuple

import torch
from torch import Tensor

# Elements of one (rows, M, K) working tensor; bounds the memory of the chunked loops (~256 MB).
CHUNK_ELEMENTS = 1 << 26
# Coordinate descent stops after this many rounds even if some point still moves (ScaNN: 10).
MAX_ROUNDS = 10


def row_chunks(num_rows: int, per_row: int, budget: int = CHUNK_ELEMENTS) -> Iterator[Tuple[int, int]]:
    """Split ``range(num_rows)`` into ``(start, stop)`` chunks of about ``budget / per_row`` rows."""
    step = max(1, budget // max(1, per_row))
    for start in range(0, num_rows, step):
        yield start, min(num_rows, start + step)


def decode(codes: Tensor, codebooks: Tensor) -> Tensor:
    """``x~[n] = concat_m C_m[codes[n, m]]``: ``(N, M)`` codes -> ``(N, M * dsub)`` float."""
    m, _, dsub = codebooks.shape
    gathered = codebooks[torch.arange(m, device=codes.device), codes.long()]  # (N, M, dsub)
    return gathered.reshape(codes.shape[0], m * dsub)


def _subspace_dots(x: Tensor, codebooks: Tensor) -> Tensor:
    """``dots[n, m, j] = <x_m[n], C_m[j]>`` for a chunk of rows, ``(n, M, K)``."""
    m, _, dsub = codebooks.shape
    return torch.einsum("nmd,mkd->nmk", x.reshape(x.shape[0], m, dsub), codebooks)


def l2_encode(x: Tensor, codebooks: Tensor) -> Tensor:
    """Per-subspace nearest codeword (plain PQ): ``c_m = argmin_j |x_m - C_m[j]|^2``; int64 ``(N, M)``."""
    m, k, _ = codebooks.shape
    half_norms = 0.5 * (codebooks * codebooks).sum(-1)  # (M, K)
    codes = torch.empty((x.shape[0], m), dtype=torch.int64, device=x.device)
    for start, stop in row_chunks(x.shape[0], m * k):
        # |x - c|^2 = |x|^2 - 2 <x, c> + |c|^2; |x|^2 does not change the argmin
        codes[start:stop] = (half_norms - _subspace_dots(x[start:stop], codebooks)).argmin(-1)
    return codes


def anisotropic_encode(x: Tensor, codebooks: Tensor, eta: Tensor, max_rounds: int = MAX_ROUNDS) -> Tensor:
    """Codes minimising the score-aware loss ``eta |r_par|^2 + |r_perp|^2`` by coordinate descent.

    The algorithm of ScaNN's ``IndexDatapointNoiseShaped`` (Guo et al. 2020, section 4.2): start
    from the per-subspace L2-nearest codes; in each round visit the subspaces of a point from its
    largest residual to its smallest and move that subspace to the codeword that lowers the total
    loss most (``r_par`` couples all subspaces, so the choice depends on the others). Stop when a
    round moves nothing, or after ``max_rounds`` rounds. The loss of every point never increases.

    Per point the state is ``|r|^2`` and ``<r, x>``; with ``d_j = <x_m, C_m[j]>`` and
    ``e_j = |x_m - C_m[j]|^2`` moving subspace ``m`` from ``c`` to ``j`` gives
    ``|r|^2 += e_j - e_c`` and ``<r, x> += d_c - d_j``, and the loss is
    ``|r|^2 + (eta - 1) <r, x>^2 / |x|^2``. All points move at once (vectorised); points are
    independent, so a point that did not move in a round is converged and leaves the active set.

    Args:
        x: ``(N, D)`` float32 datapoints.
        codebooks: ``(M, K, dsub)`` float32.
        eta: ``(N,)`` per-point ``h_par / h_perp`` (1 = plain PQ).
    Returns:
        ``(N, M)`` int64 codes.
    """
    m, k, _ = codebooks.shape
    n_all = x.shape[0]
    codes_out = torch.empty((n_all, m), dtype=torch.int64, device=x.device)
    code_sq = (codebooks * codebooks).sum(-1)  # (M, K)
    for start, stop in row_chunks(n_all, 2 * m * k):
        xc = x[start:stop]
        n = xc.shape[0]
        dots = _subspace_dots(xc, codebooks)  # (n, M, K)
        x_sub_sq = xc.reshape(n, m, -1).pow(2).sum(-1)  # (n, M)
        dist = x_sub_sq.unsqueeze(-1) - 2 * dots + code_sq  # e_j per subspace: (n, M, K)
        codes = dist.argmin(-1)
        x_sq = (xc * xc).sum(-1)
        # (eta - 1) / |x|^2; zero rows have no parallel direction
        coef = torch.where(x_sq > 0, (eta[start:stop] - 1) / x_sq.clamp_min(1e-30), torch.zeros_like(x_sq))
        active = torch.arange(n, device=x.device)
        for _ in range(max_rounds):
            if active.numel() == 0:
                break
            moved = _coordinate_round(dist[active], dots[active], codes[active], x_sq[active], coef[active])
            codes[active] = moved[0]
            active = active[moved[1]]
        codes_out[start:stop] = codes
    return codes_out


def _coordinate_round(dist: Tensor, dots: Tensor, codes: Tensor, x_sq: Tensor, coef: Tensor):
    """One round of coordinate descent over all subspaces for a set of points.

    Subspaces are visited from the largest total residual to the smallest (ScaNN orders them per
    point; one order for all points lets every step work on a strided slice of the working
    tensors instead of a two-index gather). The loss still never increases.
    Returns the new codes and a bool mask of the points that moved.
    """
    cur_dist = dist.gather(2, codes.unsqueeze(-1)).squeeze(-1)  # (n, M)
    cur_dot = dots.gather(2, codes.unsqueeze(-1)).squeeze(-1)
    r_sq = cur_dist.sum(1)
    r_dot_x = x_sq - cur_dot.sum(1)
    moved = torch.zeros(codes.shape[0], dtype=torch.bool, device=dist.device)
    coef_col = coef.unsqueeze(1)
    for sub in cur_dist.sum(0).argsort(descending=True).tolist():
        dist_m, dots_m, code_m = dist[:, sub], dots[:, sub], codes[:, sub]
        d_cur, p_cur = cur_dist[:, sub], cur_dot[:, sub]
        cand_rx = (r_dot_x + p_cur).unsqueeze(1) - dots_m
        cand_loss = torch.addcmul((r_sq - d_cur).unsqueeze(1) + dist_m, coef_col * cand_rx, cand_rx)
        best_loss, best = cand_loss.min(1)
        # compare against the current code's loss computed the same way, so rounding cannot
        # make a point hop between equal codewords forever
        better = best_loss < cand_loss.gather(1, code_m.unsqueeze(1)).squeeze(1)
        if not bool(better.any()):
            continue
        new_code = torch.where(better, best, code_m)
        new_dist = dist_m.gather(1, new_code.unsqueeze(1)).squeeze(1)
        new_dot = dots_m.gather(1, new_code.unsqueeze(1)).squeeze(1)
        r_sq += new_dist - d_cur
        r_dot_x += p_cur - new_dot
        codes[:, sub] = new_code
        cur_dist[:, sub] = new_dist
        cur_dot[:, sub] = new_dot
        moved |= better
    return codes, moved
