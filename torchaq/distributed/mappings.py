"""Communication with autograd for the vocabulary-parallel layer (Megatron's ``tensor_parallel/mappings.py``).

* :func:`copy_to_parallel_region`: identity forward, all-reduce SUM of the gradient in backward
  (a replicated input read by every rank);
* :func:`reduce_from_parallel_region`: all-reduce SUM forward, identity backward;
* :func:`parallel_logsumexp`: ``log sum_r exp(x_r)`` over the ranks (all-reduce MAX, then SUM,
  as Megatron's ``vocab_parallel_cross_entropy``), with the softmax-weighted gradient.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


class _CopyToParallelRegion(torch.autograd.Function):
    """Identity forward; all-reduce (sum) of the gradient in backward: ``h`` feeds every rank."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


class _ReduceFromParallelRegion(torch.autograd.Function):
    """All-reduce (sum) forward; identity backward (the loss is replicated on every rank)."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        out = x.contiguous().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


class _ParallelLogSumExp(torch.autograd.Function):
    """``log sum_r exp(x_r)`` over ranks: all-reduce MAX, then SUM of ``exp(x_r - max)``.

    Backward needs no communication: ``d out / d x_r = exp(x_r - out)`` (the loss, and so the
    incoming gradient, is the same on every rank).
    """

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        x = x.float().contiguous()
        top = x.detach().clone()
        dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
        safe = torch.where(torch.isfinite(top), top, torch.zeros_like(top))  # all pieces -inf: log 0 = -inf
        total = torch.exp(x - safe)
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
        out = safe + torch.log(total)
        ctx.save_for_backward(x, out)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, out = ctx.saved_tensors
        weight = torch.where(torch.isfinite(x), torch.exp(x - out), torch.zeros_like(x))
        return grad * weight, None


def copy_to_parallel_region(x: Tensor, group=None) -> Tensor:
    """``x`` unchanged; in backward its gradient is summed over the ranks of ``group``."""
    return _CopyToParallelRegion.apply(x, group)


def reduce_from_parallel_region(x: Tensor, group=None) -> Tensor:
    """Sum of ``x`` over the ranks of ``group`` (all-reduce); backward passes the gradient through."""
    return _ReduceFromParallelRegion.apply(x, group)


def parallel_logsumexp(x: Tensor, group=None) -> Tensor:
    """``log sum_r exp(x_r)`` elementwise over the ranks of ``group`` (all-reduce max, then sum)."""
    return _ParallelLogSumExp.apply(x, group)
