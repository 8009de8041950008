"""Exact cross-entropy of a linear output layer without materialising the ``(B, V)`` logits.

    loss_b = logsumexp_c (h_b . W_c + bias_c) - (h_b . W_{t_b} + bias_{t_b})

The forward pass walks the vocabulary in chunks of ``chunk_size`` classes and keeps a running
(max, sum) log-sum-exp per row (the streaming softmax of Milakov & Gimelshein 2018, as in the
fused linear cross-entropy kernels of Liger and Apple's Cut Cross-Entropy, Wijmans et al.
2024). The backward pass recomputes each chunk's logits and uses ``dloss_b / dl_bc = g_b (p_bc
- 1[c = t_b])`` with ``p_bc = exp(l_bc - lse_b)``: ``grad_h += P_chunk @ W_chunk``, ``grad_W_chunk
= P_chunk^T @ h``, ``grad_bias_chunk = sum_b P_chunk``.

Cost: the full softmax's ``B V d`` multiply-adds in the forward pass and ``3 B V d`` in the
backward (the logits are computed twice); memory ``O(B chunk_size)`` for the logits instead of
``O(B V)``, and only ``h``, ``W``, ``bias``, the targets and the ``(B,)`` log-sum-exp are saved
for backward. It saves memory, not time: the sampled softmax saves both.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from torchaq.checks import is_int
from torchaq.training.conventions import check_reduction, check_targets, reduce_loss

DEFAULT_CHUNK = 4096


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor, chunk_size: int) -> Tensor:
        batch, num_classes = h.shape[0], weight.shape[0]
        dtype = torch.promote_types(h.dtype, torch.float32)
        hf = h.to(dtype)
        run_max = torch.full((batch,), -float("inf"), dtype=dtype, device=h.device)
        run_sum = torch.zeros((batch,), dtype=dtype, device=h.device)
        target_logit = torch.zeros((batch,), dtype=dtype, device=h.device)
        for start in range(0, num_classes, chunk_size):
            stop = min(num_classes, start + chunk_size)
            logits = hf @ weight[start:stop].to(dtype).T
            if bias is not None:
                logits = logits + bias[start:stop].to(dtype)
            new_max = torch.maximum(run_max, logits.amax(1))
            run_sum = run_sum * torch.exp(run_max - new_max) + torch.exp(logits - new_max.unsqueeze(1)).sum(1)
            run_max = new_max
            inside = (target >= start) & (target < stop)
            local = (target - start).clamp(0, stop - start - 1)
            target_logit = torch.where(inside, logits.gather(1, local.unsqueeze(1)).squeeze(1), target_logit)
        lse = run_max + torch.log(run_sum)
        ctx.save_for_backward(h, weight, bias, target, lse)
        ctx.chunk_size = chunk_size
        return (lse - target_logit).to(h.dtype)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        h, weight, bias, target, lse = ctx.saved_tensors
        chunk_size = ctx.chunk_size
        dtype = lse.dtype
        hf = h.to(dtype)
        g = grad_out.to(dtype)
        grad_h = torch.zeros_like(hf) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros(weight.shape, dtype=dtype, device=weight.device) if ctx.needs_input_grad[1] else None
        grad_b = torch.zeros(bias.shape, dtype=dtype, device=bias.device) if bias is not None and ctx.needs_input_grad[2] else None
        rows = torch.arange(h.shape[0], device=h.device)
        for start in range(0, weight.shape[0], chunk_size):
            stop = min(weight.shape[0], start + chunk_size)
            w = weight[start:stop].to(dtype)
            logits = hf @ w.T
            if bias is not None:
                logits = logits + bias[start:stop].to(dtype)
            p = torch.exp(logits - lse.unsqueeze(1))
            inside = (target >= start) & (target < stop)
            p[rows[inside], target[inside] - start] -= 1.0
            p = p * g.unsqueeze(1)
            if grad_h is not None:
                grad_h.addmm_(p, w)
            if grad_w is not None:
                grad_w[start:stop] = p.T @ hf
            if grad_b is not None:
                grad_b[start:stop] = p.sum(0)
        return (
            None if grad_h is None else grad_h.to(h.dtype),
            None if grad_w is None else grad_w.to(weight.dtype),
            None if grad_b is None else grad_b.to(bias.dtype),
            None,
            None,
        )


def chunked_cross_entropy(
    h: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    target: Tensor,
    chunk_size: int = DEFAULT_CHUNK,
    reduction: str = "mean",
) -> Tensor:
    """``F.cross_entropy(h @ weight.T + bias, target)`` exactly, in ``O(B chunk_size)`` memory (module docstring).

    Args:
        h: ``(..., d)`` floating-point rows.
        weight: ``(V, d)``; bias: optional ``(V,)``.
        target: int64 ``(...)`` class indices in ``[0, V)``.
        chunk_size: classes per chunk (positive integer).
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
    """
    if not isinstance(weight, Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"weight must be a floating-point (V, d) tensor, got {getattr(weight, 'shape', type(weight))}")
    num_classes, dim = weight.shape
    if not isinstance(h, Tensor) or not h.is_floating_point() or h.dim() < 1 or h.shape[-1] != dim:
        raise ValueError(f"h must be a floating-point tensor with last dimension d={dim}, got {getattr(h, 'shape', type(h))}")
    if bias is not None and (not isinstance(bias, Tensor) or bias.shape != (num_classes,)):
        raise ValueError(f"bias must have shape ({num_classes},), got {getattr(bias, 'shape', bias)}")
    check_targets(target, h, num_classes)
    if not is_int(chunk_size) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    check_reduction(reduction)
    flat = h.reshape(-1, dim)
    loss = _ChunkedCrossEntropy.apply(flat, weight, bias, target.reshape(-1).long(), int(chunk_size))
    return reduce_loss(loss, target, reduction)
