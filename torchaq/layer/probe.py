"""A measured recall check after fitting narrow tables, so poor recall is loud instead of silent.

Product quantization needs dimensions to spread its codes over: at ``d = 8`` with the default
``M = d / 2`` codes of 2 dimensions each, recall@10 of random-direction queries falls to about 0.9
(0.84 at ``d = 4``, where :mod:`torchaq.layer.exact` already scores exactly). After a fit of a
table narrower than :data:`PROBE_BELOW_DIM`, :func:`probe_recall` measures recall@10 of the layer's
own ``topk`` against the exact top-10 on :data:`PROBE_QUERIES` queries (the calibration queries
if given, else seeded Gaussian ones), and :func:`warn_if_poor` warns with the measured number and
its cause when it is below :data:`MIN_RECALL`. Cost: ``PROBE_QUERIES * V * d`` once per fit.
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import Tensor

PROBE_BELOW_DIM = 16
PROBE_QUERIES = 64
MIN_RECALL = 0.95
K = 10


@torch.no_grad()
def probe_recall(layer, queries: Optional[Tensor] = None) -> float:
    """recall@10 (``min(10, V)``) of ``layer.topk`` against the exact top-k on probe queries."""
    w = layer.weight.detach().float()
    if queries is None:
        queries = torch.randn(PROBE_QUERIES, layer.dim, generator=torch.Generator().manual_seed(0)).to(w.device)
        queries = queries * w.norm(dim=1).mean().clamp_min(1e-6).reciprocal()
    q = queries[:PROBE_QUERIES].float()
    k = min(K, layer.num_classes)
    logits = q @ w.T
    if layer.bias is not None:
        logits = logits + layer.bias.detach().float()
    truth = logits.topk(k, dim=1).indices
    _, got = layer.topk(q, k=k)
    hits = (got.unsqueeze(2) == truth.unsqueeze(1)).any(dim=2).float()
    return float(hits.mean())


def warn_if_poor(layer, queries: Optional[Tensor] = None) -> Optional[float]:
    """After a fit: probe narrow tables and warn with the measured recall if it is poor (module docstring)."""
    if layer.dim >= PROBE_BELOW_DIM or layer.exact_reason is not None:
        return None
    recall = probe_recall(layer, queries)
    if recall < MIN_RECALL:
        warnings.warn(
            f"QuantizedSoftmax: measured recall@{K} = {recall:.2f} on {PROBE_QUERIES} probe queries: weight has only "
            f"d={layer.dim} columns for {layer.quantizer.num_subspaces} codes. Use bits=8, more candidates=, "
            "or topk(..., guarantee='bound') for exact results.",
            RuntimeWarning,
            stacklevel=4,
        )
    return recall
