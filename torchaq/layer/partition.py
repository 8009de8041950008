"""The log-partition ``log Z`` behind :meth:`torchaq.QuantizedSoftmax.log_softmax_topk`.

``Z = sum_c exp(l_c)`` splits into the candidates ``C`` (exact logits, already computed) and the
rest ``R``. Summing the float LUT scores ``s_c`` of the rest instead of their logits is biased
low: the rest is, by construction, the classes the scan ranked *below* the candidates, so their
LUT errors ``e_c = l_c - s_c`` are selected to be negative, and a flat softmax puts much of its
mass there. The rest is instead estimated by importance sampling with the LUT softmax as the
proposal (a ratio estimator with the LUT mass as control variate):

    Z_R ~= (sum_{c in R} exp(s_c)) * (1/n) sum_{j=1..n} exp(l_{c_j} - s_{c_j}),
    c_j ~ exp(s_c) / sum_{c' in R} exp(s_{c'})

which is unbiased for ``Z_R`` because ``E[exp(l - s)] = Z_R / sum_R exp(s)`` under that proposal.
The ``n`` classes are drawn by systematic sampling (the ``(j + 1/2) / n`` quantiles of the
proposal's cumulative mass, accumulated block by block), which is deterministic -- the same ``h`` gives the same ``log Z`` --
and has lower variance than independent draws. Where the candidates hold nearly all the mass,
the correction changes nothing that matters; where they hold little (flat softmaxes), it removes
the selection bias. Cost on top of the full ``(B, V)`` LUT score pass: a softmax, a cumulative sum
and a search over ``V`` per row, and ``B n d`` multiply-adds for the exact logits of the sample.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from torchaq.ops.rescore import row_logits

# classes of the rest scored exactly per row to correct its LUT mass
REST_SAMPLES = 256
# sampled classes whose rows are gathered at once (bounds the (B, chunk, d) gather)
SAMPLE_CHUNK = 16
# classes per block of the log-sum-exp and the cumulative mass (bounds the (B, block) temporaries)
CLASS_BLOCK = 4096


def log_partition(
    h: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    logits: Tensor,
    classes: Tensor,
    lut_scores: Tensor,
    samples: int = REST_SAMPLES,
) -> Tensor:
    """``log Z`` per row ``(B,)`` from the exact candidate ``logits`` / ``classes`` ``(B, C)`` and the
    float LUT scores ``(B, V)`` of every class (bias included; overwritten in place); see the module docstring.

    Candidates may repeat a class or hold ``-inf`` logits (masked duplicates); both are handled.
    ``samples = 0`` gives the uncorrected estimate ``logsumexp(candidates, LUT scores of the rest)``.
    """
    rest = lut_scores.scatter_(1, classes, -math.inf)  # in place: the only (B, V) buffer
    num = rest.shape[1]
    # log-sum-exp of the rest, CLASS_BLOCK classes at a time (no (B, V) exp temporary)
    peak = rest.amax(dim=1)
    has_rest = torch.isfinite(peak)
    shift = torch.where(has_rest, peak, 0.0)
    total = torch.zeros_like(shift)
    for a in range(0, num, CLASS_BLOCK):
        total += (rest[:, a : a + CLASS_BLOCK] - shift.unsqueeze(1)).exp().sum(dim=1)
    log_rest = torch.where(has_rest, shift + total.log(), -math.inf)
    log_cand = torch.logsumexp(logits, dim=1)
    if samples > 0 and num > 0:
        # systematic sampling: the (j + 1/2) / n quantiles of the proposal's cumulative mass, found
        # block by block (running total ``carry``) instead of in a (B, V) cumulative sum
        norm = torch.where(has_rest, log_rest, 0.0).unsqueeze(1)
        u = (torch.arange(samples, device=rest.device, dtype=rest.dtype) + 0.5) / samples
        u = (u.unsqueeze(0) * total.mul(torch.exp(shift - norm.squeeze(1))).unsqueeze(1)).contiguous()
        pick = torch.full(u.shape, num - 1, dtype=torch.int64, device=rest.device)
        carry = torch.zeros(rest.shape[0], 1, device=rest.device, dtype=rest.dtype)
        for a in range(0, num, CLASS_BLOCK):
            cum = (rest[:, a : a + CLASS_BLOCK] - norm).exp_().cumsum_(dim=1).add_(carry)
            inside = (u > carry) & (u <= cum[:, -1:])
            idx = torch.searchsorted(cum, u).clamp_(max=cum.shape[1] - 1) + a
            pick = torch.where(inside, idx, pick)
            carry = cum[:, -1:]
        # the sample's exact logits SAMPLE_CHUNK classes at a time: never a (B, samples, d) gather
        exact = torch.cat([row_logits(h, weight, bias, pick[:, j : j + SAMPLE_CHUNK])
                           for j in range(0, samples, SAMPLE_CHUNK)], dim=1)
        ratio = torch.logsumexp(exact - rest.gather(1, pick), dim=1) - math.log(samples)
        log_rest = torch.where(has_rest, log_rest + ratio, log_rest)
    return torch.logaddexp(log_cand, log_rest)
