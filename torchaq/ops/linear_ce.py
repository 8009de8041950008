"""``torch.ops.torchaq.linear_ce``: the fused linear cross-entropy kernel (loss, log-sum-exp and, on
request, the gradients) without the ``(N, V)`` logits.

For rows ``e_b`` (``(N, d)``), classes ``c_v`` (``(V, d)``), optional ``bias`` and targets ``t_b``:

    z_bv   = <e_b, c_v> + bias_v
    l_bv   = s * tanh(z_bv / s)              (softcap s > 0; l = z when softcap == 0)
    lse_b  = log sum_v exp(l_bv)
    loss_b = lse_b - (1 - eps) l_{b t_b} - (eps / V) sum_v l_bv + zc * lse_b^2     (0 where t_b == ignore_index)

(``eps`` = ``label_smoothing``, ``zc`` = ``z_loss``): exactly ``F.cross_entropy(l, t,
label_smoothing=eps, reduction="none")`` plus the z-loss. With ``row_grad`` (``(N,)``, the
gradient ``g_b`` of the caller's objective with respect to ``loss_b``) the op also returns

    dl_bv  = g_b ((1 + 2 zc lse_b) p_bv - (1 - eps) 1[v = t_b] - eps / V),   p_bv = exp(l_bv - lse_b)
    dz_bv  = dl_bv (1 - (l_bv / s)^2)        (softcap; dz = dl otherwise)
    grad_e = dz @ c,   grad_c = dz^T @ e,   grad_bias = sum_b dz_b            (ignored rows: g_b = 0)

Outputs ``(loss, lse, grad_e, grad_c, grad_bias)``: ``loss`` and ``lse`` are ``(N,)`` in the
accumulation dtype (float64 for float64 inputs, float32 otherwise: bf16 / fp16 inputs accumulate
in float32); the gradients have the dtypes of ``e``, ``c`` and ``bias``, or are empty ``(0,)``
tensors when ``row_grad`` is None (and ``grad_bias`` when ``bias`` is None).

``class_block`` is the classes per tile, ``row_chunk`` the rows whose logits one pass holds
(0: as many as fit a 128 MB buffer, and at least 64 and ``d / 2``). The reference walks the
classes in blocks (twice when gradients are asked for: once for the log-sum-exp, once for the
gradients); the C++ kernel (``torchaq/csrc/linear_ce.cpp``) computes each row chunk's logits
once into an ``(row_chunk, V)`` buffer and derives loss and gradients from it (three ``N V d`` products
instead of four); the Triton kernel (``triton_kernels/linear_ce.py``) keeps every tile on chip.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from torchaq.ops.schemas import LIB

DEFAULT_CLASS_BLOCK = 512
# rows of the logit buffer of the C++ kernel: as many as fit this many elements (128 MB fp32)
ROW_CHUNK_ELEMENTS = 1 << 25


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype of the op: float64 for float64 inputs, float32 for the rest."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_linear_ce_args(e: Tensor, c: Tensor, bias: Optional[Tensor], targets: Tensor, row_grad: Optional[Tensor],
                         softcap: float, label_smoothing: float, class_block: int, row_chunk: int) -> None:
    """Shape / dtype / device rules of ``linear_ce`` (every backend's first step)."""
    if not isinstance(e, Tensor) or e.dim() != 2 or not e.is_floating_point():
        raise ValueError(f"e must be a floating-point (N, d) tensor, got {getattr(e, 'shape', type(e))}")
    if not isinstance(c, Tensor) or c.dim() != 2 or not c.is_floating_point():
        raise ValueError(f"c must be a floating-point (V, d) tensor, got {getattr(c, 'shape', type(c))}")
    if c.shape[1] != e.shape[1]:
        raise ValueError(f"c has d = {c.shape[1]} but e has d = {e.shape[1]}")
    if c.dtype != e.dtype:
        raise TypeError(f"c must have e's dtype {e.dtype}, got {c.dtype}")
    if c.device != e.device:
        raise ValueError(f"c is on {c.device} but e is on {e.device}")
    if bias is not None:
        if bias.shape != (c.shape[0],) or not bias.is_floating_point():
            raise ValueError(f"bias must be a floating-point ({c.shape[0]},) tensor, got {tuple(bias.shape)} {bias.dtype}")
        if bias.device != e.device:
            raise ValueError(f"bias is on {bias.device} but e is on {e.device}")
    if targets.shape != (e.shape[0],) or targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"targets must be an int64 ({e.shape[0]},) tensor, got {tuple(targets.shape)} {targets.dtype}")
    if targets.device != e.device:
        raise ValueError(f"targets is on {targets.device} but e is on {e.device}")
    if row_grad is not None and (row_grad.shape != (e.shape[0],) or row_grad.device != e.device):
        raise ValueError(f"row_grad must be a ({e.shape[0]},) tensor on {e.device}, got {tuple(row_grad.shape)}")
    if softcap < 0 or not math.isfinite(softcap):
        raise ValueError(f"softcap must be > 0 (or 0 for none), got {softcap}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if class_block < 1 or row_chunk < 0:
        raise ValueError(f"class_block must be >= 1 and row_chunk >= 0, got {class_block}, {row_chunk}")


def _empty_like_grads(e: Tensor, c: Tensor, bias: Optional[Tensor], row_grad: Optional[Tensor]):
    if row_grad is None:
        return e.new_empty((0,)), c.new_empty((0,)), e.new_empty((0,))
    gb = bias.new_empty(bias.shape) if bias is not None else e.new_empty((0,))
    return e.new_empty(e.shape), c.new_empty(c.shape), gb


@torch.library.register_fake("torchaq::linear_ce")
def _linear_ce_fake(e, c, bias, targets, row_grad, ignore_index, softcap, label_smoothing, z_loss, class_block,
                    row_chunk):
    check_linear_ce_args(e, c, bias, targets, row_grad, softcap, label_smoothing, class_block, row_chunk)
    acc = acc_dtype(e.dtype)
    n = e.shape[0]
    return (e.new_empty((n,), dtype=acc), e.new_empty((n,), dtype=acc)) + _empty_like_grads(e, c, bias, row_grad)


def _block_logits(ef: Tensor, c: Tensor, bias: Optional[Tensor], start: int, stop: int, softcap: float) -> Tensor:
    z = ef @ c[start:stop].to(ef.dtype).T
    if bias is not None:
        z = z + bias[start:stop].to(ef.dtype)
    return softcap * torch.tanh(z / softcap) if softcap > 0 else z


@torch.library.impl(LIB, "linear_ce", "CompositeExplicitAutograd")
def linear_ce_reference(e: Tensor, c: Tensor, bias: Optional[Tensor], targets: Tensor, row_grad: Optional[Tensor],
                        ignore_index: int, softcap: float, label_smoothing: float, z_loss: float, class_block: int,
                        row_chunk: int) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    check_linear_ce_args(e, c, bias, targets, row_grad, softcap, label_smoothing, class_block, row_chunk)
    acc = acc_dtype(e.dtype)
    n, num_classes = e.shape[0], c.shape[0]
    ef = e.to(acc)
    t = targets.long()
    valid = t != ignore_index
    bad = valid & ((t < 0) | (t >= num_classes))
    if bool(bad.any()):
        raise ValueError(f"targets must be in [0, {num_classes}) or ignore_index={ignore_index}, got {int(t[bad][0])}")
    rows = torch.arange(n, device=e.device)
    run_max = torch.full((n,), -math.inf, dtype=acc, device=e.device)
    run_sum = torch.zeros((n,), dtype=acc, device=e.device)
    logit_sum = torch.zeros((n,), dtype=acc, device=e.device)
    target_logit = torch.zeros((n,), dtype=acc, device=e.device)
    for start in range(0, num_classes, class_block):
        stop = min(num_classes, start + class_block)
        logits = _block_logits(ef, c, bias, start, stop, softcap)
        new_max = torch.maximum(run_max, logits.amax(1))
        run_sum = run_sum * torch.exp(run_max - new_max) + torch.exp(logits - new_max.unsqueeze(1)).sum(1)
        run_max = new_max
        logit_sum = logit_sum + logits.sum(1)
        inside = valid & (t >= start) & (t < stop)
        local = (t - start).clamp(0, stop - start - 1)
        target_logit = torch.where(inside, logits.gather(1, local.unsqueeze(1)).squeeze(1), target_logit)
    lse = run_max + torch.log(run_sum)
    loss = lse - (1 - label_smoothing) * target_logit - (label_smoothing / num_classes) * logit_sum + z_loss * lse * lse
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    grads = _empty_like_grads(e, c, bias, row_grad)
    if row_grad is None:
        return loss, lse, *grads
    g = torch.where(valid, row_grad.to(acc), torch.zeros_like(lse))
    a = (g * (1 + 2 * z_loss * lse)).unsqueeze(1)
    grad_e = torch.zeros_like(ef)
    grad_c = torch.zeros(c.shape, dtype=acc, device=c.device)
    grad_b = torch.zeros((num_classes,), dtype=acc, device=c.device)
    for start in range(0, num_classes, class_block):
        stop = min(num_classes, start + class_block)
        logits = _block_logits(ef, c, bias, start, stop, softcap)
        dl = a * torch.exp(logits - lse.unsqueeze(1)) - (g * label_smoothing / num_classes).unsqueeze(1)
        inside = valid & (t >= start) & (t < stop)
        dl[rows[inside], t[inside] - start] -= (g * (1 - label_smoothing))[inside]
        if softcap > 0:
            dl = dl * (1 - (logits / softcap) ** 2)
        grad_e += dl @ c[start:stop].to(acc)
        grad_c[start:stop] = dl.T @ ef
        grad_b[start:stop] = dl.sum(0)
    return (loss, lse, grad_e.to(e.dtype), grad_c.to(c.dtype),
            grad_b.to(bias.dtype) if bias is not None else grads[2])


def linear_ce(e: Tensor, c: Tensor, bias: Optional[Tensor], targets: Tensor, row_grad: Optional[Tensor] = None,
              ignore_index: int = -100, softcap: float = 0.0, label_smoothing: float = 0.0, z_loss: float = 0.0,
              class_block: int = DEFAULT_CLASS_BLOCK, row_chunk: int = 0):
    """``torch.ops.torchaq.linear_ce`` (module docstring). Cost: ``N V d`` multiply-adds for the loss,
    ``3 N V d`` with gradients; memory ``O(row_chunk V)`` on CPU, ``O(tile)`` in the reference and Triton."""
    return torch.ops.torchaq.linear_ce(e, c, bias, targets, row_grad, ignore_index, float(softcap),
                                       float(label_smoothing), float(z_loss), class_block, row_chunk)
