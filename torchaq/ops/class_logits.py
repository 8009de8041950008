"""Exact logits of a few classes per row, differentiable, without gathering ``(B, C, d)`` weight rows.

The sampled losses read, for every row ``b``, the exact logits ``l_bc = <h_b, W_c> + b_c`` of its
own classes (the hard set, the target; per-row draws) and of classes shared by all rows (shared
draws). :func:`class_logits` returns both from one autograd node:

* **per-row classes** ``(B, C)``: on CPU in float32, a sampled dense-dense product
  (``torch.sparse.sampled_addmm`` on a CSR pattern of the distinct (row, class) pairs: a class
  repeated within a row, such as a target also in the hard set, is computed once) in the forward
  pass, and two sparse-dense products in the backward: ``dh = G W`` (``G`` the ``(B, V)`` sparse
  gradient of the logits) and ``dW += G^T h``, accumulated in place into the one dense ``(V, d)``
  weight gradient. Cost ``O(B C d)`` multiply-adds in each pass and no ``(B, C, d)`` buffer: the
  gather of the rows, a batched mat-vec and, in the backward, a batched outer product would each
  write ``B C d`` floats, which is most of a sampled step on a CPU (``benchmarks/sampled_softmax.py``
  times it);
* **shared classes** ``(u,)``: one gather of ``u`` rows and a matmul (``B u d``).

Elsewhere (another device, other dtypes, under ``torch.compile``, which does not trace sparse
tensors) the per-row logits are the gathered rows' batched mat-vec (:func:`gather_rows`,
:func:`logits_of_rows`): the same values to float32 rounding (another summation order).
"""
from __future__ import annotations

import warnings
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from torchaq.ops.rescore import gather_rows, logits_of_rows


def _csr_tensor(crow: Tensor, col: Tensor, values: Tensor, shape: Tuple[int, int]) -> Tensor:
    """A CSR tensor built without torch's one-time "beta" notice (nothing a user of the loss can act on);
    the invariants hold by construction, so they are not checked."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(crow, col, values, shape, check_invariants=False)


def _row_pattern(per_row: Tensor, num_classes: int) -> Tuple[Tensor, Tensor, Tensor]:
    """The distinct (row, class) pairs of ``per_row`` ``(B, C)`` as a CSR pattern: ``(crow (B + 1,),
    col (P,), inverse (B C,))``, pairs sorted by row then class (a class repeated within a row, such as
    a target that is also in the hard set, is one entry: CSR columns must not repeat); ``inverse``
    maps each input entry to its pair."""
    batch = per_row.shape[0]
    keys = (torch.arange(batch, device=per_row.device).unsqueeze(1) * num_classes + per_row).reshape(-1)
    pairs, inverse = torch.unique(keys, return_inverse=True)  # sorted: by row, then class
    crow = torch.zeros(batch + 1, dtype=torch.int64, device=per_row.device)
    crow[1:] = torch.bincount(torch.div(pairs, num_classes, rounding_mode="floor"), minlength=batch).cumsum(0)
    return crow, pairs.remainder(num_classes), inverse


def _transposed_csr(crow: Tensor, col: Tensor, values: Tensor, num_classes: int) -> Tensor:
    """The ``(V, B)`` CSR transpose of a row pattern (each class's entries sorted by row)."""
    batch = crow.numel() - 1
    order = torch.argsort(col, stable=True)  # by class, then by row (the pattern is sorted by row)
    crow_t = torch.zeros(num_classes + 1, dtype=torch.int64, device=col.device)
    crow_t[1:] = torch.bincount(col, minlength=num_classes).cumsum(0)
    row_of = torch.repeat_interleave(torch.arange(batch, device=col.device), crow.diff())[order]
    return _csr_tensor(crow_t, row_of, values[order], (num_classes, batch))


class _ClassLogits(torch.autograd.Function):
    """Per-row and shared class logits (module docstring); ``h``, ``weight`` float32 on CPU."""

    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, bias: Optional[Tensor], per_row: Tensor, shared: Tensor,
                shared_weight_grad: bool):
        with torch.autocast(h.device.type, enabled=False):
            batch, num_classes = h.shape[0], weight.shape[0]
            crow, col, inverse = _row_pattern(per_row, num_classes)
            pattern = _csr_tensor(crow, col, h.new_zeros(col.numel()), (batch, num_classes))
            values = torch.sparse.sampled_addmm(pattern, h, weight.T, beta=0.0).values()
            logits = values[inverse].view(per_row.shape)
            rows = weight.index_select(0, shared)
            shared_logits = h @ rows.T
            if bias is not None:
                logits = logits + bias[per_row].float()
                shared_logits = shared_logits + bias[shared].float()
        ctx.save_for_backward(h, weight, crow, col, inverse, shared, rows)
        ctx.has_bias, ctx.bias_dtype = bias is not None, None if bias is None else bias.dtype
        ctx.shared_weight_grad = shared_weight_grad
        return logits, shared_logits

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_per_row: Optional[Tensor], grad_shared: Optional[Tensor]):
        h, weight, crow, col, inverse, shared, rows = ctx.saved_tensors
        batch, num_classes = h.shape[0], weight.shape[0]
        g = h.new_zeros(col.numel())  # the gradient of each distinct pair (repeats summed)
        if grad_per_row is not None:
            g.index_add_(0, inverse, grad_per_row.float().reshape(-1))
        gs = torch.zeros((batch, shared.numel()), dtype=h.dtype, device=h.device) if grad_shared is None \
            else grad_shared.float()
        grad_h = grad_w = grad_b = None
        with torch.autocast(h.device.type, enabled=False):
            if ctx.needs_input_grad[0]:
                grad_h = torch.sparse.mm(_csr_tensor(crow, col, g, (batch, num_classes)), weight) + gs @ rows
            if ctx.needs_input_grad[1]:
                grad_w = torch.zeros_like(weight)
                if col.numel():  # in place: torch.sparse.mm would allocate (and zero) a second (V, d)
                    grad_w.addmm_(_transposed_csr(crow, col, g, num_classes), h)
                if ctx.shared_weight_grad:
                    grad_w.index_add_(0, shared, gs.T @ h)
            if ctx.has_bias and ctx.needs_input_grad[2]:
                grad_b = torch.zeros(num_classes, dtype=torch.float32, device=h.device)
                grad_b.index_add_(0, col, g)
                if ctx.shared_weight_grad:
                    grad_b.index_add_(0, shared, gs.sum(0))
                grad_b = grad_b.to(ctx.bias_dtype)
        return grad_h, grad_w, grad_b, None, None, None


def _sparse_path(h: Tensor, weight: Tensor) -> bool:
    return (h.device.type == "cpu" and weight.device.type == "cpu" and weight.dtype == torch.float32
            and weight.dim() == 2 and not torch.compiler.is_compiling())


def class_logits(h: Tensor, weight: Tensor, bias: Optional[Tensor], per_row: Sequence[Tensor],
                 shared: Optional[Tensor] = None, shared_weight_grad: bool = True) -> Tuple[List[Tensor], Optional[Tensor]]:
    """Exact float32 logits ``<h_b, W_c> + bias_c`` (module docstring) of each per-row class tensor
    in ``per_row`` (int64 ``(B, n_i)``; classes may repeat within a row) and of the ``shared`` classes
    (int64 ``(u,)``, the same for every row; ``None``: none): ``([(B, n_i) ...], (B, u) or None)``.
    Differentiable in ``h``, ``weight`` and ``bias``; cost ``O(B (sum n_i + u) d)``.
    ``shared_weight_grad=False``: the shared classes' logits pass gradient to ``h`` only, not to
    ``weight`` / ``bias`` (the sampled loss's weight gradient then comes from elsewhere,
    :mod:`torchaq.training.tail_grad`)."""
    widths = [t.shape[1] for t in per_row]
    classes = torch.cat(list(per_row), dim=1)
    shared_ids = shared if shared is not None else classes.new_zeros(0)
    for name, ids in (("per_row", classes), ("shared", shared_ids)):
        # checked here: the sparse path does not check its pattern (an id out of range would read out of bounds)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= weight.shape[0]):
            raise ValueError(f"{name} must hold class ids in [0, V={weight.shape[0]}), got values in "
                             f"[{int(ids.min())}, {int(ids.max())}]")
    if _sparse_path(h, weight) and classes.shape[0] and classes.shape[1]:
        logits, shared_logits = _ClassLogits.apply(h.float(), weight, bias, classes, shared_ids, shared_weight_grad)
    else:
        gathered = gather_rows(weight, classes, shared_ids)
        logits = logits_of_rows(h, gathered[0], bias, classes)
        shared_rows = gathered[1] if shared_weight_grad else gathered[1].detach()
        shared_logits = h.float() @ shared_rows.float().T
        if bias is not None:
            shared_bias = bias[shared_ids] if shared_weight_grad else bias.detach()[shared_ids]
            shared_logits = shared_logits + shared_bias.float()
    return list(logits.split(widths, dim=1)), (shared_logits if shared is not None else None)
