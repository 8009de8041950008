"""Exact scoring in bounded memory: the fallback for tables the codes cannot serve, and the entropy.

Some tables are better scored exactly than through lookup tables:

* ``V`` below the ``2**bits`` codewords of one codebook (codebooks cannot even be fitted);
* ``d`` below :data:`MIN_QUANTIZED_DIM`: a LUT of ``M = d / 2 <= 3`` entries costs about as much
  per class as the ``d`` multiply-adds of the exact logit, and its recall is poor (0.19 at d = 2).

For those, :class:`torchaq.QuantizedSoftmax` answers ``topk`` / ``log_softmax_topk`` / ``sample``
from the exact logits, computed ``ROW_CHUNK`` rows at a time so the peak holds ``ROW_CHUNK x V``
floats, never ``B x V``. :func:`exact_reason` says when (and why); the choice depends only on the
shapes and ``bits``, so a reloaded layer makes the same one.

:func:`entropy` is the exact softmax entropy ``H = log Z - sum_c p_c l_c`` by a streaming
log-sum-exp over blocks of classes (running max ``m``, ``s = sum exp(l - m)``,
``t = sum exp(l - m) (l - m)``; ``H = log s - t / s``): ``B V d`` multiply-adds like the dense
layer, but at most ``ROW_CHUNK x CLASS_CHUNK`` logits alive at once.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

# below this width the layer scores exactly (see the module docstring)
MIN_QUANTIZED_DIM = 8
# rows scored per block by the exact / chunked paths, and classes per block of the entropy
ROW_CHUNK = 128
CLASS_CHUNK = 2048


def exact_reason(num_classes: int, dim: int, bits: int) -> Optional[str]:
    """Why a ``(V, d)`` table at ``bits`` is scored exactly (None: it is quantized)."""
    if num_classes < 2**bits:
        return f"weight has V={num_classes} rows, fewer than the {2 ** bits} codewords of bits={bits}"
    if dim < MIN_QUANTIZED_DIM:
        return (f"weight has d={dim} < {MIN_QUANTIZED_DIM} columns: a lookup table of {max(1, dim // 2)} entries "
                "costs as much as the exact logit and ranks poorly")
    return None


def row_chunks(num_rows: int, chunk: int = ROW_CHUNK):
    """``(start, stop)`` blocks of at most ``chunk`` rows."""
    for start in range(0, num_rows, chunk):
        yield start, min(num_rows, start + chunk)


def _logits(h: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    return F.linear(h.float(), weight.float(), None if bias is None else bias.float())


@torch.no_grad()
def topk(h: Tensor, weight: Tensor, bias: Optional[Tensor], k: int) -> Tuple[Tensor, Tensor]:
    """Exact top-``k`` ``(values, indices)`` float32 / int64 ``(B, k)`` of ``(B, d)`` rows, ``ROW_CHUNK`` rows at a time."""
    vals = torch.empty(h.shape[0], k, device=h.device)
    idx = torch.empty(h.shape[0], k, dtype=torch.int64, device=h.device)
    w = weight.detach().float()
    for a, b in row_chunks(h.shape[0]):
        vals[a:b], idx[a:b] = _logits(h[a:b], w, bias).topk(k, dim=1)
    return vals, idx


@torch.no_grad()
def log_softmax_topk(h: Tensor, weight: Tensor, bias: Optional[Tensor], k: int) -> Tuple[Tensor, Tensor]:
    """Exact ``log_softmax`` of the top-``k`` classes ``(B, k)``, ``ROW_CHUNK`` rows at a time."""
    vals = torch.empty(h.shape[0], k, device=h.device)
    idx = torch.empty(h.shape[0], k, dtype=torch.int64, device=h.device)
    w = weight.detach().float()
    for a, b in row_chunks(h.shape[0]):
        logits = _logits(h[a:b], w, bias)
        top, idx[a:b] = logits.topk(k, dim=1)
        vals[a:b] = top - torch.logsumexp(logits, dim=1, keepdim=True)
    return vals, idx


@torch.no_grad()
def entropy(h: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """Exact softmax entropy in nats, float32 ``(B,)``, with at most ``ROW_CHUNK x CLASS_CHUNK`` logits alive."""
    w = weight.detach()
    out = torch.empty(h.shape[0], device=h.device)
    for a, b in row_chunks(h.shape[0]):
        x = h[a:b].float()
        # float32 blocks of shifted logits l - m, float64 running sums:
        #   s = sum exp(l - m),  t = sum exp(l - m) (l - m),  H = log s - t / s;
        # when the running max moves m -> m' (alpha = exp(m - m')): s <- alpha s, t <- alpha (t + (m - m') s)
        m = torch.full((b - a,), -math.inf, device=h.device)
        s = torch.zeros(b - a, device=h.device, dtype=torch.float64)
        t = torch.zeros(b - a, device=h.device, dtype=torch.float64)
        for c0 in range(0, w.shape[0], CLASS_CHUNK):
            c1 = min(w.shape[0], c0 + CLASS_CHUNK)
            shifted = _logits(x, w[c0:c1], None if bias is None else bias.detach()[c0:c1])
            new_m = torch.maximum(m, shifted.amax(dim=1))
            step = torch.where(torch.isfinite(m), m - new_m, 0.0).double()
            alpha = torch.exp(m - new_m).double()  # 0 on the first block (m = -inf)
            t = alpha * (t + step * s)
            s = alpha * s
            shifted.sub_(new_m.unsqueeze(1))
            e = shifted.exp()
            s = s + e.sum(dim=1, dtype=torch.float64)
            t = t + e.mul_(shifted).sum(dim=1, dtype=torch.float64)
            m = new_m
        out[a:b] = (s.log() - t / s).float()
    return out
