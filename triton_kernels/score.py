"""Triton kernel: dense LUT scores of every class.

    score[b, n] = sum_m LUT[b, m, code[n, m]] + bias[n]          -> (B, N) float32

Same tiling and look-ups as the top-k scan (:func:`triton_kernels.tiles.tile_scores`): a program
owns ``BLOCK_B`` queries x ``BLOCK_N`` classes and writes its tile of scores. The sums are exact
float32 sums of the float32 LUT (only the summation order differs from the torch reference).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from torchaq.ops.layout import check_lut_scan_args

from .tiles import f32_view, interleave_lut, lut_rows, tile_scores


@triton.jit
def _lut_score_kernel(
    lut_ptr, packed_ptr, bias_ptr, out_ptr,
    B, N, MR, P, NBLK,
    K: tl.constexpr, BITS: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, P_CHUNK: tl.constexpr,
    HAS_BIAS: tl.constexpr, USE_GATHER: tl.constexpr,
):
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    q = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    n_mask = n < N
    s = tile_scores(lut_ptr, packed_ptr, bias_ptr, tl.program_id(1), tl.program_id(0) * BLOCK_N, N, MR, P, NBLK,
                     K, BITS, BLOCK_B, BLOCK_N, P_CHUNK, HAS_BIAS, USE_GATHER)
    out = out_ptr + q.to(tl.int64)[:, None] * N + n[None, :]
    tl.store(out, s, mask=(q < B)[:, None] & n_mask[None, :])


def triton_lut_score(
    lut: Tensor, packed: Tensor, num_classes: int, bias: Optional[Tensor] = None,
    *, block_b: Optional[int] = None, block_n: int = 128, p_chunk: Optional[int] = None,
    num_warps: int = 4, use_gather: bool = False,
) -> Tensor:
    """``(B, N)`` float32 ``sum_m lut[b, m, code[n, m]] + bias[n]`` (what ``torchaq.ops.lut_score`` returns)."""
    check_lut_scan_args(f32_view(lut), packed, num_classes, bias)
    bias = None if bias is None else bias.contiguous()  # the kernel reads bias[n] at unit stride
    batch, m, kc = lut.shape
    bits = 4 if kc == 16 else 8
    out = torch.empty((batch, num_classes), dtype=torch.float32, device=lut.device)
    if out.numel() == 0:
        return out
    block_b = block_b or min(triton.next_power_of_2(batch), 16)
    p_chunk = p_chunk or (4 if bits == 4 else 2)
    rows = lut_rows(m, bits, p_chunk)
    grid = (triton.cdiv(num_classes, block_n), triton.cdiv(batch, block_b))
    _lut_score_kernel[grid](
        interleave_lut(lut, block_b, rows), packed.contiguous(), bias if bias is not None else lut, out,
        batch, num_classes, rows, packed.shape[1], packed.shape[0],
        K=kc, BITS=bits, BLOCK_B=block_b, BLOCK_N=block_n, P_CHUNK=p_chunk,
        HAS_BIAS=bias is not None, USE_GATHER=use_gather, num_warps=num_warps,
    )
    return out
