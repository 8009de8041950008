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

from torchaq.ops.rescore import row_logits

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
# classes per block when bound_complete counts the rows each query needs
CLASS_BLOCK = 4096


def default_max_rows(num_classes: int) -> int:
    """``min(V // 2, max(16, V // 256))`` rows at most in the side list."""
    return min(num_classes // 2, max(MIN_SIDE_ROWS, num_classes // SIDE_ROWS_PER))


def robust_z(v: Tensor) -> Tensor:
    """``(v - median) / (1.4826 MAD)``: how many robust standard deviations ``v`` lies above the bulk.

    When more than half the values are equal (a vocabulary extended with rows set to their mean,
    as ``resize_token_embeddings`` does; half the rows zero) the MAD is 0. The scale then falls
    back to the mean absolute deviation from the median (times 1.2533, its Gaussian consistency
    factor), which sees the other rows, instead of calling every differing row an outlier; if that
    is 0 too, all values are equal and every z is 0. Infinite values (an overflowing norm) get
    ``z = inf`` and NaN ``z = 0`` is never produced for finite input.
    """
    v = v.double()
    finite = torch.isfinite(v)
    vf = v[finite] if not bool(finite.all()) else v
    if vf.numel() == 0:
        return torch.zeros_like(v, dtype=torch.float32)
    med = vf.median()
    dev = (vf - med).abs()
    scale = dev.median() * 1.4826
    if not float(scale) > 0:
        scale = dev.mean() * 1.2533
    if not float(scale) > 0:
        return torch.where(finite, 0.0, math.inf).float()
    return torch.where(finite, (v - med) / scale, math.inf).float()


def row_norms(x: Tensor) -> Tensor:
    """``|x_i|`` per row, float32 ``(V,)``, without overflow: rows are scaled by their largest entry
    first, so a row near the float32 limit (whose squared norm would overflow to inf) keeps a
    finite norm (``inf`` only if the norm itself exceeds float32)."""
    x = x.detach().float()
    if x.shape[1] == 0:
        return torch.zeros(x.shape[0], device=x.device)
    peak = x.abs().amax(dim=1)
    if not bool((peak > 1e18).any()):  # the plain norm cannot overflow (d * 1e36 << 3.4e38 for d < 1e2)
        if x.shape[1] < 100 or not bool((peak > 1e17).any()):
            return x.norm(dim=1)
    scale = peak.clamp_min(1e-30)
    return (x / scale.unsqueeze(1)).norm(dim=1).double().mul(scale.double()).clamp(max=torch.finfo(torch.float32).max).float()


def fit_rows_mask(weight: Tensor, threshold: float = FIT_NORM_THRESHOLD) -> Tensor:
    """Boolean ``(V,)`` mask of the rows codebook training should see: all but huge-norm rows."""
    return fit_rows_mask_from_norms(row_norms(weight), threshold)


def fit_rows_mask_from_norms(norms: Tensor, threshold: float = FIT_NORM_THRESHOLD) -> Tensor:
    """:func:`fit_rows_mask` from the ``(V,)`` row norms (a vocabulary split over ranks gathers them)."""
    return robust_z(norms) <= threshold


def row_statistics(weight: Tensor, reconstruction: Tensor, queries: Optional[Tensor] = None) -> Tensor:
    """Robust z-scores ``(V, 3 or 4)`` of norm, residual norm, relative residual (and observed error)."""
    x = weight.detach().float()
    r = x - reconstruction.float()
    stats = _norm_statistics(row_norms(x), row_norms(r))
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
    return [robust_z(norm), robust_z(res), robust_z(res / norm.clamp_min(1e-30)).nan_to_num(0.0)]


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


def count_at_least(values: Tensor, floor: Tensor) -> Tensor:
    """int64 ``(B,)``: how many entries of each row of ``values`` ``(B, V)`` are ``>= floor`` ``(B, 1)``,
    counted ``CLASS_BLOCK`` classes at a time: a ``(B, V)`` mask and its int64 sum (torch widens a
    bool sum) would hold 9 bytes per value, more than the values themselves."""
    return sum((values[:, a : a + CLASS_BLOCK] >= floor).sum(dim=1) for a in range(0, values.shape[1], CLASS_BLOCK))


def residual_norms(weight: Tensor, reconstruction: Tensor) -> Tensor:
    """``|x_i - x~_i|`` per row, float32 ``(V,)``: the Cauchy-Schwarz radius of each LUT score."""
    return row_norms(weight.detach().float() - reconstruction.float())


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
    lut_scores,
    radii: Tensor,
    logits: Tensor,
    classes: Tensor,
    k: int,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Complete a candidate list so that its top-``k`` is provably the exact top-``k``.

    ``h`` ``(B, d)``; ``lut_scores`` the float LUT scores ``(B, V)`` (bias included) of every
    class, or a zero-argument function returning them (then the buffer is owned here, overwritten
    by the bounds and freed before a dense fallback: one ``(B, V)`` float buffer at a time); ``radii`` the residual norms ``(V,)`` (``0`` never, ``inf`` for rows that must always
    be re-scored); ``logits`` / ``classes`` ``(B, C)`` the exactly scored candidates, sorted best
    first. Every row not in ``classes`` whose bound ``s_i + |h| |r_i|`` reaches the ``k``-th best
    exact logit is scored exactly and merged. Returns ``(logits, classes, extra)``, sorted, with
    ``extra`` the ``(B,)`` number of rows each query needed beyond its candidates.
    """
    hn = h.float().norm(dim=1, keepdim=True)
    lut_scores = lut_scores() if callable(lut_scores) else lut_scores.clone()
    # upper = s + |h| r + slack (max_i |s_i| + |h| r): the rounding slack per row uses the row's
    # largest |s| (looser than |s_i|, still a valid bound), so the scores' one (B, V) buffer is
    # the only one (overwritten in place)
    lo, hi = torch.aminmax(lut_scores, dim=1)
    upper = lut_scores.add_(torch.maximum(lo.abs(), hi.abs()).mul_(BOUND_SLACK).unsqueeze(1))
    upper.addcmul_(hn, radii.unsqueeze(0), value=1 + BOUND_SLACK)
    upper.scatter_(1, classes, -math.inf)  # already exact
    kth = logits[:, k - 1 : k]
    kth = kth - BOUND_SLACK * (1 + kth.abs())
    extra = count_at_least(upper, kth)  # rows each query needs
    most = int(extra.max()) if extra.numel() else 0
    if most == 0:
        return logits, classes, extra
    if most * DENSE_FRACTION >= lut_scores.shape[1]:
        # the bound rules out too little: one dense matmul is cheaper than gathering most rows;
        # the bound tables go first so the dense logits are the only (B, V) buffer alive
        del lut_scores, upper
        full = h.float() @ weight.detach().float().T
        if bias is not None:
            full = full + bias.float()
        logits, classes = full.topk(logits.shape[1], dim=1)
        return logits, classes, extra
    ub, extra_classes = upper.topk(most, dim=1)
    # their exact logits (row_logits gathers a bounded block of rows at a time)
    extra_logits = row_logits(h, weight, bias, extra_classes).masked_fill(ub < kth, -math.inf)
    logits = torch.cat([logits, extra_logits], dim=1)
    classes = torch.cat([classes, extra_classes], dim=1)
    logits, order = logits.sort(dim=1, descending=True)
    return logits, classes.gather(1, order), extra
