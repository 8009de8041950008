"""Pieces shared by the Triton scan kernels (``scan.py``: fused top-k, ``score.py``: dense scores).

* :func:`tile_scores` -- the float32 LUT sums of one ``(BLOCK_B queries, BLOCK_N classes)`` tile;
* :func:`lut_rows` / :func:`interleave_lut` -- the query-interleaved LUT both kernels read;
* :func:`f32_view` -- lets the shared argument check accept a float16 LUT.

The packed code layout is :mod:`torchaq.ops.layout`'s (blocks of ``BLOCK`` classes).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from torchaq.ops.layout import BLOCK, packed_width

# the packed block as a constexpr, so jit code may read it
PACK_BLOCK = tl.constexpr(BLOCK)


@triton.jit
def tile_scores(
    lutt_ptr, packed_ptr, bias_ptr, qt, n_start, N, MR, P, NBLK,
    K: tl.constexpr, BITS: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, P_CHUNK: tl.constexpr,
    HAS_BIAS: tl.constexpr, USE_GATHER: tl.constexpr,
):
    """float32 ``(BLOCK_B, BLOCK_N)`` scores of classes ``n`` for the queries of query tile ``qt``.

    Classes ``n_start + [0, BLOCK_N)``; ``lutt`` is the query-interleaved LUT ``(num_query_tiles, MR, K, BLOCK_B)``: the BLOCK_B entries
    that one code selects are adjacent, so one vector load per code serves every query of the tile
    (L1 moves bytes, not look-ups: this is what makes a larger batch tile cheaper per query)."""
    # codes as (P_CHUNK, BLOCK_N // 32, 32): the last axis is 32 contiguous, 32-aligned bytes, which
    # lets the compiler issue vector loads; reshaped to (P_CHUNK, BLOCK_N) after the load
    NB: tl.constexpr = BLOCK_N // PACK_BLOCK
    blk = n_start // PACK_BLOCK + tl.arange(0, NB)
    blk_ok = (blk < NBLK)[None, :, None]
    code_ptr = packed_ptr + blk.to(tl.int64)[None, :, None] * (P * PACK_BLOCK) + tl.arange(0, PACK_BLOCK)[None, None, :]
    lut_tile = lutt_ptr + qt.to(tl.int64) * MR * (K * BLOCK_B)
    bb = tl.arange(0, BLOCK_B)[None, None, :]
    pc = tl.arange(0, P_CHUNK)
    acc = tl.zeros((BLOCK_N, BLOCK_B), dtype=tl.float32)
    # the LUT rows are zero-padded to whole chunks (and to an even count for 4-bit), and padding
    # code bytes load as 0, so the LUT loads below need no masks
    for p0 in range(0, P, P_CHUNK):
        p = p0 + pc
        byte = tl.load(code_ptr + (p * PACK_BLOCK)[:, None, None], mask=(p < P)[:, None, None] & blk_ok, other=0)
        byte = tl.reshape(byte, (P_CHUNK, BLOCK_N)).to(tl.int32)
        if BITS == 4:
            row_lo = lut_tile + ((2 * p) * (K * BLOCK_B))[:, None, None]  # LUT row of subspace 2p
            row_hi = row_lo + K * BLOCK_B  # subspace 2p + 1
            if USE_GATHER:
                j = tl.arange(0, K)[None, :, None] * BLOCK_B + bb
                t_lo = tl.load(row_lo + j)  # (P_CHUNK, K, BLOCK_B)
                t_hi = tl.load(row_hi + j)
                i_lo = tl.broadcast_to((byte & 15)[:, :, None], (P_CHUNK, BLOCK_N, BLOCK_B))
                i_hi = tl.broadcast_to((byte >> 4)[:, :, None], (P_CHUNK, BLOCK_N, BLOCK_B))
                v = tl.gather(t_lo, i_lo, 1).to(tl.float32) + tl.gather(t_hi, i_hi, 1).to(tl.float32)
            else:
                v = tl.load(row_lo + (byte & 15)[:, :, None] * BLOCK_B + bb).to(tl.float32)
                v += tl.load(row_hi + (byte >> 4)[:, :, None] * BLOCK_B + bb).to(tl.float32)
        else:
            row = lut_tile + (p * (K * BLOCK_B))[:, None, None]
            if USE_GATHER:
                t = tl.load(row + tl.arange(0, K)[None, :, None] * BLOCK_B + bb)
                idx = tl.broadcast_to(byte[:, :, None], (P_CHUNK, BLOCK_N, BLOCK_B))
                v = tl.gather(t, idx, 1).to(tl.float32)
            else:
                v = tl.load(row + byte[:, :, None] * BLOCK_B + bb).to(tl.float32)
        acc += tl.sum(v, axis=0)
    if HAS_BIAS:
        n = n_start + tl.arange(0, BLOCK_N)
        acc += tl.load(bias_ptr + n, mask=n < N, other=0.0)[:, None]
    return tl.trans(acc)


def lut_rows(num_subspaces: int, bits: int, p_chunk: int) -> int:
    """LUT rows the kernels may touch: whole chunks of ``p_chunk`` code bytes (two rows a byte for 4-bit)."""
    width = packed_width(num_subspaces, bits)
    return triton.cdiv(width, p_chunk) * p_chunk * (2 if bits == 4 else 1)


def interleave_lut(lut: Tensor, block_b: int, rows: int) -> Tensor:
    """``(B, M, K)`` -> ``(ceil(B / block_b), rows, K, block_b)``; zeros for padding queries and rows."""
    batch, m, kc = lut.shape
    qt = triton.cdiv(batch, block_b)
    if qt * block_b == batch and rows == m and block_b == 1:
        return lut.contiguous().view(qt, m, kc, 1)
    padded = lut.new_zeros((qt * block_b, rows, kc))
    padded[:batch, :m] = lut
    return padded.view(qt, block_b, rows, kc).permute(0, 2, 3, 1).contiguous()




def f32_view(lut: Tensor) -> Tensor:
    """A float16 LUT is accepted here (not through the op): half the LUT traffic. The shared
    argument check wants float32, so hand it a zero-copy float32 stand-in of the same shape."""
    if lut.dtype == torch.float16:
        return torch.empty((), dtype=torch.float32, device=lut.device).expand(lut.shape)
    return lut


