"""The weight gradient of a sampled softmax's tail, from the full softmax of a few rows of the batch.

For rows ``h_b`` with targets ``t_b``, objective weights ``g_b`` (the gradient of the reduced loss
in row ``b``'s loss) and exact sets ``E_b`` (the target and the hard set: the classes whose logits
the sampled loss computes for that row), the full cross-entropy's gradient in the weight row
``w_c`` splits in two:

    dL/dw_c = sum_b g_b 1[c in E_b] (p_bc - 1[c = t_b]) h_b  +  sum_b g_b 1[c not in E_b] p_bc h_b
              (the head: the sampled loss's exact logits)       (the tail)

with ``p_bc`` the softmax over all ``V`` classes. The sampled loss estimates the tail through its
draws: a class gets a gradient only on the steps it is drawn, weighted ``1 / pi(c)``. With Adam
that is the difference that matters in training (``examples/train_lm.py``): Adam normalises a
row's update by the root of its mean squared gradient, so a class that gets a gradient ``x /
pi`` once every ``1 / pi`` steps moves about ``sqrt(pi)`` as far as one that gets ``x`` every
step, and the rarely drawn classes -- most of a large vocabulary -- are pushed down far too
slowly. ``benchmarks/results/train_lm_*`` has the measured perplexities.

Here the tail is estimated from ``R`` rows drawn uniformly without replacement from the batch,
with the exact softmax over all ``V`` classes:

    tail_c ~= (B / R) sum_{b in R} g_b 1[c not in E_b] p_bc h_b

unbiased over the row draw (``P(b in R) = R / B``), and every class gets a gradient at every step.
The head keeps the sampled loss's exact-logit gradient, and ``h`` keeps the sampled loss's own
gradient (its draws): only the weight (and bias) gradient of the classes outside ``E_b`` changes.

**Cost** (in the backward pass only): one fused linear cross-entropy over the ``R`` rows
(``torch.ops.torchaq.linear_ce`` with gradients, ``3 R V d`` multiply-adds; memory its row
chunk, at most ``R V`` floats on CPU) and ``R |E| d`` for the exact sets' correction. It grows
with ``R``, ``V`` and ``d``, not with the batch.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from torchaq.checks import is_int
from torchaq.ops.linear_ce import linear_ce
from torchaq.ops.rescore import exact_logits
from torchaq.training.proposals import random_rows

# the default number of rows whose full softmax gives the tail's weight gradient: at least
# TAIL_GRAD_ROWS, and one in TAIL_ROWS_PER_BATCH of a larger batch (default_tail_rows)
TAIL_GRAD_ROWS = 64
TAIL_ROWS_PER_BATCH = 32


def default_tail_rows(batch: int) -> int:
    """``R = max(64, ceil(B / 32))``: the rows of a batch of ``B`` whose full softmax gives the tail.

    The estimate's variance grows with ``B / R`` (each sampled row stands for ``B / R`` rows), so
    a fixed ``R`` gets noisier as the batch grows; one row in 32 keeps ``B / R`` at 32 beyond
    2,048 rows, at about 1/32 of a full softmax's cost. ``benchmarks/results/linear_ce_tail_rows.txt``
    has the weight gradient's error against ``R`` at 8,192 rows."""
    return max(TAIL_GRAD_ROWS, -(-int(batch) // TAIL_ROWS_PER_BATCH))


def check_tail_grad_rows(tail_grad_rows, batch: Optional[int] = None) -> Optional[int]:
    """``tail_grad_rows`` checked: an integer >= 0 as given, or None for :func:`default_tail_rows` of
    ``batch`` rows (None again when ``batch`` is not given: a check only)."""
    if tail_grad_rows is None:
        return None if batch is None else default_tail_rows(batch)
    if isinstance(tail_grad_rows, bool) or not is_int(tail_grad_rows) or tail_grad_rows < 0:
        raise ValueError(f"tail_grad_rows must be None (the default: max(64, B / 32) rows) or an integer >= 0 "
                         f"(0: the draws' own weight gradient), got {tail_grad_rows!r}")
    return int(tail_grad_rows)


class _TailGradient(torch.autograd.Function):
    """Zeros ``(R,)`` whose backward puts the tail's weight and bias gradient of ``R`` rows (module docstring)."""

    @staticmethod
    def forward(ctx, weight: Tensor, bias: Optional[Tensor], h: Tensor, target: Tensor, exact: Tensor, scale: Tensor):
        ctx.save_for_backward(weight, bias, h, target, exact, scale)
        return torch.zeros(h.shape[0], dtype=torch.float32, device=h.device)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        weight, bias, h, target, exact, scale = ctx.saved_tensors
        row_grad = (grad.float() * scale).contiguous()
        # the full cross-entropy's gradient of the rows: sum_c (p_bc - 1[c = t_b]) g_b h_b for every class
        _, lse, _, grad_w, grad_b = linear_ce(h, weight, bias, target, row_grad)
        # minus its exact-set part: the sampled loss has those terms already
        with torch.no_grad():
            valid = exact >= 0
            ids = exact.clamp_min(0)
            logits = exact_logits(h, weight, bias, ids).float()
            coef = torch.exp(logits - lse.float().unsqueeze(1)) - (ids == target.unsqueeze(1)).float()
            coef = (coef * row_grad.unsqueeze(1)).masked_fill(~valid, 0.0)
            grad_w = grad_w.float()
            grad_w.index_add_(0, ids.reshape(-1), -(coef.unsqueeze(2) * h.float().unsqueeze(1)).flatten(0, 1))
            grad_w = grad_w.to(weight.dtype)
            if bias is not None:
                grad_b = grad_b.float().index_add_(0, ids.reshape(-1), -coef.reshape(-1)).to(bias.dtype)
        return (grad_w if ctx.needs_input_grad[0] else None,
                grad_b if bias is not None and ctx.needs_input_grad[1] else None, None, None, None, None)


def exact_sets(target: Tensor, hard: Optional[Tensor], owned: Optional[Tensor] = None) -> Tensor:
    """Each row's exact set ``E_b`` ``(B, n + 1)``: its hard set (distinct classes, ``-1``: none) and its
    target, the target's copy ``-1`` where the hard set holds it already or (``owned`` ``(B,)`` bool, a
    vocabulary slice) where the target is not in this slice."""
    keep = torch.ones_like(target, dtype=torch.bool) if owned is None else owned
    if hard is not None and hard.shape[1]:
        keep = keep & ~(hard == target.unsqueeze(1)).any(1)
    column = torch.where(keep, target, -1).unsqueeze(1)
    return column if hard is None else torch.cat([hard, column], dim=1)


def tail_rows(batch: int, num_rows: int, weight: Tensor, bias: Optional[Tensor],
              generator: Optional[torch.Generator], device: torch.device) -> Optional[Tensor]:
    """The ``R = num_rows`` rows of a batch of ``batch`` whose full softmax gives the tail
    (:func:`~torchaq.training.proposals.random_rows`; all rows if ``R >= B``), or None where there is
    nothing to do: an empty batch, ``R = 0``, or no gradient wanted in ``weight`` or ``bias``."""
    needs = torch.is_grad_enabled() and (weight.requires_grad or (bias is not None and bias.requires_grad))
    if batch == 0 or num_rows == 0 or not needs:
        return None
    return random_rows(batch, num_rows, generator, device) if num_rows < batch else torch.arange(batch, device=device)


def tail_weight_gradient(h: Tensor, target: Tensor, weight: Tensor, bias: Optional[Tensor], exact: Tensor,
                         num_rows: int, generator: Optional[torch.Generator] = None,
                         scale: Optional[Tensor] = None) -> Tensor:
    """Zeros ``(B,)`` to add to a per-row sampled loss: their gradient in ``weight`` and ``bias`` is
    the row-sampled tail (module docstring), for rows ``h`` ``(B, d)``, ``target`` ``(B,)`` and exact
    sets ``exact`` ``(B, n)`` (class ids, ``-1`` for none; :func:`exact_sets`).

    ``num_rows``: ``R`` (all rows if ``R >= B``); ``scale``: optional ``(B,)`` factor of each row's
    ``d loss_b / d log Z_b`` (``1 + 2 z log Z_b`` with a z-loss). ``h`` gets no gradient from it."""
    batch = h.shape[0]
    rows = tail_rows(batch, num_rows, weight, bias, generator, h.device)
    if rows is None:
        return torch.zeros(batch, dtype=torch.float32, device=h.device)
    factor = torch.full((rows.numel(),), batch / rows.numel(), dtype=torch.float32, device=h.device)
    if scale is not None:
        factor = factor * scale.detach().float()[rows]
    rows_h = h.detach()[rows].to(weight.dtype).contiguous()
    zeros = _TailGradient.apply(weight, bias, rows_h, target[rows].contiguous(), exact[rows], factor)
    return torch.zeros(batch, dtype=torch.float32, device=h.device).index_add(0, rows, zeros)
