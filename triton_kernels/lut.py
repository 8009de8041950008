"""Triton kernel: lookup tables from queries and PQ codebooks.

    LUT[b, m, j] = sum_t q[b, m * dsub + t] * C[m, j, t]        (inner product of sub-vectors)

queries ``(B, M * dsub)`` (any float dtype, read with their strides), codebooks ``(M, K, dsub)``;
the result ``(B, M, K)`` is contiguous, float32 (or float16 with ``out_dtype``), which is the
layout the scan kernels read (one subspace's K entries adjacent). Accumulation is float32.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from torchaq.ops.layout import check_compute_lut_args


@triton.jit
def _compute_lut_kernel(
    q_ptr, cb_ptr, out_ptr,
    B, DSUB,
    stride_qb, stride_qd,
    M: tl.constexpr, K: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_b = tl.program_id(0)
    m = tl.program_id(1)
    q = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    qmask = q < B
    j = tl.arange(0, K)
    dd = tl.arange(0, BLOCK_D)
    acc = tl.zeros((BLOCK_B, K), dtype=tl.float32)
    # dsub is small (2..16 typical): a broadcast multiply-add over a chunk of dims beats tl.dot,
    # whose minimum tile (16) would waste most of its work here.
    for d0 in range(0, DSUB, BLOCK_D):
        d = d0 + dd
        dmask = d < DSUB
        qv = tl.load(
            q_ptr + q[:, None].to(tl.int64) * stride_qb + (m * DSUB + d)[None, :] * stride_qd,
            mask=qmask[:, None] & dmask[None, :], other=0.0,
        ).to(tl.float32)
        cv = tl.load(
            cb_ptr + (m * K + j)[:, None].to(tl.int64) * DSUB + d[None, :],
            mask=dmask[None, :], other=0.0,
        ).to(tl.float32)
        acc += tl.sum(qv[:, None, :] * cv[None, :, :], axis=2)
    out = out_ptr + q[:, None].to(tl.int64) * (M * K) + m * K + j[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=qmask[:, None])


def triton_compute_lut(queries: Tensor, codebooks: Tensor, out_dtype: Optional[torch.dtype] = None) -> Tensor:
    """``LUT[b, m, j] = <q[b, m*dsub:(m+1)*dsub], C[m, j]>`` as a contiguous ``(B, M, K)`` tensor.

    ``out_dtype`` is float32 (default, what ``torch.ops.torchaq.compute_lut`` returns) or float16
    (half the on-chip footprint for the scan; entries are O(|q_m| |C_m|), far from fp16 range).
    """
    check_compute_lut_args(queries, codebooks)
    out_dtype = torch.float32 if out_dtype is None else out_dtype
    if out_dtype not in (torch.float32, torch.float16):
        raise TypeError(f"out_dtype must be float32 or float16, got {out_dtype}")
    batch = queries.shape[0]
    m, k, dsub = codebooks.shape
    out = torch.empty((batch, m, k), dtype=out_dtype, device=queries.device)
    if out.numel() == 0:
        return out
    if k & (k - 1):
        # the kernel keeps the K codewords of one subspace in one power-of-two tile
        return _fallback(queries, codebooks).to(out_dtype)
    codebooks = codebooks.contiguous()
    block_d = min(triton.next_power_of_2(dsub), 8 if k >= 256 else 16)
    # keep the (BLOCK_B, K, BLOCK_D) product tile near 4k elements
    block_b = max(1, min(triton.next_power_of_2(batch), 4096 // (k * block_d)))
    grid = (triton.cdiv(batch, block_b), m)
    _compute_lut_kernel[grid](
        queries, codebooks, out, batch, dsub, queries.stride(0), queries.stride(1),
        M=m, K=k, BLOCK_B=block_b, BLOCK_D=block_d,
    )
    return out


def _fallback(queries: Tensor, codebooks: Tensor) -> Tensor:
    from torchaq.ops import compute_lut_reference  # torchaq.ops imports nothing from triton_kernels

    return compute_lut_reference(queries, codebooks)
