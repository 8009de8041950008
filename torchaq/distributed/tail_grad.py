"""The tail's weight gradient of the vocabulary-parallel sampled loss (:mod:`torchaq.training.tail_grad`, split over ranks).

The single-device estimate, ``(B / R) sum_{b in R} g_b 1[c not in E_b] p_bc h_b`` for ``R`` random
rows of the batch, is a sum over classes of terms that need only the row's global log-sum-exp:
every rank computes its slice's logits of the ``R`` rows, the log-sum-exp is combined over the
ranks (all-reduce max, then sum, of ``R`` values), and each rank's weight gradient is its own
slice's. Group rank 0 draws the rows and broadcasts them (``R`` integers), so every rank uses the
same rows. For the same rows and exact sets the gradient is the single-device one, to float
summation order.

Cost per rank, in the forward: ``R V_r d`` multiply-adds for the logits (kept for the backward:
``R V_r`` floats) and ``R V_r d`` more in the backward.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from torchaq.distributed.mappings import parallel_logsumexp
from torchaq.training.tail_grad import tail_rows


def vp_tail_weight_gradient(layer, flat: Tensor, exact: Tensor, num_rows: int,
                            generator: Optional[torch.Generator] = None) -> Tensor:
    """Zeros ``(B,)`` whose gradient in this rank's weight and bias slice is the tail's (module docstring).

    ``flat`` ``(B, d)`` the rows; ``exact`` ``(B, n)`` each row's exact set on this slice (local
    class ids, ``-1`` for none)."""
    local = layer.local
    weight, bias = local.weight, local.bias
    batch, device = flat.shape[0], flat.device
    rows = tail_rows(batch, num_rows, weight, bias, generator, device)
    if rows is None:
        return torch.zeros(batch, dtype=torch.float32, device=device)
    if num_rows < batch and layer.world_size > 1:  # group rank 0's draw of the rows
        dist.broadcast(rows, src=layer.root, group=layer.group)
    logits = F.linear(flat.detach()[rows].to(weight.dtype), weight, bias).float()  # (R, V_r)
    with torch.no_grad():
        lse = parallel_logsumexp(torch.logsumexp(logits, dim=1), layer.group)
        p = torch.exp(logits - lse.unsqueeze(1))
        ids = exact[rows]
        hits = torch.zeros_like(p).scatter_add_(1, ids.clamp_min(0), (ids >= 0).float())  # -1: no class
        p = p.masked_fill(hits > 0, 0.0)
        p = p * (batch / rows.numel())  # the row draw's Horvitz-Thompson weight
    term = (p * logits).sum(1)  # its gradient in the logits is p: sum_{b, c} p_bc h_b into w_c
    return torch.zeros(batch, dtype=torch.float32, device=device).index_add(0, rows, term - term.detach())
