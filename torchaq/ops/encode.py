"""``torch.ops.torchaq.pq_encode`` / ``anisotropic_encode``: plain L2 and anisotropic (score-aware) PQ encoding.

Shapes used throughout: datapoints ``x`` are ``(N, D)`` with ``D = M * dsub`` (the quantizer pads
the input dimension), codebooks ``C`` are ``(M, K, dsub)`` and codes ``(N, M)`` integer. A
datapoint's quantization is the concatenation ``x~ = [C_0[c_0], ..., C_{M-1}[c_{M-1}]]``.
"""
from __future__ import annotations

from typing import Iterator, Optional, Tuple

import torch
from torch import Tensor

from torchaq.ops.schemas import LIB

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
    m, k, dsub = codebooks.shape
    # one index_select over the stacked codewords (faster than a two-index gather)
    slots = codes.long() + torch.arange(m, device=codes.device) * k
    return codebooks.reshape(m * k, dsub).index_select(0, slots.reshape(-1)).reshape(codes.shape[0], m * dsub)


def _subspace_dots(x: Tensor, codebooks: Tensor) -> Tensor:
    """``dots[n, m, j] = <x_m[n], C_m[j]>`` for a chunk of rows, ``(n, M, K)``."""
    m, _, dsub = codebooks.shape
    return torch.einsum("nmd,mkd->nmk", x.reshape(x.shape[0], m, dsub), codebooks)


def l2_encode(x: Tensor, codebooks: Tensor) -> Tensor:
    """Per-subspace nearest codeword (plain PQ): ``c_m = argmin_j |x_m - C_m[j]|^2``; int64 ``(N, M)``.

    Runs ``torch.ops.torchaq.pq_encode`` (the C++ kernel on CPU, :func:`pq_encode_reference`
    elsewhere) on float32 copies of the arguments. Cost: ``O(N M K dsub)``.
    """
    return pq_encode(x.float().contiguous(), codebooks.float().contiguous())


def score_aware_encode(x: Tensor, codebooks: Tensor, eta: Tensor, max_rounds: int = MAX_ROUNDS) -> Tensor:
    """Codes minimising the score-aware loss ``eta |r_par|^2 + |r_perp|^2`` by coordinate descent.

    Runs ``torch.ops.torchaq.anisotropic_encode``: the C++ kernel on CPU
    (``torchaq/csrc/encode.cpp``), :func:`anisotropic_encode_reference` elsewhere (its oracle).
    See the reference for the algorithm. Takes any floating dtype (float32 copies are encoded).
    Cost: ``O(N M K (dsub + rounds))``.
    """
    return anisotropic_encode(
        x.float().contiguous(), codebooks.float().contiguous(), eta.float().contiguous(), max_rounds
    )


def pq_encode_reference(x: Tensor, codebooks: Tensor) -> Tensor:
    """Pure-torch plain-PQ encoder: ``argmin_j |C_m[j]|^2 / 2 - <x_m, C_m[j]>`` (first index on ties)."""
    check_encode_args(x, codebooks)
    m, k, _ = codebooks.shape
    half_norms = 0.5 * (codebooks * codebooks).sum(-1)  # (M, K)
    codes = torch.empty((x.shape[0], m), dtype=torch.int64, device=x.device)
    for start, stop in row_chunks(x.shape[0], m * k):
        # |x - c|^2 = |x|^2 - 2 <x, c> + |c|^2; |x|^2 does not change the argmin
        codes[start:stop] = (half_norms - _subspace_dots(x[start:stop], codebooks)).argmin(-1)
    return codes


def anisotropic_encode_reference(x: Tensor, codebooks: Tensor, eta: Tensor, max_rounds: int = MAX_ROUNDS) -> Tensor:
    """Pure-torch anisotropic encoder (the default kernel of the op, and the oracle of its tests).

    The algorithm of ScaNN's ``IndexDatapointNoiseShaped`` (Guo et al. 2020, section 4.2): start
    from the per-subspace L2-nearest codes (:func:`pq_encode_reference`); in each round visit the
    subspaces of a point in order ``0 .. M-1`` and move that subspace to the codeword that lowers
    the total loss most (``r_par`` couples all subspaces, so the choice depends on the others).
    Stop when a round moves nothing, or after ``max_rounds`` rounds. The loss of every point
    never increases. (ScaNN visits a point's subspaces from its largest residual to its smallest;
    a fixed order keeps every point independent of the others -- so a re-encode of some rows
    gives the codes a full encode would -- and lets every step read a strided slice.)

    Per point the state is ``|r|^2`` and ``<r, x>``; with ``d_j = <x_m, C_m[j]>`` and
    ``e_j = |x_m - C_m[j]|^2`` moving subspace ``m`` from ``c`` to ``j`` gives
    ``|r|^2 += e_j - e_c`` and ``<r, x> += d_c - d_j``, and the loss is
    ``|r|^2 + (eta - 1) <r, x>^2 / |x|^2``. All points move at once (vectorised); points are
    independent, so a point that did not move in a round is converged and leaves the active set.
    Within a round nothing waits for the host (one sync per round), so this is also the CUDA path.

    Args:
        x: ``(N, D)`` float32 datapoints.
        codebooks: ``(M, K, dsub)`` float32.
        eta: ``(N,)`` per-point ``h_par / h_perp`` (1 = plain PQ).
        max_rounds: rounds of coordinate descent (0: the L2 codes).
    Returns:
        ``(N, M)`` int64 codes.
    """
    check_encode_args(x, codebooks, eta, max_rounds)
    m, k, _ = codebooks.shape
    n_all = x.shape[0]
    codes_out = torch.empty((n_all, m), dtype=torch.int64, device=x.device)
    code_sq = (codebooks * codebooks).sum(-1)  # (M, K)
    half_norms = 0.5 * code_sq
    for start, stop in row_chunks(n_all, 2 * m * k):
        xc = x[start:stop]
        n = xc.shape[0]
        dots = _subspace_dots(xc, codebooks)  # (n, M, K)
        codes = (half_norms - dots).argmin(-1)
        if max_rounds > 0:
            x_sub_sq = xc.reshape(n, m, -1).pow(2).sum(-1)  # (n, M)
            dist = x_sub_sq.unsqueeze(-1) - 2 * dots + code_sq  # e_j per subspace: (n, M, K)
            x_sq = (xc * xc).sum(-1)
            # (eta - 1) / |x|^2; zero rows have no parallel direction
            coef = torch.where(x_sq > 0, (eta[start:stop] - 1) / x_sq.clamp_min(1e-30), torch.zeros_like(x_sq))
            active = torch.arange(n, device=x.device)
            for _ in range(max_rounds):
                new_codes, moved = _coordinate_round(dist[active], dots[active], codes[active], x_sq[active], coef[active])
                codes[active] = new_codes
                active = active[moved]
                if active.numel() == 0:  # one host sync per round
                    break
        codes_out[start:stop] = codes
    return codes_out


def _coordinate_round(dist: Tensor, dots: Tensor, codes: Tensor, x_sq: Tensor, coef: Tensor):
    """One round of coordinate descent over subspaces ``0 .. M-1`` for a set of points.

    Candidate loss of codeword ``j`` in subspace ``m``:
    ``(|r|^2 - e_c) + e_j + coef (<r, x> + d_c - d_j)^2``; a point moves only if the best is
    strictly below the current code's loss computed the same way (so rounding cannot make it hop
    between equal codewords forever). Returns the new codes and a bool mask of the points that moved.
    """
    cur_dist = dist.gather(2, codes.unsqueeze(-1)).squeeze(-1)  # (n, M)
    cur_dot = dots.gather(2, codes.unsqueeze(-1)).squeeze(-1)
    r_sq = cur_dist.sum(1)
    r_dot_x = x_sq - cur_dot.sum(1)
    moved = torch.zeros(codes.shape[0], dtype=torch.bool, device=dist.device)
    coef_col = coef.unsqueeze(1)
    for sub in range(codes.shape[1]):
        dist_m, dots_m, code_m = dist[:, sub], dots[:, sub], codes[:, sub]
        d_cur, p_cur = cur_dist[:, sub], cur_dot[:, sub]
        cand_rx = (r_dot_x + p_cur).unsqueeze(1) - dots_m
        cand_loss = (r_sq - d_cur).unsqueeze(1) + dist_m + coef_col * cand_rx * cand_rx
        best_loss, best = cand_loss.min(1)
        better = best_loss < cand_loss.gather(1, code_m.unsqueeze(1)).squeeze(1)
        if not dist.is_cuda and not bool(better.any()):  # a free skip where a sync is cheap
            continue
        new_code = torch.where(better, best, code_m)
        new_dist = dist_m.gather(1, new_code.unsqueeze(1)).squeeze(1)
        new_dot = dots_m.gather(1, new_code.unsqueeze(1)).squeeze(1)
        r_sq = r_sq + (new_dist - d_cur)
        r_dot_x = r_dot_x + (p_cur - new_dot)
        codes[:, sub] = new_code
        cur_dist[:, sub] = new_dist
        cur_dot[:, sub] = new_dot
        moved |= better
    return codes, moved


def check_encode_args(x: Tensor, codebooks: Tensor, eta: Optional[Tensor] = None, max_rounds: int = 0) -> None:
    """Shape / dtype / device checks of both encoders (the C++ driver raises the same messages)."""
    if x.dim() != 2:
        raise ValueError(f"x must be (N, D), got shape {tuple(x.shape)}")
    if codebooks.dim() != 3:
        raise ValueError(f"codebooks must be (M, K, dsub), got shape {tuple(codebooks.shape)}")
    if x.dtype != torch.float32:
        raise TypeError(f"x must be float32, got {x.dtype}")
    if codebooks.dtype != torch.float32:
        raise TypeError(f"codebooks must be float32, got {codebooks.dtype}")
    m, k, dsub = codebooks.shape
    torch._check(m >= 1 and k >= 1 and dsub >= 1, lambda: f"codebooks must be non-empty (M, K, dsub), got {tuple(codebooks.shape)}")
    if x.shape[1] != m * dsub:
        raise ValueError(f"x has {x.shape[1]} columns but codebooks (M, K, dsub) = {tuple(codebooks.shape)} need M * dsub = {m * dsub}")
    if x.device != codebooks.device:
        raise ValueError(f"x is on {x.device} but codebooks on {codebooks.device}")
    if eta is not None:
        if eta.dim() != 1 or eta.shape[0] != x.shape[0]:
            raise ValueError(f"eta must have shape ({x.shape[0]},), got {tuple(eta.shape)}")
        if eta.dtype != torch.float32:
            raise TypeError(f"eta must be float32, got {eta.dtype}")
        if eta.device != x.device:
            raise ValueError(f"eta is on {eta.device} but x on {x.device}")
        if max_rounds < 0:
            raise ValueError(f"max_rounds must be >= 0, got {max_rounds}")


@torch.library.register_fake("torchaq::pq_encode")
def _pq_encode_fake(x: Tensor, codebooks: Tensor) -> Tensor:
    check_encode_args(x, codebooks)
    return x.new_empty((x.shape[0], codebooks.shape[0]), dtype=torch.int64)


@torch.library.register_fake("torchaq::anisotropic_encode")
def _anisotropic_encode_fake(x: Tensor, codebooks: Tensor, eta: Tensor, max_rounds: int) -> Tensor:
    check_encode_args(x, codebooks, eta, max_rounds)
    return x.new_empty((x.shape[0], codebooks.shape[0]), dtype=torch.int64)


def pq_encode(x: Tensor, codebooks: Tensor) -> Tensor:
    """Plain PQ codes ``argmin_j |x_m - C_m[j]|^2`` (first index on ties): ``(N, M)`` int64.

    ``x`` float32 ``(N, M * dsub)``, ``codebooks`` float32 ``(M, K, dsub)``. Cost ``O(N M K dsub)``.
    """
    return torch.ops.torchaq.pq_encode(x, codebooks)


def anisotropic_encode(x: Tensor, codebooks: Tensor, eta: Tensor, max_rounds: int) -> Tensor:
    """Score-aware codes by coordinate descent (:func:`anisotropic_encode_reference`).

    ``eta`` float32 ``(N,)`` per row; ``max_rounds`` rounds at most (0: the L2 codes). Cost
    ``O(N M K (dsub + rounds))``.
    """
    return torch.ops.torchaq.anisotropic_encode(x, codebooks, eta, max_rounds)



torch.library.impl(LIB, "pq_encode", "CompositeExplicitAutograd")(pq_encode_reference)
torch.library.impl(LIB, "anisotropic_encode", "CompositeExplicitAutograd")(anisotropic_encode_reference)
