"""``torch.ops.torchaq.layer_sample``: one draw per row from the full-vocabulary softmax, as one op.

The untruncated path of :meth:`torchaq.QuantizedSoftmax.sample` (no ``top_k``, ``top_p`` or
``min_p``; the method and its guarantee: :mod:`torchaq.layer.exact_sampling`) for PQ layers. For
``(B, d)`` rows ``h`` (``queries``: the same rows zero-padded to the quantizer's ``M * dsub`` columns,
float32) with per-row int64 ``seeds``, it runs (after refusing a non-finite ``h`` with ``ValueError``):

1. ``lut = compute_lut(queries, codebooks)``;
2. ``scores, step = lut_score_quantized(lut, packed, V, scan_bias, W)``, ``W = proposal_width(V, head, block)``:
   every class's uint8-LUT score in the first ``V`` columns of one ``(B, W)`` buffer;
3. the head: the best ``head - S`` scores (``row_topk``) plus the ``S`` ids of ``side_rows``, re-scored
   exactly and ranked (``rescore_topk``): ``(B, head)`` logits and classes;
4. the bounds over the scores (``tail_bounds_`` with ``sigmas``, ``rounding``), their row maximum ``u*``;
   a row whose ``l_0 / T`` or ``u* / T`` is not below float32's overflow raises ``ValueError`` naming
   the temperature;
5. ``top = max(l_0, u* - weight_range T)``, the proposal weights over the bounds
   (``proposal_weights_``, no floor), and the rejection rounds (``reject_rounds`` with ``proposals``
   and ``rounds``, one draw per row ``b`` with key ``row_keys(seeds)[b]``,
   :func:`torchaq.ops.counter_rng.row_keys`).

Returns ``(tokens (B,) int64, logits (B,) float32, done (B,) bool)``: the drawn class and its exact
logit, and whether the row is finished. ``done`` is False where no round kept a proposal, and where
``u* - l_0 > weight_range T`` (a bound far above the best exact logit: the sampler first re-scores
those classes, which this op does not do); the caller draws those rows on the general path, which
reaches the same plan for them. Every step is row-wise, so a row's result never depends on its batch.

The CPU kernel (``torchaq/csrc/layer_sample.cpp``) calls the ops' own CPU kernels in turn, so on CPU
its results equal the composition's (the reference below) bit for bit; it saves the dispatches and the
Python around them, which at batch 1 cost more than the scan. Cost: the LUT (``B M K dsub``), the scan
(``B V M`` look-ups), ``B head d`` multiply-adds for the head, ``O(B V)`` for the bounds and weights,
and ``O(proposals 2**r d)`` per row in round ``r``.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from torchaq.ops.counter_rng import row_keys
from torchaq.ops.layout import check_compute_lut_args
from torchaq.ops.proposal import proposal_width
from torchaq.ops.schemas import LIB


def check_layer_sample_args(h, queries, codebooks, packed, num_classes, scan_bias, weight, bias, side_rows,
                            error_scales, seeds, head, sigmas, rounding, temperature, weight_range, block, proposals,
                            rounds) -> None:
    """Shape / dtype / device checks of ``layer_sample`` that need no data (errors name the argument)."""
    B = h.shape[0] if h.dim() == 2 else -1
    torch._check_value(h.dim() == 2 and h.is_floating_point(), lambda: f"h must be a floating-point (B, d) tensor, "
                                                                        f"got {h.dtype} {tuple(h.shape)}")
    torch._check_value(queries.dim() == 2 and queries.shape[0] == B and queries.dtype == torch.float32,
                       lambda: f"queries must be a float32 ({B}, M * dsub) tensor, got {queries.dtype} {tuple(queries.shape)}")
    check_compute_lut_args(queries, codebooks)
    torch._check_value(packed.dtype == torch.uint8, lambda: f"packed must be uint8, got {packed.dtype}")
    torch._check_value(weight.dim() == 2 and weight.shape[0] == num_classes and weight.shape[1] == h.shape[1],
                       lambda: f"weight must be (num_classes={num_classes}, d={h.shape[1]}), got {tuple(weight.shape)}")
    torch._check_value(side_rows.dim() == 1 and side_rows.dtype == torch.int64,
                       lambda: f"side_rows must be an int64 (S,) tensor, got {side_rows.dtype} {tuple(side_rows.shape)}")
    torch._check_value(side_rows.shape[0] < head <= num_classes,
                       lambda: f"head must be in (S={side_rows.shape[0]}, V={num_classes}], got {head}")
    torch._check_value(tuple(seeds.shape) == (B,) and seeds.dtype == torch.int64,
                       lambda: f"seeds must be an int64 ({B},) tensor, got {seeds.dtype} {tuple(seeds.shape)}")
    torch._check_value(0 < temperature < math.inf, lambda: f"temperature must be a finite number > 0, got {temperature}")
    torch._check_value(weight_range > 0 and block >= 1 and proposals >= 1 and 0 <= rounds <= 30,
                       lambda: f"weight_range must be > 0, block and proposals >= 1, rounds in [0, 30]; got "
                               f"{weight_range}, {block}, {proposals}, {rounds}")
    for name, t in (("queries", queries), ("codebooks", codebooks), ("packed", packed), ("weight", weight),
                    ("side_rows", side_rows), ("error_scales", error_scales), ("seeds", seeds), ("scan_bias", scan_bias),
                    ("bias", bias)):
        torch._check_value(t is None or t.device == h.device, lambda: f"{name} is on {t.device} but h is on {h.device}")


@torch.library.register_fake("torchaq::layer_sample")
def _layer_sample_fake(h, queries, codebooks, packed, num_classes, scan_bias, weight, bias, side_rows, error_scales,
                       seeds, head, sigmas, rounding, temperature, weight_range, block, proposals, rounds):
    check_layer_sample_args(h, queries, codebooks, packed, num_classes, scan_bias, weight, bias, side_rows,
                            error_scales, seeds, head, sigmas, rounding, temperature, weight_range, block, proposals,
                            rounds)
    B = h.shape[0]
    return (h.new_empty((B,), dtype=torch.int64), h.new_empty((B,), dtype=torch.float32),
            h.new_empty((B,), dtype=torch.bool))


@torch.library.impl(LIB, "layer_sample", "CompositeExplicitAutograd")
def layer_sample_reference(h: Tensor, queries: Tensor, codebooks: Tensor, packed: Tensor, num_classes: int,
                           scan_bias: Optional[Tensor], weight: Tensor, bias: Optional[Tensor], side_rows: Tensor,
                           error_scales: Tensor, seeds: Tensor, head: int, sigmas: float, rounding: float,
                           temperature: float, weight_range: float, block: int, proposals: int,
                           rounds: int) -> Tuple[Tensor, Tensor, Tensor]:
    """The steps in turn (module docstring), each through its op: the oracle of the CPU kernel."""
    check_layer_sample_args(h, queries, codebooks, packed, num_classes, scan_bias, weight, bias, side_rows,
                            error_scales, seeds, head, sigmas, rounding, temperature, weight_range, block, proposals,
                            rounds)
    ops, V, S, B = torch.ops.torchaq, num_classes, side_rows.shape[0], h.shape[0]
    if B == 0:
        return seeds.new_empty((0,)), h.new_empty((0,), dtype=torch.float32), seeds.new_empty((0,), dtype=torch.bool)
    if not bool(torch.isfinite(h).all()):
        raise ValueError("h contains NaN or Inf")
    lut = ops.compute_lut(queries, codebooks)
    buf, step = ops.lut_score_quantized(lut, packed, V, scan_bias, proposal_width(V, head, block))
    _, classes = ops.row_topk(buf[:, :V], head - S)
    if S:
        classes = torch.cat([classes, side_rows.expand(B, -1)], dim=1)
    logits, classes = ops.rescore_topk(h, weight, bias, classes, head)
    upper_max = ops.tail_bounds_(buf[:, :V], error_scales, h, sigmas, step, rounding, classes)
    if B and not bool((torch.stack([logits[:, 0], upper_max]) / temperature < math.inf).all()):
        raise ValueError(f"temperature={temperature!r} is so small that logits / temperature overflow float32")
    span = weight_range * temperature
    risky = upper_max - logits[:, 0] > span
    top = torch.maximum(logits[:, 0], upper_max - span)
    floor = torch.full_like(top, -math.inf)
    cum = ops.proposal_weights_(buf, V, logits, floor, top, temperature, block)
    done, tokens, values, _ = ops.reject_rounds(h.float(), weight, bias, logits, classes, V, top, floor,
                                                buf.view(B, -1, block), cum, torch.arange(B, device=h.device), row_keys(seeds),
                                                temperature, proposals, rounds, False)
    return tokens, values, done & ~risky
