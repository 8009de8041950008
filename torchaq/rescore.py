"""Exact re-scoring of a few classes per row: the step after every LUT scan."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def exact_logits(h: Tensor, weight: Tensor, bias: Optional[Tensor], candidates: Tensor) -> Tensor:
    """Exact logits ``<h_b, W[c]> + bias[c]`` of per-row candidate classes, float32 ``(B, C)``.

    A gather of ``C`` rows per query and a batched mat-vec: ``B * C * d`` work instead of the
    dense layer's ``B * V * d``. Runs on any device (this is the GPU re-score step too) and is
    differentiable in ``h``, ``weight`` and ``bias`` (the sampled softmax trains through it).
    """
    # index_select copies whole rows, which is cheaper than advanced indexing weight[candidates]
    rows = weight.index_select(0, candidates.reshape(-1)).view(*candidates.shape, weight.shape[1])  # (B, C, d)
    out = torch.bmm(rows.float(), h.float().unsqueeze(2)).squeeze(2)
    if bias is not None:
        out = out + bias[candidates].float()
    return out
