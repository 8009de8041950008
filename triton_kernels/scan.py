"""Triton kernel: LUT scan over packed PQ codes with a fused top-k.

    score[b, n] = sum_m LUT[b, m, code[n, m]] + bias[n]
    (values, indices) = top-k over n of score[b, n]

Codes are read in the blocked layout of :mod:`torchaq.ops` (``packed[n // 32, p, n % 32]``; 4-bit:
two subspaces a byte, low nibble first; 8-bit: one). No ``(B, N)`` score matrix is written.

How the work is split
---------------------
* A program owns ``BLOCK_B`` queries and walks a strided set of class tiles of ``BLOCK_N``
  classes (tile ``split, split + num_splits, ...``), so every code byte it loads is used by all
  ``BLOCK_B`` queries, and concurrent programs read neighbouring tiles.
* Per tile it loads a ``(P_CHUNK, BLOCK_N)`` slab of code bytes (each 32-class block row is 32
  contiguous bytes = one sector), splits nibbles, and looks the entries up in a query-interleaved
  LUT ``(query_tiles, M, K, BLOCK_B)`` (built per call, B*M*K floats): the BLOCK_B entries one code
  selects are adjacent, so a single vector load serves the whole query tile. The look-up is a
  plain indexed load (the LUT stays in L1/L2) or, with ``use_gather``, ``tl.gather`` on a register
  copy of the ``(P_CHUNK, K, BLOCK_B)`` slice. float32 sums (float16 LUT entries allowed).
* Top-k: each (score, class) pair becomes one int64 key, ``order_preserving_int32(score) << 32 |
  (2**32 - 1 - n)``, so one integer comparison orders by score and breaks ties toward the smaller
  class. The program keeps the best ``BLOCK_N`` keys of each query sorted descending in
  registers; a new tile is sorted ascending and merged with an element-wise ``max`` (the max of a
  descending and an ascending sorted sequence holds the top half of their union -- the bitonic
  merge step), then re-sorted. The first tile takes one sort; a later tile whose keys beat no
  query's current k-th best is skipped without sorting. ``BLOCK_N >= k``, so k may exceed the
  default tile.
* Each program writes its best ``k`` keys to a ``(B, num_splits, k)`` buffer; one ``torch.topk``
  over those ``num_splits * k`` keys per query and a bit-level decode give the final (B, k).
Only ``tl.sort``, ``tl.gather`` and basic ops are used (present in triton 3.6 and 3.9).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from torchaq.ops.layout import check_finite, check_k, check_lut_scan_args

from .score import triton_lut_score
from .tiles import f32_view, interleave_lut, lut_rows, tile_scores

# below every real key (decodes to a NaN that ranks last); a constexpr so jit code may read it
_KEY_MIN = tl.constexpr(-9223372036854775807)
_MAX_TILE = 2048  # largest class tile (and so largest k) kept in registers


@triton.jit
def _tile_keys(
    lut_ptr, packed_ptr, bias_ptr, qt, n_start, N, MR, P, NBLK,
    K: tl.constexpr, BITS: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, P_CHUNK: tl.constexpr,
    HAS_BIAS: tl.constexpr, USE_GATHER: tl.constexpr,
):
    """int64 keys ``order_preserving(score) << 32 | (2**32 - 1 - n)`` of one tile; padding classes get _KEY_MIN."""
    s = tile_scores(lut_ptr, packed_ptr, bias_ptr, qt, n_start, N, MR, P, NBLK,
                     K, BITS, BLOCK_B, BLOCK_N, P_CHUNK, HAS_BIAS, USE_GATHER)
    n = n_start + tl.arange(0, BLOCK_N)
    bits = s.to(tl.int32, bitcast=True)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # signed-int order == float order
    # low word 2**32 - 1 - n, spelled with an int64 literal (4294967295 alone would type as uint32)
    key = (ordered.to(tl.int64) << 32) | (4294967296 - n.to(tl.int64) - 1)[None, :]
    return tl.where((n < N)[None, :], key, _KEY_MIN)


@triton.jit
def _scan_topk_kernel(
    lut_ptr, packed_ptr, bias_ptr, keys_ptr,
    B, N, MR, P, NBLK, num_tiles, num_splits, KOUT,
    K: tl.constexpr, BITS: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, P_CHUNK: tl.constexpr,
    HAS_BIAS: tl.constexpr, USE_GATHER: tl.constexpr,
):
    split = tl.program_id(0)  # < num_tiles (the wrapper caps num_splits)
    qt = tl.program_id(1)
    q = qt * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.arange(0, BLOCK_N)
    # first tile: one sort gives the running best (sorted descending)
    best = tl.sort(_tile_keys(lut_ptr, packed_ptr, bias_ptr, qt, split * BLOCK_N, N, MR, P, NBLK,
                              K, BITS, BLOCK_B, BLOCK_N, P_CHUNK, HAS_BIAS, USE_GATHER), 1, True)
    for t in range(split + num_splits, num_tiles, num_splits):
        key = _tile_keys(lut_ptr, packed_ptr, bias_ptr, qt, t * BLOCK_N, N, MR, P, NBLK,
                         K, BITS, BLOCK_B, BLOCK_N, P_CHUNK, HAS_BIAS, USE_GATHER)
        # each query's current k-th best key; a tile that beats none of them cannot change the output
        kth = tl.sum(tl.where(cols[None, :] == KOUT - 1, best, 0), axis=1)
        if tl.max((key > kth[:, None]).to(tl.int32)) > 0:
            new = tl.sort(key, 1, False)
            # descending `best` vs ascending `new`: the element-wise max is the top BLOCK_N of the union
            best = tl.sort(tl.maximum(best, new), 1, True)
    out = keys_ptr + (q.to(tl.int64)[:, None] * num_splits + split) * KOUT + cols[None, :]
    tl.store(out, best, mask=(q < B)[:, None] & (cols < KOUT)[None, :])


def decode_keys(keys: Tensor) -> Tuple[Tensor, Tensor]:
    """Inverse of the in-kernel key: ``(float32 score, int64 class)`` of int64 keys."""
    hi = (keys >> 32).to(torch.int32)
    vals = (hi ^ ((hi >> 31) & 0x7FFFFFFF)).view(torch.float32)
    idx = 4294967295 - (keys & 0xFFFFFFFF)
    return vals, idx


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2  # interpreter: a few programs are enough to exercise the split/merge path


def scan_config(batch: int, k: int, bits: int) -> dict:
    """Default tiles (untuned on hardware so far: benchmarks/gpu_bench.py sweeps alternatives).

    * ``BLOCK_B = min(next_pow2(B), 16)``: one code read serves up to 16 queries;
    * ``BLOCK_N = max(next_pow2(k), 128, 2048 / BLOCK_B)`` capped at 1024 (unless k needs more):
      the kept top-k is one full tile, and small batches get wider tiles for more bytes in flight;
    * ``BLOCK_B * BLOCK_N`` at most 4096 (two int64 key tiles live in registers);
    * ``P_CHUNK`` code bytes per class per loop step: 8 for 4-bit at B = 1, else 4 (4-bit) / 2 (8-bit);
    * 8 warps once the tile holds 2048 keys (no register spills at sm_90), else 4.
    """
    block_b = min(triton.next_power_of_2(max(batch, 1)), 16)
    block_n = max(triton.next_power_of_2(max(k, 1)), 128, min(1024, 2048 // block_b))
    while block_b > 1 and block_b * block_n > 4096:
        block_b //= 2
    if bits == 4:
        p_chunk = 8 if block_b == 1 else 4
    else:
        p_chunk = 4 if block_b == 1 else 2
    num_warps = 8 if block_b * block_n >= 2048 else 4
    return dict(block_b=block_b, block_n=block_n, p_chunk=p_chunk, num_warps=num_warps, use_gather=False)


def triton_lut_topk(
    lut: Tensor, packed: Tensor, num_classes: int, k: int, bias: Optional[Tensor] = None,
    *, num_splits: Optional[int] = None, block_b: Optional[int] = None, block_n: Optional[int] = None,
    p_chunk: Optional[int] = None, num_warps: Optional[int] = None, use_gather: Optional[bool] = None,
) -> Tuple[Tensor, Tensor]:
    """Top-``k`` of ``score[b, n] = sum_m lut[b, m, code[n, m]] + bias[n]``: ``(values, indices)``
    of shape ``(B, min(k, N))``, best first, float32 sums of the (float32 or float16) LUT.

    Keyword arguments override the tile heuristics (benchmarks sweep them)."""
    check_lut_scan_args(f32_view(lut), packed, num_classes, bias)
    check_k(k)
    bias = None if bias is None else bias.contiguous()  # the kernel reads bias[n] at unit stride
    check_finite(lut, bias)
    batch, m, kc = lut.shape
    bits = 4 if kc == 16 else 8
    kk = min(k, num_classes)
    if batch == 0 or kk == 0:
        return lut.new_empty((batch, kk), dtype=torch.float32), torch.empty((batch, kk), dtype=torch.int64, device=lut.device)
    if triton.next_power_of_2(kk) > _MAX_TILE:
        # the kept top-k would not fit a register tile: exact scores, then torch.topk
        return triton_lut_score(lut, packed, num_classes, bias).topk(kk, dim=1)
    cfg = scan_config(batch, kk, bits)
    block_b = block_b or cfg["block_b"]
    block_n = max(block_n or cfg["block_n"], triton.next_power_of_2(kk))
    p_chunk = p_chunk or cfg["p_chunk"]
    num_warps = num_warps or cfg["num_warps"]
    use_gather = cfg["use_gather"] if use_gather is None else use_gather
    p = packed.shape[1]
    rows = lut_rows(m, bits, p_chunk)
    lut = interleave_lut(lut, block_b, rows)
    packed = packed.contiguous()
    num_tiles = triton.cdiv(num_classes, block_n)
    q_tiles = triton.cdiv(batch, block_b)
    if num_splits is None:
        num_splits = triton.cdiv(4 * _num_sms(lut.device), q_tiles)
    num_splits = max(1, min(num_splits, num_tiles))
    keys = torch.empty((batch, num_splits, kk), dtype=torch.int64, device=lut.device)
    _scan_topk_kernel[(num_splits, q_tiles)](
        lut, packed, bias if bias is not None else lut, keys,
        batch, num_classes, rows, p, packed.shape[0], num_tiles, num_splits, kk,
        K=kc, BITS=bits, BLOCK_B=block_b, BLOCK_N=block_n, P_CHUNK=p_chunk,
        HAS_BIAS=bias is not None, USE_GATHER=use_gather, num_warps=num_warps,
    )
    keys = keys.view(batch, num_splits * kk)
    if num_splits > 1:
        keys = keys.topk(kk, dim=1).values  # keys are unique, so this is an exact merge
    return decode_keys(keys)
