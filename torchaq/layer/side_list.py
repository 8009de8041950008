"""Rows the codes cannot represent: the exact side list, and the residual bound.

Product-quantization codebooks model the bulk of the rows. A row far from all of them -- a
special token such as MiniLM's ``[CLS]``, an end-of-sequence row of a language model, or a row
whose norm dwarfs the rest -- gets a code that says little about it, and its LUT score can rank
it thousands of places below where its exact logit belongs. Two remedies
live here:

**The side list** (:func:`select_side_rows`). A few rows are kept outside the codes and scored
exactly for every query (one gather + mat-vec of ``S`` rows, as LLM.int8() keeps its outlier
features in 16 bits). A row joins the list when one of its statistics lies far above the bulk,
measured with the robust z-score ``z = (v - median) / (1.4826 MAD)`` over all ``V`` rows:

* its norm ``|x_i|`` (huge rows: they would also take the codebooks' and the uint8 LUT's range);
* its residual norm ``|r_i| = |x_i - x~_i|`` (the Cauchy-Schwarz bound ``|h| |r_i|`` on its
  score error for any query ``h``), and its relative residual ``|r_i| / |x_i|``;
* with calibration queries ``Q``, its worst observed score error ``max_b |<h_b, r_i>|``.

Rows with ``z > threshold`` on any statistic are candidates; the ``max_rows`` with the largest
``z`` are kept (default ``max(16, V / 256)``), and never more than ``V / 2``. Cost: the
selection is ``O(V d)`` (plus ``O(B V d)`` for ``B`` calibration queries) at fit and at every
``refresh``; at inference each query batch pays ``B * S * d`` multiply-adds for the exact side
scores (``S << V``) and nothing in the scan: the side rows are kept out of the LUT ranking with
a very negative scan bias (:data:`SCAN_EXCLUDED`), so they never take a candidate slot twice.
Rows whose *norm* is far above the rest are also left out of codebook training
(:func:`fit_rows_mask`), so their codewords cannot take the range of the shared uint8 table.

**The bound** (:func:`bound_complete`). With each row's residual norm stored, the exact score
of row ``i`` is within ``|h| |r_i|`` of its float LUT score ``s_i`` (Cauchy-Schwarz on
``<h, x_i> - <h, x~_i> = <h, r_i>``). Any row whose upper bound ``s_i + |h| |r_i|`` is below the
``k``-th best exact logit already found cannot be in the top-``k``; scoring exactly every row
whose bound beats it makes the top-``k`` provably complete (up to float32 rounding, covered by
a small relative slack). Cost: a float LUT score pass over all ``V`` classes (``B V M``
look-ups) plus the exact scores of the rows the bound cannot rule out -- a dense ``B V d``
matmul when they are more than ``V / 8`` (the bound is only as tight as the residuals are small
next to the score gaps; ``benchmarks/results/outliers.txt`` reports how many rows it needs).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from torchaq.ops.rescore import exact_logits

# a row is a side-list candidate when one of its statistics has a robust z-score above this
DEFAULT_THRESHOLD = 8.0
# rows whose norm has a robust z-score above this are also left out of codebook training
FIT_NORM_THRESHOLD = 8.0
# default cap on the side list: max(MIN_SIDE_ROWS, V // SIDE_ROWS_PER)
MIN_SIDE_ROWS = 16
SIDE_ROWS_PER = 256
# scan bias of a side row: finite (the scans refuse inf), far below any real score
SCAN_EXCLUDED = -1e30
# calibration queries used for the observed-error statistic (a seeded subsample beyond this)
MAX_ERROR_QUERIES = 256
# bound_complete scores every row with one dense matmul once more than V / DENSE_FRACTION need it
DENSE_FRACTION = 8
# relative float32 slack of the bound test (LUT sums and exact dot products both round)
BOUND_SLACK = 1e-4


def default_max_rows(num_classes: int) -> int:
    """``min(V // 2, max(16, V // 256))`` rows at most in the side list."""
    return min(num_classes // 2, max(MIN_SIDE_ROWS, num_classes // SIDE_ROWS_PER))


def robust_z(v: Tensor) -> Tensor:
    """``(v - median) / (1.4826 MAD)``: how many robust standard deviations ``v`` lies above the bulk."""
    v = v.double()
    med = v.median()
    mad = (v - med).abs().median() * 1.4826
    scale = mad if float(mad) > 0 else v.abs().mean().clamp_min(1e-30) * 1e-3
    return ((v - med) / scale).float()


def fit_rows_mask(weight: Tensor, threshold: float = FIT_NORM_THRESHOLD) -> Tensor:
    """Boolean ``(V,)`` mask of the rows codebook training should see: all but huge-norm rows."""
    return fit_rows_mask_from_norms(weight.detach().float().norm(dim=1), threshold)


def fit_rows_mask_from_norms(norms: Tensor, threshold: float = FIT_NORM_THRESHOLD) -> Tensor:
    """:func:`fit_rows_mask` from the ``(V,)`` row norms (a vocabulary split over ranks gathers them)."""
    return robust_z(norms) <= threshold


def row_statistics(weight: Tensor, reconstruction: Tensor, queries: Optional[Tensor] = None) -> Tensor:
    """Robust z-scores ``(V, 3 or 4)`` of norm, residual norm, relative residual (and observed error)."""
    x = weight.detach().float()
    r = x - reconstruction.float()
    stats = _norm_statistics(x.norm(dim=1), r.norm(dim=1))
    if queries is not None and queries.shape[0]:
        q = queries.detach().float()
        if q.shape[0] > MAX_ERROR_QUERIES:
            q = q[torch.randperm(q.shape[0], generator=torch.Generator().manual_seed(0))[:MAX_ERROR_QUERIES].to(q.device)]
        worst = torch.zeros(x.shape[0], device=x.device)
        for start in range(0, x.shape[0], 8192):  # (B, 8192) error blocks
            worst[start : start + 8192] = (q @ r[start : start + 8192].T).abs().amax(0)
        stats.append(robust_z(worst))
    return torch.stack(stats, dim=1)


def _norm_statistics(norm: Tensor, res: Tensor) -> list:
    """Robust z-scores of the row norms, the residual norms and their ratio (three ``(V,)``)."""
    return [robust_z(norm), robust_z(res), robust_z(res / norm.clamp_min(1e-30))]


def select_side_rows_from_norms(
    norm: Tensor, res: Tensor, threshold: float = DEFAULT_THRESHOLD, max_rows: Optional[int] = None
) -> Tensor:
    """:func:`select_side_rows` without queries, from the row norms ``|x_i|`` and residual norms
    ``|x_i - x~_i|`` (``(V,)`` each) -- what an incremental refresh keeps per row. Cost ``O(V log V)``."""
    return _pick_side_rows(torch.stack(_norm_statistics(norm, res), dim=1).amax(dim=1), threshold, max_rows)


def _pick_side_rows(z: Tensor, threshold: float, max_rows: Optional[int]) -> Tensor:
    num_classes = z.shape[0]
    cap = default_max_rows(num_classes) if max_rows is None else min(int(max_rows), num_classes // 2)
    if cap <= 0 or num_classes < 2:
        return torch.zeros(0, dtype=torch.int64, device=z.device)
    z = torch.nan_to_num(z, nan=0.0)
    marked = (z > threshold).nonzero().squeeze(1)
    if marked.numel() > cap:
        marked = marked[z[marked].topk(cap).indices]
    return marked.sort().values.to(torch.int64)


def select_side_rows(
    weight: Tensor,
    reconstruction: Tensor,
    queries: Optional[Tensor] = None,
    threshold: float = DEFAULT_THRESHOLD,
    max_rows: Optional[int] = None,
) -> Tensor:
    """Ids of the rows to keep in the exact side list: sorted int64 ``(S,)`` (module docstring).

    Args:
        weight: ``(V, d)`` rows; ``reconstruction``: their decoded codes ``x~``, same shape.
        queries: optional ``(B, d)`` calibration queries (adds the observed-error statistic).
        threshold: robust z-score above which a statistic marks a row.
        max_rows: cap on the list (default :func:`default_max_rows`); the largest ``z`` win.
    """
    num_classes = weight.shape[0]
    cap = default_max_rows(num_classes) if max_rows is None else min(int(max_rows), num_classes // 2)
    if cap <= 0 or num_classes < 2:
        return torch.zeros(0, dtype=torch.int64, device=weight.device)
    return _pick_side_rows(row_statistics(weight, reconstruction, queries).amax(dim=1), threshold, max_rows)


def residual_norms(weight: Tensor, reconstruction: Tensor) -> Tensor:
    """``|x_i - x~_i|`` per row, float32 ``(V,)``: the Cauchy-Schwarz radius of each LUT score."""
    return (weight.detach().float() - reconstruction.float()).norm(dim=1)


def scan_bias(bias: Optional[Tensor], side_rows: Tensor, num_classes: int, device) -> Optional[Tensor]:
    """The bias the LUT scan ranks with: the layer's (float32), side rows set to :data:`SCAN_EXCLUDED`."""
    if side_rows.numel() == 0:
        return None if bias is None else bias.detach().float()
    base = torch.zeros(num_classes, device=device) if bias is None else bias.detach().float()
    return base.index_fill(0, side_rows, SCAN_EXCLUDED)


@torch.no_grad()
def bound_complete(
    h: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    lut_scores: Tensor,
    radii: Tensor,
    logits: Tensor,
    classes: Tensor,
    k: int,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Complete a candidate list so that its top-``k`` is provably the exact top-``k``.

    ``h`` ``(B, d)``; ``lut_scores`` the float LUT scores ``(B, V)`` (bias included) of every
    class; ``radii`` the residual norms ``(V,)`` (``0`` never, ``inf`` for rows that must always
    be re-scored); ``logits`` / ``classes`` ``(B, C)`` the exactly scored candidates, sorted best
    first. Every row not in ``classes`` whose bound ``s_i + |h| |r_i|`` reaches the ``k``-th best
    exact logit is scored exactly and merged. Returns ``(logits, classes, extra)``, sorted, with
    ``extra`` the ``(B,)`` number of rows each query needed beyond its candidates.
    """
    hn = h.float().norm(dim=1, keepdim=True)
    upper = lut_scores + hn * radii.unsqueeze(0)
    upper = upper + BOUND_SLACK * (lut_scores.abs() + hn * radii.unsqueeze(0))
    upper = upper.scatter(1, classes, -math.inf)  # already exact
    kth = logits[:, k - 1 : k]
    kth = kth - BOUND_SLACK * (1 + kth.abs())
    need = upper >= kth
    extra = need.sum(dim=1)
    most = int(extra.max()) if extra.numel() else 0
    if most == 0:
        return logits, classes, extra
    if most * DENSE_FRACTION >= lut_scores.shape[1]:
        # the bound rules out too little: one dense matmul is cheaper than gathering most rows
        full = h.float() @ weight.detach().float().T
        if bias is not None:
            full = full + bias.float()
        logits, classes = full.topk(logits.shape[1], dim=1)
        return logits, classes, extra
    ub, extra_classes = upper.topk(most, dim=1)
    extra_logits = exact_logits(h, weight, bias, extra_classes).masked_fill(ub < kth, -math.inf)
    logits = torch.cat([logits, extra_logits], dim=1)
    classes = torch.cat([classes, extra_classes], dim=1)
    logits, order = logits.sort(dim=1, descending=True)
    return logits, classes.gather(1, order), extra
