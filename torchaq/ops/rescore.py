"""``torch.ops.torchaq.rescore_topk`` and the exact-logit helpers: re-scoring a few classes per row,
the step after every LUT scan (and the logits of the sampled losses)."""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from torchaq.ops.layout import check_k
from torchaq.ops.schemas import LIB


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


# weight elements gathered at once by row_logits (256 KB of float32; the product as much again): bounds
# its (B, C, d) temporaries; at least ROW_LOGITS_MIN_COLUMNS columns per block (few Python steps at large B)
ROW_LOGITS_ELEMENTS = 1 << 16
ROW_LOGITS_MIN_COLUMNS = 16


def row_logits(h: Tensor, weight: Tensor, bias: Optional[Tensor], classes: Tensor) -> Tensor:
    """Exact logits ``<h_b, W[c]> + bias[c]`` of per-row classes, float32 ``(B, C)``, batch-invariant.

    The same numbers as :func:`exact_logits`, computed so that a row's values are bitwise the same
    alone or in any batch: each dot product is its own reduction over ``d`` (``torch.linalg.vecdot``
    of the gathered rows), where the batched mat-vec of :func:`exact_logits` lets the BLAS pick a
    blocking by batch size (its rows differ by rounding from batch to batch). Cost: ``B * C * d``
    multiply-adds; the rows are gathered a block of columns at a time (about
    ``ROW_LOGITS_ELEMENTS`` weight elements, at least ``ROW_LOGITS_MIN_COLUMNS`` columns), which
    changes no value. Not differentiable through a custom node (inference).
    """
    rows, cols = classes.shape
    d = weight.shape[1]
    step = max(ROW_LOGITS_MIN_COLUMNS, ROW_LOGITS_ELEMENTS // max(1, rows * d))
    hf = h.float().unsqueeze(1)
    out = torch.empty(rows, cols, dtype=torch.float32, device=h.device)
    for a in range(0, cols, step):
        block = classes[:, a : a + step]
        gathered = weight.index_select(0, block.reshape(-1)).view(*block.shape, d)
        out[:, a : a + step] = torch.linalg.vecdot(gathered.float(), hf)
    if bias is not None:
        out = out + bias[classes].float()
    return out


def check_rescore_args(h: Tensor, weight: Tensor, bias: Optional[Tensor], candidates: Tensor, k: int) -> None:
    if h.dim() != 2:
        raise ValueError(f"h must be (B, d), got shape {tuple(h.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be (V, d), got shape {tuple(weight.shape)}")
    if not h.is_floating_point() or not weight.is_floating_point():
        raise TypeError(f"h and weight must be floating point, got {h.dtype}, {weight.dtype}")
    if h.shape[1] != weight.shape[1]:
        raise ValueError(f"h has d = {h.shape[1]} but weight has d = {weight.shape[1]}")
    if candidates.dim() != 2 or candidates.shape[0] != h.shape[0]:
        raise ValueError(f"candidates must be (B, C) with B = {h.shape[0]}, got shape {tuple(candidates.shape)}")
    if candidates.dtype != torch.int64:
        raise TypeError(f"candidates must be int64, got {candidates.dtype}")
    if bias is not None:
        if bias.dim() != 1 or bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
        if not bias.is_floating_point():
            raise TypeError(f"bias must be floating point, got {bias.dtype}")
    for name, t in (("weight", weight), ("candidates", candidates), ("bias", bias)):
        if t is not None and t.device != h.device:
            raise ValueError(f"{name} is on {t.device} but h is on {h.device}")
    check_k(k)


@torch.library.register_fake("torchaq::rescore_topk")
def _rescore_topk_fake(
    h: Tensor, weight: Tensor, bias: Optional[Tensor], candidates: Tensor, k: int
) -> Tuple[Tensor, Tensor]:
    check_rescore_args(h, weight, bias, candidates, k)
    kk = min(k, candidates.shape[1])
    return h.new_empty((h.shape[0], kk), dtype=torch.float32), candidates.new_empty((h.shape[0], kk))


@torch.library.impl(LIB, "rescore_topk", "CompositeExplicitAutograd")
def rescore_topk_reference(
    h: Tensor, weight: Tensor, bias: Optional[Tensor], candidates: Tensor, k: int
) -> Tuple[Tensor, Tensor]:
    check_rescore_args(h, weight, bias, candidates, k)
    if candidates.numel() and (int(candidates.min()) < 0 or int(candidates.max()) >= weight.shape[0]):
        raise ValueError(
            f"candidates must be class ids in [0, {weight.shape[0]}), got values in "
            f"[{int(candidates.min())}, {int(candidates.max())}]"
        )
    kk = min(k, candidates.shape[1])
    ids = candidates.sort(dim=1).values  # class order: the stable sort below breaks ties by class
    logits = row_logits(h, weight, bias, ids)  # batch-invariant (a row's values alone = in a batch)
    repeat = torch.zeros_like(ids, dtype=torch.bool)
    repeat[:, 1:] = ids[:, 1:] == ids[:, :-1]
    logits = logits.masked_fill(repeat, -math.inf)
    values, order = logits.sort(dim=1, descending=True, stable=True)
    return values[:, :kk].contiguous(), ids.gather(1, order[:, :kk]).contiguous()



def rescore_topk(
    h: Tensor, weight: Tensor, bias: Optional[Tensor], candidates: Tensor, k: int
) -> Tuple[Tensor, Tensor]:
    """Exact logits of candidate classes, best ``k`` first: ``(values, indices)`` of shape ``(B, min(k, C))``.

    ``logit[b, c] = <h[b], weight[c]> + bias[c]`` (float32) for the ``C`` classes in row ``b`` of
    ``candidates`` (int64 ``(B, C)``), ranked by logit (descending), ties by class id (ascending);
    a class repeated in a row counts once (its repeats score ``-inf``). The re-score step after
    every LUT scan (:meth:`torchaq.QuantizedSoftmax.topk`). Cost: ``B * C * d`` multiply-adds and
    ``B * C`` row reads; the CPU kernel reads each row once and keeps only the top ``k``, where the
    reference (:func:`exact_logits` then a sort) gathers a ``(B, C, d)`` block.
    """
    return torch.ops.torchaq.rescore_topk(h, weight, bias, candidates, k)

