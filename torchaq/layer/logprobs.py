"""Exact log-probabilities of given classes under the full softmax, without a ``(B, V)`` logit matrix.

``log p(c | h) = l_c / T - logsumexp_i (l_i / T)`` with ``l = h @ W.T + b`` over all ``V`` classes.
Exact means exact: ``log Z`` is a log-sum-exp of every exact logit (:func:`torchaq.ops.row_log_partition`:
tiles of classes, no ``(B, V)`` matrix), and a row's value is bitwise the same alone or in any batch
(a batched matmul lets the BLAS pick its blocking by batch size, and its rows then differ by
rounding). The cost is the dense layer's: ``B * V * d`` multiply-adds, one read of ``W`` per call
(``benchmarks/sampling.py`` prints it). The class logits themselves come from
:func:`torchaq.ops.row_logits` (``B * C * d``).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from torchaq import ops
from torchaq.checks import check_real
from torchaq.ops.rescore import row_logits

# relative slack of the truncation floor (float32 dot products in different orders differ by ~1e-7)
FLOOR_SLACK = 1e-5


def row_log_partition(h: Tensor, weight: Tensor, bias: Optional[Tensor], temperature: float = 1.0,
                      floor: Optional[Tensor] = None) -> Tensor:
    """Exact ``logsumexp_i(l_i / T)`` per row of ``(B, d)`` ``h``: float32 ``(B,)`` (or ``(B, 2)``).

    With ``floor`` (``(B,)`` logits), also the log-sum-exp over the classes with ``l_i >= floor``
    only (the truncated distribution's partition function; ``-inf`` floors keep every class):
    returns ``(B, 2)`` ``[full, truncated]``. :func:`torchaq.ops.row_log_partition` (module docstring).
    """
    if floor is not None:
        # the floor is an exact logit computed by another kernel (another summation order): a
        # class at the floor must not fall out by a last-bit difference of its logit there
        floor = (floor - FLOOR_SLACK * (1 + floor.abs())).float().contiguous()
    out = ops.row_log_partition(h, weight, bias, temperature, floor)
    return out if floor is not None else out[:, 0]


def token_logprobs(h: Tensor, weight: Tensor, bias: Optional[Tensor], tokens: Tensor,
                   temperature: float = 1.0) -> Tensor:
    """Exact ``log softmax(l / T)[token]`` for ``(B, d)`` ``h`` and int64 ``(B, n)`` ``tokens``: float32 ``(B, n)``.

    Batch-invariant (module docstring); costs one pass over ``W`` per row plus ``B * n * d``.
    """
    logits = row_logits(h, weight.detach(), None if bias is None else bias.detach(), tokens)
    return logits / temperature - row_log_partition(h, weight, bias, temperature).unsqueeze(1)


def layer_token_logprobs(layer, h: Tensor, tokens: Tensor, temperature: float = 1.0) -> Tensor:
    """:meth:`torchaq.QuantizedSoftmax.token_logprobs`: argument checks, then :func:`token_logprobs`."""
    flat = layer.flat_features(h)
    lead = tuple(h.shape[:-1])
    temperature = check_real(temperature, "temperature", "a finite number > 0", lambda t: 0 < t < math.inf)
    if not isinstance(tokens, Tensor) or tokens.dtype not in (torch.int64, torch.int32):
        desc = tokens.dtype if isinstance(tokens, Tensor) else type(tokens).__name__
        raise ValueError(f"tokens must be an int64 tensor of shape {lead} or {lead} + (n,), got {desc}")
    if tuple(tokens.shape) == lead:
        ids = tokens.reshape(-1, 1)
    elif tokens.dim() == len(lead) + 1 and tuple(tokens.shape[:-1]) == lead:
        ids = tokens.reshape(flat.shape[0], -1)
    else:
        raise ValueError(f"tokens must have shape {lead} or {lead} + (n,), got {tuple(tokens.shape)}")
    ids = ids.to(device=flat.device, dtype=torch.int64)
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= layer.num_classes):
        raise ValueError(f"tokens must be class ids in [0, {layer.num_classes}), got values in "
                         f"[{int(ids.min())}, {int(ids.max())}]")
    out = token_logprobs(flat, layer.weight, layer.bias, ids, temperature)
    return out.reshape(tokens.shape)
