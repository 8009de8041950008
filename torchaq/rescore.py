"""Exact re-scoring of a few classes per row: the step after every LUT scan."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor


class _GatherRows(torch.autograd.Function):
    """``weight.index_select`` for several index tensors whose backward fills one dense gradient."""

    @staticmethod
    def forward(ctx, weight: Tensor, *indices: Tensor) -> Tuple[Tensor, ...]:
        ctx.save_for_backward(*indices)
        ctx.weight_shape = weight.shape
        return tuple(weight.index_select(0, i.reshape(-1)).view(*i.shape, weight.shape[1]) for i in indices)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads: Optional[Tensor]):
        indices = ctx.saved_tensors
        grad = None
        if ctx.needs_input_grad[0]:
            ref = next((g for g in grads if g is not None), None)
            grad = torch.zeros(ctx.weight_shape, dtype=ref.dtype, device=ref.device)
            for i, g in zip(indices, grads):
                if g is not None:
                    grad.index_add_(0, i.reshape(-1), g.reshape(-1, grad.shape[1]))
        return (grad,) + (None,) * len(indices)


def gather_rows(weight: Tensor, *indices: Tensor) -> Tuple[Tensor, ...]:
    """The rows ``weight[i]`` for each index tensor ``i``, shaped ``(*i.shape, d)``.

    One autograd node for all index tensors, not one ``index_select`` each: the backward of an
    ``index_select`` on a ``(V, d)`` weight zero-fills a dense ``(V, d)`` gradient, so a loss
    that reads a hard set, the targets and the draws pays one ``V * d`` fill plus the
    ``index_add`` of the rows it read, instead of three fills and two dense additions.
    """
    if not torch.is_grad_enabled() or not weight.requires_grad:
        return tuple(weight.index_select(0, i.reshape(-1)).view(*i.shape, weight.shape[1]) for i in indices)
    return _GatherRows.apply(weight, *indices)


def logits_of_rows(h: Tensor, rows: Tensor, bias: Optional[Tensor], candidates: Tensor) -> Tensor:
    """``<h_b, rows[b, c]> + bias[candidates[b, c]]``, float32 ``(B, C)``, for rows gathered by :func:`gather_rows`."""
    out = torch.bmm(rows.float(), h.float().unsqueeze(2)).squeeze(2)
    if bias is not None:
        out = out + bias[candidates].float()
    return out


def exact_logits(h: Tensor, weight: Tensor, bias: Optional[Tensor], candidates: Tensor) -> Tensor:
    """Exact logits ``<h_b, W[c]> + bias[c]`` of per-row candidate classes, float32 ``(B, C)``.

    A gather of ``C`` rows per query and a batched mat-vec: ``B * C * d`` work instead of the
    dense layer's ``B * V * d``. Runs on any device (this is the GPU re-score step too) and is
    differentiable in ``h``, ``weight`` and ``bias`` (the sampled softmax trains through it).
    """
    # index_select copies whole rows, which is cheaper than advanced indexing weight[candidates]
    return logits_of_rows(h, gather_rows(weight, candidates)[0], bias, candidates)
