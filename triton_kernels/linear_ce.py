"""Triton kernels of ``torch.ops.torchaq.linear_ce`` (the fused linear cross-entropy) for CUDA.

Semantics and formulas: :mod:`torchaq.ops.linear_ce`. Two kernels, every logit tile on chip:

* ``_lce_stats_kernel``: a program owns ``BLOCK_M`` rows and one of ``S`` spans of the classes;
  it walks the span in ``BLOCK_V`` tiles (``e_tile @ c_tile^T`` over ``BLOCK_D`` slices of ``d``,
  float32 accumulation, IEEE float32 products: no TF32), applies bias and softcap, and keeps a
  running max, sum of exponentials and sum of logits per row, plus the target's logit. The ``S``
  partials are combined on the host side into ``lse`` and the loss (``O(S N)`` floats).
* ``_lce_grad_kernel`` (with ``row_grad``): a program owns a ``BLOCK_M x BLOCK_V`` tile, recomputes
  its logits, forms ``dz`` (module docstring of :mod:`torchaq.ops.linear_ce`) and adds ``dz @
  c_tile`` into ``grad_e`` and ``dz^T @ e_tile`` into ``grad_c`` with float32 atomics (as Cut
  Cross-Entropy's backward does), and ``sum_rows dz`` into ``grad_bias``.

Cost ``N V d`` multiply-adds for the loss and ``3 N V d`` more for the gradients (the logits are
recomputed: a GPU tile cannot hold a row chunk's logits); memory: the partials, the float32
gradient accumulators and nothing of size ``N V``. No gradient filtering.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from torchaq.ops.linear_ce import acc_dtype, check_linear_ce_args


@triton.jit
def _logit_tile(e_ptr, c_ptr, b_ptr, rows, cols, rmask, cmask, D, softcap,
                HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr,
                BLOCK_D: tl.constexpr, PREC: tl.constexpr):
    acc = tl.zeros((BLOCK_M, BLOCK_V), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_D):
        ks = k0 + tl.arange(0, BLOCK_D)
        kmask = ks < D
        et = tl.load(e_ptr + rows.to(tl.int64)[:, None] * D + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        ct = tl.load(c_ptr + cols.to(tl.int64)[:, None] * D + ks[None, :], mask=cmask[:, None] & kmask[None, :], other=0.0)
        acc += tl.dot(et, tl.trans(ct), input_precision=PREC)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    if SOFTCAP:
        acc = softcap * (2.0 * tl.sigmoid(2.0 * acc / softcap) - 1.0)
    return acc


@triton.jit
def _lce_stats_kernel(e_ptr, c_ptr, b_ptr, t_ptr, pm_ptr, ps_ptr, pl_ptr, tlog_ptr, N, V, D, span, softcap,
                      HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr,
                      BLOCK_D: tl.constexpr, PREC: tl.constexpr):
    split = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < N
    tgt = tl.load(t_ptr + rows, mask=rmask, other=-1)
    v_start = split * span
    v_end = tl.minimum(V, v_start + span)
    m = tl.full((BLOCK_M,), -float("inf"), tl.float32)
    s = tl.zeros((BLOCK_M,), tl.float32)
    lsum = tl.zeros((BLOCK_M,), tl.float32)
    tlog = tl.zeros((BLOCK_M,), tl.float32)
    for v0 in range(v_start, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        cmask = cols < v_end
        logits = _logit_tile(e_ptr, c_ptr, b_ptr, rows, cols, rmask, cmask, D, softcap,
                             HAS_BIAS, SOFTCAP, BLOCK_M, BLOCK_V, BLOCK_D, PREC)
        lsum += tl.sum(tl.where(cmask[None, :], logits, 0.0), 1)
        tlog += tl.sum(tl.where(cols[None, :] == tgt[:, None], logits, 0.0), 1)
        logits = tl.where(cmask[None, :], logits, -float("inf"))
        new_m = tl.maximum(m, tl.max(logits, 1))
        s = s * tl.exp(m - new_m) + tl.sum(tl.exp(logits - new_m[:, None]), 1)
        m = new_m
    out = split * N + rows
    tl.store(pm_ptr + out, m, mask=rmask)
    tl.store(ps_ptr + out, s, mask=rmask)
    tl.store(pl_ptr + out, lsum, mask=rmask)
    tl.store(tlog_ptr + rows, tlog, mask=rmask & (tgt >= v_start) & (tgt < v_end))


@triton.jit
def _lce_grad_kernel(e_ptr, c_ptr, b_ptr, t_ptr, lse_ptr, a_ptr, sm_ptr, tc_ptr, ge_ptr, gc_ptr, gb_ptr, N, V, D,
                     softcap, HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    rmask = rows < N
    cmask = cols < V
    logits = _logit_tile(e_ptr, c_ptr, b_ptr, rows, cols, rmask, cmask, D, softcap,
                         HAS_BIAS, SOFTCAP, BLOCK_M, BLOCK_V, BLOCK_D, PREC)
    tgt = tl.load(t_ptr + rows, mask=rmask, other=-1)
    lse = tl.load(lse_ptr + rows, mask=rmask, other=0.0)
    a = tl.load(a_ptr + rows, mask=rmask, other=0.0)
    sm = tl.load(sm_ptr + rows, mask=rmask, other=0.0)
    tc = tl.load(tc_ptr + rows, mask=rmask, other=0.0)
    dz = a[:, None] * tl.exp(logits - lse[:, None]) - sm[:, None]
    if SOFTCAP:
        q = logits / softcap
        dz = dz * (1.0 - q * q)
    dz -= tl.where(cols[None, :] == tgt[:, None], tc[:, None], 0.0)
    dz = tl.where(rmask[:, None] & cmask[None, :], dz, 0.0)
    for k0 in range(0, D, BLOCK_D):
        ks = k0 + tl.arange(0, BLOCK_D)
        kmask = ks < D
        et = tl.load(e_ptr + rows.to(tl.int64)[:, None] * D + ks[None, :], mask=rmask[:, None] & kmask[None, :],
                     other=0.0).to(tl.float32)
        ct = tl.load(c_ptr + cols.to(tl.int64)[:, None] * D + ks[None, :], mask=cmask[:, None] & kmask[None, :],
                     other=0.0).to(tl.float32)
        tl.atomic_add(ge_ptr + rows.to(tl.int64)[:, None] * D + ks[None, :], tl.dot(dz, ct, input_precision="ieee"),
                      mask=rmask[:, None] & kmask[None, :])
        tl.atomic_add(gc_ptr + cols.to(tl.int64)[:, None] * D + ks[None, :],
                      tl.dot(tl.trans(dz), et, input_precision="ieee"), mask=cmask[:, None] & kmask[None, :])
    if HAS_BIAS:
        tl.atomic_add(gb_ptr + cols, tl.sum(dz, 0), mask=cmask)


def triton_linear_ce(e: Tensor, c: Tensor, bias: Optional[Tensor], targets: Tensor, row_grad: Optional[Tensor] = None,
                     ignore_index: int = -100, softcap: float = 0.0, label_smoothing: float = 0.0, z_loss: float = 0.0,
                     class_block: int = 512, row_chunk: int = 0, *, block_m: int = 64, block_v: int = 64,
                     block_d: int = 32, splits: Optional[int] = None, num_warps: int = 4):
    """What ``torch.ops.torchaq.linear_ce`` returns (``class_block`` / ``row_chunk`` are the CPU
    kernel's tiling and are ignored here: the tiles are ``block_m x block_v x block_d``)."""
    check_linear_ce_args(e, c, bias, targets, row_grad, softcap, label_smoothing, class_block, row_chunk)
    acc = acc_dtype(e.dtype)
    n, d = e.shape
    v = c.shape[0]
    e, c = e.contiguous(), c.contiguous()
    t = targets.long().contiguous()
    valid = t != ignore_index
    if bool((valid & ((t < 0) | (t >= v))).any()):
        raise ValueError(f"targets must be in [0, {v}) or ignore_index={ignore_index}")
    b = bias.contiguous() if bias is not None else e
    prec = "ieee" if e.dtype == torch.float32 else "tf32"  # bf16 / fp16 tiles: exact products, float32 sums
    n_tiles = triton.cdiv(v, block_v)
    splits = splits or max(1, min(n_tiles, 128 // max(1, triton.cdiv(n, block_m))))
    span = triton.cdiv(n_tiles, splits) * block_v
    splits = triton.cdiv(v, span)
    pm = torch.empty((splits, n), dtype=torch.float32, device=e.device)
    ps, pl = torch.empty_like(pm), torch.empty_like(pm)
    tlog = torch.zeros((n,), dtype=torch.float32, device=e.device)
    flags = dict(HAS_BIAS=bias is not None, SOFTCAP=softcap > 0, BLOCK_M=block_m, BLOCK_V=block_v, BLOCK_D=block_d,
                 PREC=prec, num_warps=num_warps)
    if n:
        _lce_stats_kernel[(triton.cdiv(n, block_m), splits)](e, c, b, t, pm, ps, pl, tlog, n, v, d, span,
                                                             float(softcap), **flags)
    gmax = pm.amax(0) if n else pm.new_zeros((0,))
    lse = gmax + torch.log((ps * torch.exp(pm - gmax)).sum(0))
    loss = lse - (1 - label_smoothing) * tlog - (label_smoothing / v) * pl.sum(0) + z_loss * lse * lse
    loss = torch.where(valid, loss, torch.zeros_like(loss)).to(acc)
    lse = lse.to(acc)
    if row_grad is None:
        return loss, lse, e.new_empty((0,)), c.new_empty((0,)), e.new_empty((0,))
    g = torch.where(valid, row_grad.float(), torch.zeros_like(tlog))
    lse32 = lse.float()
    a = (g * (1 + 2 * z_loss * lse32)).contiguous()
    smooth = (g * label_smoothing / v).contiguous()
    tcoef = g * (1 - label_smoothing)
    if softcap > 0:
        tcoef = tcoef * (1 - (tlog / softcap) ** 2)
    ge = torch.zeros((n, d), dtype=torch.float32, device=e.device)
    gc = torch.zeros((v, d), dtype=torch.float32, device=e.device)
    gb = torch.zeros((v,), dtype=torch.float32, device=e.device)
    if n:
        _lce_grad_kernel[(triton.cdiv(n, block_m), n_tiles)](e, c, b, t, lse32.contiguous(), a, smooth,
                                                             tcoef.contiguous(), ge, gc, gb, n, v, d, float(softcap),
                                                             **flags)
    return (loss, lse, ge.to(e.dtype), gc.to(c.dtype),
            gb.to(bias.dtype) if bias is not None else e.new_empty((0,)))
