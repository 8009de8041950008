"""Exact cross-entropy of a linear output layer without the ``(N, V)`` logits, with the call
signature of Apple's Cut Cross-Entropy (Wijmans et al. 2024, ``pip install cut-cross-entropy``)::

    loss = torchaq.linear_cross_entropy(e, c, targets, bias=None, ignore_index=-100, softcap=None,
                                        reduction="mean", label_smoothing=0.0, z_loss=0.0)

equals ``F.cross_entropy(softcap(e @ c.T + bias), targets, ignore_index=..., label_smoothing=...,
reduction=...)`` (plus ``z_loss * lse^2`` per kept row) to float rounding: the conventions of
:mod:`torchaq.training.conventions`. Every backend runs one op, ``torch.ops.torchaq.linear_ce``
(:mod:`torchaq.ops.linear_ce` has the formulas of loss and gradients).

**Where the time goes.** The full softmax costs ``3 N V d`` multiply-adds (logits, then the
gradients of ``e`` and ``c``) and holds the ``(N, V)`` logits and their gradient. A fused loss
that recomputes the logits in its backward (CCE, Liger, the usual flash-style kernel) costs
``4 N V d``. Here, when a gradient will be needed (grad mode on, ``e``, ``c`` or ``bias``
requires grad, ``reduction`` ``"mean"`` / ``"sum"``), the forward computes loss *and* gradients
from each row chunk's logits while it still holds them (``3 N V d``), and the backward only
scales them by the incoming scalar gradient: the gradients of ``e`` (``N d``), ``c`` (``V d``) and
``bias`` are kept from the forward to the backward. For ``reduction="none"`` (per-row upstream
gradients) the backward recomputes (``N V d`` forward + ``3 N V d`` backward). No gradient
filtering: every class contributes to every gradient, so the gradients are exact to float32
rounding (CCE skips blocks whose softmax is below float precision; on a class the batch never
predicts that leaves its gradient at zero, which Adam would then not move).

**Memory.** CPU: one ``(row_chunk, V)`` float32 buffer (by default 128 MB, or ``d / 2`` rows --
half the weight gradient's size -- where that is more; at least 64 rows) plus the gradients;
Triton: tiles on chip. Accumulation is float32 for bf16 / fp16 inputs (float64 for float64).

**Checks.** ``targets`` out of range (other than ``ignore_index``), ``e`` / ``c`` of different
dtypes or devices, non-finite ``e``, ``c`` or ``bias`` (one pass over each: a host sync, skipped
under ``torch.compile``), ``softcap <= 0``: errors naming the argument. A batch whose every
target is ``ignore_index`` gives NaN for ``mean`` and 0 for ``sum`` (as ``F.cross_entropy``), and
zero gradients.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from torchaq.checks import is_int
from torchaq.ops.linear_ce import DEFAULT_CLASS_BLOCK, linear_ce
from torchaq.training.conventions import (
    check_finite,
    check_loss_options,
    check_reduction,
    check_targets,
    kept_rows,
    reduce_loss,
)


class _LinearCrossEntropy(torch.autograd.Function):
    """Per-row loss; the backward recomputes the logits (``reduction="none"``, or no precompute)."""

    @staticmethod
    def forward(ctx, e: Tensor, c: Tensor, bias: Optional[Tensor], targets: Tensor, options: tuple):
        loss, lse, _, _, _ = linear_ce(e, c, bias, targets, None, *options)
        ctx.save_for_backward(e, c, bias, targets)
        ctx.options = options
        ctx.mark_non_differentiable(lse)
        return loss, lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss: Tensor, _grad_lse: Optional[Tensor]):
        e, c, bias, targets = ctx.saved_tensors
        row_grad = grad_loss.to(torch.float64 if e.dtype == torch.float64 else torch.float32).contiguous()
        _, _, ge, gc, gb = linear_ce(e, c, bias, targets, row_grad, *ctx.options)
        return (ge if ctx.needs_input_grad[0] else None, gc if ctx.needs_input_grad[1] else None,
                gb if bias is not None and ctx.needs_input_grad[2] else None, None, None)


class _LinearCrossEntropyReduced(torch.autograd.Function):
    """Scalar ``mean`` / ``sum`` loss whose gradients the forward computes from the logits it holds."""

    @staticmethod
    def forward(ctx, e: Tensor, c: Tensor, bias: Optional[Tensor], targets: Tensor, options: tuple, reduction: str,
                ignore_index: int):
        acc = torch.float64 if e.dtype == torch.float64 else torch.float32
        kept = kept_rows(targets, ignore_index).sum().to(acc)
        scale = 1.0 / kept if reduction == "mean" else torch.ones((), dtype=acc, device=e.device)
        row_grad = scale.expand(e.shape[0]).contiguous()
        loss, lse, ge, gc, gb = linear_ce(e, c, bias, targets, row_grad, *options)
        ctx.save_for_backward(ge, gc, gb if bias is not None else None)
        ctx.mark_non_differentiable(lse)
        return reduce_loss(loss, targets, reduction, ignore_index), lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor, _grad_lse: Optional[Tensor]):
        ge, gc, gb = ctx.saved_tensors

        def scaled(t):
            return t * grad.to(t.dtype)

        return (scaled(ge) if ctx.needs_input_grad[0] else None, scaled(gc) if ctx.needs_input_grad[1] else None,
                scaled(gb) if gb is not None and ctx.needs_input_grad[2] else None, None, None, None, None)


def check_linear_cross_entropy_args(e: Tensor, c: Tensor, targets: Tensor, bias: Optional[Tensor]) -> None:
    """Types, shapes, dtypes and devices of ``e``, ``c``, ``bias`` and ``targets`` (errors name the argument)."""
    if not isinstance(e, Tensor) or not e.is_floating_point() or e.dim() < 1:
        raise ValueError(f"e must be a floating-point (..., d) tensor, got {getattr(e, 'shape', type(e))}")
    if not isinstance(c, Tensor) or not c.is_floating_point() or c.dim() != 2 or c.shape[1] != e.shape[-1]:
        raise ValueError(f"c must be a floating-point (V, d={e.shape[-1]}) tensor, got {getattr(c, 'shape', type(c))}")
    if c.shape[0] < 1:
        raise ValueError("c must have at least one class (row)")
    if c.dtype != e.dtype:
        raise TypeError(f"c must have e's dtype {e.dtype}, got {c.dtype}")
    if c.device != e.device:
        raise ValueError(f"c is on {c.device} but e is on {e.device}")
    if bias is not None and (not isinstance(bias, Tensor) or not bias.is_floating_point() or bias.shape != (c.shape[0],)
                             or bias.device != e.device):
        raise ValueError(f"bias must be a floating-point ({c.shape[0]},) tensor on {e.device}, got "
                         f"{getattr(bias, 'shape', type(bias))}")


def linear_cross_entropy(
    e: Tensor,
    c: Tensor,
    targets: Tensor,
    bias: Optional[Tensor] = None,
    ignore_index: int = -100,
    softcap: Optional[float] = None,
    reduction: str = "mean",
    shift: bool = False,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    return_z_loss: bool = False,
    class_block: int = DEFAULT_CLASS_BLOCK,
    row_chunk: int = 0,
) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Exact ``F.cross_entropy(softcap(e @ c.T + bias), targets)`` without the ``(N, V)`` logits (module docstring).

    Args:
        e: ``(..., d)`` embeddings (the last hidden states); c: ``(V, d)`` classifier, same dtype and device.
        targets: int64 ``(...)`` class ids in ``[0, V)`` or ``ignore_index``.
        bias: optional ``(V,)``, added before the softcap.
        ignore_index: rows with this target get loss 0, zero gradient, and leave the mean.
        softcap: None, or ``s > 0``: logits ``s tanh(l / s)``.
        reduction: ``"mean"`` (over kept rows; NaN if none), ``"sum"`` or ``"none"`` (shape of ``targets``).
        shift: ``e[..., i, :]`` predicts ``targets[..., i + 1]`` (CCE's ``shift``; the loss covers ``T - 1`` positions).
        label_smoothing: eps in ``[0, 1]``, as ``F.cross_entropy``.
        z_loss: coefficient of ``lse^2`` added to each kept row's loss.
        return_z_loss: also return the z-loss term (reduced like the loss, detached: it is already in the loss).
        class_block: classes per tile; row_chunk: rows per logit buffer on CPU (0: auto).

    Returns the loss in the accumulation dtype (float32 for float32 / bf16 / fp16 inputs, as Cut
    Cross-Entropy; float64 for float64); the gradients have the dtypes of ``e``, ``c`` and ``bias``.

    Cost: ``3 N V d`` multiply-adds for forward + backward (``N V d`` without gradients); memory
    ``O(row_chunk V)`` on CPU beyond the gradients.
    """
    check_linear_cross_entropy_args(e, c, targets, bias)
    check_reduction(reduction)
    check_loss_options(softcap, label_smoothing, z_loss)
    if not is_int(ignore_index):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    for name, value, low in (("class_block", class_block, 1), ("row_chunk", row_chunk, 0)):
        if not is_int(value) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if shift:
        if e.dim() < 2:
            raise ValueError("shift=True needs e of shape (..., T, d)")
        e, targets = e[..., :-1, :], targets[..., 1:]
    check_targets(targets, e, c.shape[0], name="targets", ignore_index=ignore_index)
    check_finite(e=e, c=c, bias=bias)
    flat_e = e.reshape(-1, e.shape[-1]).contiguous()
    flat_t = targets.reshape(-1).long().contiguous()
    options = (int(ignore_index), float(softcap or 0.0), float(label_smoothing), float(z_loss), int(class_block),
               int(row_chunk))
    wants_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (e, c, bias))
    if wants_grad and reduction != "none":
        loss, lse = _LinearCrossEntropyReduced.apply(flat_e, c, bias, flat_t, options, reduction, int(ignore_index))
    else:
        rows, lse = _LinearCrossEntropy.apply(flat_e, c, bias, flat_t, options)
        loss = reduce_loss(rows, targets, reduction, ignore_index)
    if not return_z_loss:
        return loss
    z_rows = torch.where(kept_rows(flat_t, ignore_index), z_loss * lse * lse, torch.zeros_like(lse))
    return loss, reduce_loss(z_rows.to(loss.dtype), targets, reduction, ignore_index).detach()
