"""The exact head and the tail bound of :mod:`torchaq.layer.exact_sampling`: which classes are scored
exactly, and how far above its LUT score any other class's logit can lie.

The head is the scan's best ``C`` classes by their uint8-LUT scores plus the side list, re-scored
exactly. Every other class ``i`` gets the upper bound ``u_i = s_i + z (|h| rho_i + step sqrt(M / 12))``
of its logit: ``z = ERROR_SIGMAS`` standard deviations of the LUT error model
(:mod:`torchaq.layer.error_model`, ``rho_i`` the layer's ``error_scales``) plus the rounding of the
``M`` uint8 LUT entries (:func:`rounding_factor`). :mod:`torchaq.layer.exact_sampling` says which
guarantees follow and ``benchmarks/sampling.py`` measures how often the bound fails.
"""
from __future__ import annotations

import math
import weakref
from typing import Optional

import torch
from torch import Tensor

from torchaq import ops

ERROR_SIGMAS = 4.75    # one-sided N(0, 1) tail 1.0e-6: the LUT error bound, in units of |h| rho_i (error_scales)
DEFAULT_HEAD = 256     # scan candidates re-scored exactly (plus the side list)


def head_width(layer, size: int) -> int:
    """Classes in the head of :func:`head_scores`: the scan's best ``size`` plus the side list."""
    side = layer.side_rows.numel()
    return max(1, min(size, layer.num_classes - side)) + side


def head_scores(layer, flat: Tensor, size: int, columns: int = 0):
    """The LUT scores of every class and their quantization step ``(B,)`` (from the uint8 LUT of the
    4-bit scans, :func:`torchaq.ops.lut_score_quantized`; step 0: exact float sums), and the head: the
    best ``size`` of those scores (:func:`torchaq.ops.row_topk`, the ranking of the fast scan without a
    second pass) plus the side list, re-scored exactly, best first (``(B, H)`` logits and classes).
    The scores are the first ``V`` columns of a ``(B, max(columns, V))`` buffer (zeros after: room for
    the proposal weights, written in place). They carry the scan's bias, which pushes side rows far
    below every real score (:meth:`scan_bias`): they are always in the head, whose scores are never
    read again. Returns ``(scores, logits, classes, step)``."""
    q, num = layer.quantizer, layer.num_classes
    q.check_fitted()
    scores, step = ops.lut_score_quantized(q.lut(flat), layer.packed_codes, num, layer.scan_bias(), columns)
    side = layer.side_rows
    _, classes = ops.row_topk(scores[:, :num], head_width(layer, size) - side.numel())
    if side.numel():
        classes = torch.cat([classes, side.to(classes.device).expand(classes.shape[0], -1)], dim=1)
    bias = None if layer.bias is None else layer.bias.detach()
    logits, classes = torch.ops.torchaq.rescore_topk.default(flat, layer.weight.detach(), bias, classes, classes.shape[1])
    return scores, logits, classes, step


def rounding_factor(num_subspaces: int, sigmas: float, worst_case: bool = False) -> float:
    """The part of the bound for the uint8 rounding of the scores, in units of the quantization step: a
    sum of ``M`` errors, each within ``step / 2`` (``M / 2`` steps at most, what ``worst_case`` uses),
    whose standard deviation is ``sqrt(M / 12)`` steps when they are independent; ``min(z sqrt(M / 12), M / 2)``."""
    m = num_subspaces
    return m / 2 if worst_case else min(sigmas * math.sqrt(m / 12), m / 2)


_CHECKED_NORMS: dict = {}  # id(norms) -> (weak reference, tensor version) of norms already checked


def check_finite_norms(norms: Tensor, side_rows: Tensor) -> None:
    """Refuse error scales that are not finite outside the side list (side rows may hold any scale:
    they are always in the head). A V-sized check, made once per tensor and version."""
    seen = _CHECKED_NORMS.get(id(norms))
    if seen is not None and seen[0]() is norms and seen[1] == norms._version:
        return
    if not bool(torch.isfinite(norms).all()) and not bool(torch.isfinite(norms.index_fill(0, side_rows, 0.0)).all()):
        raise RuntimeError("error_scales is not finite outside the side list (a checkpoint saved without them, or "
                           "a bad write): call layer.refresh()")
    if len(_CHECKED_NORMS) > 256:
        _CHECKED_NORMS.clear()
    _CHECKED_NORMS[id(norms)] = (weakref.ref(norms), norms._version)


def tail_bounds(layer, flat: Tensor, scores: Tensor, head: Tensor, sigmas: float = ERROR_SIGMAS,
                in_place: bool = False, rounding: Optional[Tensor] = None) -> Tensor:
    """``u_i = s_i + z (|h| rho_i + step sqrt(M / 12))`` (``z = sigmas``; ``rho_i`` the layer's
    ``error_scales``, :mod:`torchaq.layer.error_model`; the second term is :func:`rounding_factor`
    times the quantization step ``rounding`` ``(B,)``, absent with ``None``) for every class not in the
    head, ``-inf`` on the head (:func:`torchaq.ops.tail_bounds_`). ``rho_i >= |r_i| / sqrt(d)``, so
    ``z = sqrt(d)`` is at least the Cauchy-Schwarz bound (always true, far looser); ``z = 0`` is the
    LUT score. Adding the two standard deviations bounds their root sum of squares, so the one-sided
    tail of the sum stays below that of ``z`` sigmas."""
    norms = layer.error_scales
    check_finite_norms(norms, layer.side_rows)
    upper = scores if in_place else scores.clone()  # in place: the caller no longer needs the scores
    if rounding is None:
        step, factor = upper.new_zeros(upper.shape[0]), 0.0
    else:  # the Cauchy-Schwarz comparison (z >= sqrt(d)) is a worst-case bound: so is its rounding term
        step, factor = rounding, rounding_factor(layer.quantizer.num_subspaces, sigmas, sigmas >= math.sqrt(layer.dim))
    ops.tail_bounds_(upper, norms, flat, sigmas, step, factor, head)
    return upper
