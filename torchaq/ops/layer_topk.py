"""``torch.ops.torchaq.layer_topk``: the top-k path of :meth:`torchaq.QuantizedSoftmax.topk` as one op.

For ``(B, d)`` rows ``h`` (``queries``: the same rows zero-padded to the quantizer's ``M * dsub``
columns, float32), it returns ``(values, indices)`` of shape ``(B, min(k, C' + S))``:

1. ``lut = compute_lut(queries, codebooks)`` (``LUT[b, m, j] = <q_m, C_m[j]>``);
2. ``C' = min(candidates, num_classes)`` classes per row by LUT score (``lut_topk`` with
   ``scan_bias``: the scan's ranking, the de-quantized 4-bit sums of FAISS fast-scan / ScaNN LUT16);
3. those classes plus the ``S`` ids of ``side_rows`` (the exact side list, the same for every row);
4. optional int8 shortlist (``weight_i8``, ``row_scale``: :func:`quantize_rows_int8`, per-row
   symmetric int8 as in LLM.int8()'s vector-wise quantization): when a row has more than
   ``R = max(shortlist, min(k, C' + S))`` distinct classes, they are ranked by
   ``row_scale[c] * <h_b, weight_i8[c]> (+ bias[c])`` and only the best ``R`` go on;
5. exact re-score and ranking (``rescore_topk``): ``logit = <h_b, W[c]> + bias[c]`` in float32,
   best first, ties by class id, a class offered twice counted once.

Without the shortlist the result equals ``rescore_topk(h, weight, bias, cat([lut_topk(...)[1],
side_rows]), k)``; ``values`` are exact logits either way, only the membership of the top-``k`` is
approximate. The CPU kernel (``torchaq/csrc/layer_topk.cpp``) runs the steps in one call -- one
dispatch, the scan's candidates selected but not sorted, the side rows read in place, the int8
scores as exact integer sums against the query rounded to int16 (rescore_i8_kernels.h), equal on
every kernel set; the reference below scores them in float, so the two can differ only where two
int8 scores tie at the shortlist's edge. Cost: the LUT (``B M K dsub``), the scan (``B V M`` table
look-ups plus the top-``C'`` selection), ``B (C' + S) d`` int8 multiply-adds over rows a quarter
the size of float rows, and ``B R d`` exact float multiply-adds (``B (C' + S) d`` without the
shortlist). ``h`` containing NaN or Inf raises ``ValueError``.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from torchaq.ops.layout import check_compute_lut_args, check_unpack_args
from torchaq.ops.schemas import LIB


def check_layer_topk_args(h, queries, codebooks, packed, num_classes, candidates, scan_bias, weight, bias,
                          side_rows, weight_i8, row_scale, shortlist, k) -> None:
    """Shape / dtype / device checks of ``layer_topk`` that need no data (ValueError / TypeError)."""
    if h.dim() != 2 or queries.dim() != 2 or queries.shape[0] != h.shape[0]:
        raise ValueError(f"h must be (B, d) and queries (B, M * dsub) with the same B, got shapes "
                         f"{tuple(h.shape)} and {tuple(queries.shape)}")
    if queries.dtype != torch.float32:
        raise TypeError(f"queries must be float32, got {queries.dtype}")
    if codebooks.dim() != 3 or codebooks.shape[1] not in (16, 256):
        raise ValueError(f"codebooks must be (M, 16 or 256, dsub), got shape {tuple(codebooks.shape)}")
    check_compute_lut_args(queries, codebooks)
    if weight.dim() != 2 or weight.shape[0] != num_classes or weight.shape[1] != h.shape[1]:
        raise ValueError(f"weight must be (num_classes={num_classes}, d={h.shape[1]}), got {tuple(weight.shape)}")
    if not h.is_floating_point() or not weight.is_floating_point():
        raise TypeError(f"h and weight must be floating point, got {h.dtype}, {weight.dtype}")
    if candidates < 1:
        raise ValueError(f"candidates must be >= 1, got {candidates}")
    if side_rows.dim() != 1 or side_rows.dtype != torch.int64:
        raise ValueError(f"side_rows must be an int64 (S,) tensor, got {side_rows.dtype} {tuple(side_rows.shape)}")
    for name, t in (("queries", queries), ("codebooks", codebooks), ("packed", packed), ("weight", weight),
                    ("side_rows", side_rows)):
        if t.device != h.device:
            raise ValueError(f"{name} is on {t.device} but h is on {h.device}")
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed must be uint8 (from torchaq.ops.pack_codes), got {packed.dtype}")
    check_unpack_args(packed, codebooks.shape[0], 4 if codebooks.shape[1] == 16 else 8, num_classes)
    for name, b in (("scan_bias", scan_bias), ("bias", bias)):
        if b is not None:
            if b.shape != (num_classes,) or not b.is_floating_point() or b.device != h.device:
                raise ValueError(f"{name} must be a floating-point ({num_classes},) tensor on {h.device}, "
                                 f"got {b.dtype} {tuple(b.shape)} on {b.device}")
    if scan_bias is not None and scan_bias.dtype != torch.float32:
        raise TypeError(f"scan_bias must be float32, got {scan_bias.dtype}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if (weight_i8 is None) != (row_scale is None):
        raise ValueError("weight_i8 and row_scale go together")
    if weight_i8 is not None:
        if weight_i8.dtype != torch.int8 or row_scale.dtype != torch.float32:
            raise TypeError(f"weight_i8 must be int8 and row_scale float32, got {weight_i8.dtype} and {row_scale.dtype}")
        if weight_i8.shape != weight.shape or row_scale.shape != (weight.shape[0],):
            raise ValueError(f"weight_i8 must have the shape of weight {tuple(weight.shape)} and row_scale (V,), got "
                             f"{tuple(weight_i8.shape)} and {tuple(row_scale.shape)}")
        if weight_i8.device != h.device or row_scale.device != h.device:
            raise ValueError("weight_i8 and row_scale must be on the device of h")
        if shortlist < 1:
            raise ValueError(f"shortlist must be >= 1, got {shortlist}")


@torch.library.register_fake("torchaq::layer_topk")
def _layer_topk_fake(h, queries, codebooks, packed, num_classes, candidates, scan_bias, weight, bias, side_rows,
                     weight_i8, row_scale, shortlist, k):
    check_layer_topk_args(h, queries, codebooks, packed, num_classes, candidates, scan_bias, weight, bias,
                          side_rows, weight_i8, row_scale, shortlist, k)
    kk = min(k, min(candidates, num_classes) + side_rows.shape[0])
    return h.new_empty((h.shape[0], kk), dtype=torch.float32), h.new_empty((h.shape[0], kk), dtype=torch.int64)


def layer_topk_reference(
    h: Tensor, queries: Tensor, codebooks: Tensor, packed: Tensor, num_classes: int, candidates: int,
    scan_bias: Optional[Tensor], weight: Tensor, bias: Optional[Tensor], side_rows: Tensor,
    weight_i8: Optional[Tensor], row_scale: Optional[Tensor], shortlist: int, k: int,
) -> Tuple[Tensor, Tensor]:
    """The steps in turn (module docstring): the oracle of the fused CPU kernel."""
    check_layer_topk_args(h, queries, codebooks, packed, num_classes, candidates, scan_bias, weight, bias,
                          side_rows, weight_i8, row_scale, shortlist, k)
    if queries.numel() and not bool(torch.isfinite(queries).all()):
        raise ValueError("h contains NaN or Inf")
    lut = torch.ops.torchaq.compute_lut(queries, codebooks)
    _, classes = torch.ops.torchaq.lut_topk(lut, packed, num_classes, min(candidates, num_classes), scan_bias)
    if side_rows.numel():
        classes = torch.cat([classes, side_rows.expand(classes.shape[0], -1)], dim=1)
    keep = max(shortlist, min(k, classes.shape[1]))
    if weight_i8 is None or keep >= classes.shape[1] or weight.dtype != torch.float32:
        return torch.ops.torchaq.rescore_topk(h, weight, bias, classes, k)
    values, indices = [], []
    for b in range(classes.shape[0]):  # rows with more than `keep` distinct candidates get the shortlist
        ids = classes[b]
        distinct = torch.unique(ids)
        if distinct.numel() > keep:
            approx = (weight_i8[distinct].float() @ h[b].float()) * row_scale[distinct]
            if bias is not None:
                approx = approx + bias[distinct].float()
            order = sorted(range(distinct.numel()), key=lambda i: (-float(approx[i]), int(distinct[i])))
            ids = distinct[order[:keep]]
        v, i = torch.ops.torchaq.rescore_topk(h[b : b + 1], weight, bias, ids.unsqueeze(0), k)
        values.append(v)
        indices.append(i)
    return torch.cat(values), torch.cat(indices)


def quantize_rows_int8(weight: Tensor) -> Tuple[Tensor, Tensor]:
    """``(w8, scale)`` with ``weight[c] ~ scale[c] * w8[c]``: symmetric per-row int8,
    ``scale = max_j |W[c, j]| / 127`` (1 for an all-zero row), ``w8 = round(W / scale)``. The shortlist
    copy of :meth:`torchaq.QuantizedSoftmax.topk`; ``O(V d)`` once per weight version."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1) / 127
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    w8 = torch.round(w / scale.unsqueeze(1)).clamp_(-127, 127).to(torch.int8)
    return w8.contiguous(), scale.contiguous()


def layer_topk(
    h: Tensor, queries: Tensor, codebooks: Tensor, packed: Tensor, num_classes: int, candidates: int,
    scan_bias: Optional[Tensor], weight: Tensor, bias: Optional[Tensor], side_rows: Tensor,
    weight_i8: Optional[Tensor] = None, row_scale: Optional[Tensor] = None, shortlist: int = 0, k: int = 10,
) -> Tuple[Tensor, Tensor]:
    """LUT, scan, (int8 shortlist,) exact re-score of the candidates and the side list, top-``k``:
    see the module docstring."""
    return torch.ops.torchaq.layer_topk(h, queries, codebooks, packed, num_classes, candidates, scan_bias, weight,
                                        bias, side_rows, weight_i8, row_scale, shortlist, k)


torch.library.impl(LIB, "layer_topk", "CompositeExplicitAutograd")(layer_topk_reference)
