"""Incremental re-encoding for :meth:`torchaq.QuantizedSoftmax.refresh`: find the rows that moved.

A training step (sampled softmax, sparse embedding updates) touches only some rows of the output
layer; re-encoding all ``V`` rows after every step wastes most of the work. The layer keeps a
per-row *fingerprint* of the weight at its last encode -- the projections of each row onto a few
fixed random directions (float32, ``O(V d)`` to compute, ``O(V)`` to keep) -- and re-encodes only
the rows whose fingerprint changed, then writes their codes into the packed layout in place.
A row whose fingerprint is unchanged moved by less than float32 rounding of its projections,
which cannot matter to its codes in practice. ``weight._version`` (bumped by every in-place
update) says whether anything changed at all, so a refresh after no step costs nothing.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from torchaq import ops
from torchaq.layer import error_model, side_list

# directions of the fingerprint: a change that happens to be orthogonal to all of them (to float
# precision) goes unnoticed; four make that practically impossible for a real update
FINGERPRINT_DIRECTIONS = 4
# above this share of moved rows refresh() re-encodes and re-packs everything in one pass (the same
# codes) instead of gathering, encoding and scattering the moved rows
FULL_PASS_SHARE = 0.5


def fingerprint_directions(dim: int, device: torch.device) -> Tensor:
    """Fixed (seeded) ``(dim, 4)`` Gaussian directions, the same for every layer of that width."""
    gen = torch.Generator().manual_seed(0x7A0)
    return torch.randn(dim, FINGERPRINT_DIRECTIONS, generator=gen).to(device)


def row_fingerprint(weight: Tensor, directions: Tensor) -> Tensor:
    """``(V, 4)`` float32 projections of the rows of ``weight``; cost ``O(V d)``."""
    return weight.detach().float() @ directions


def changed_rows(fingerprint: Tensor, previous: Optional[Tensor]) -> Optional[Tensor]:
    """int64 indices of rows whose fingerprint differs from ``previous`` (``None``: no previous, all rows)."""
    if previous is None or previous.shape != fingerprint.shape or previous.device != fingerprint.device:
        return None
    return (fingerprint != previous).any(1).nonzero().squeeze(1)


def write_packed_rows(packed: Tensor, rows: Tensor, codes: Tensor, bits: int) -> None:
    """Write the uint8 ``(n, M)`` ``codes`` of classes ``rows`` into ``packed`` in place.

    Same layout as :func:`torchaq.ops.pack_codes`: class ``i`` lives at ``packed[i // 32, :, i % 32]``;
    4-bit codes pair subspaces ``(2p, 2p + 1)`` as low / high nibble.
    """
    if rows.numel() == 0:
        return
    if bits == 4:
        m = codes.shape[1]
        if m % 2:
            codes = torch.cat([codes, codes.new_zeros((codes.shape[0], 1))], dim=1)
        pairs = codes[:, 0::2] | (codes[:, 1::2] << 4)
    else:
        pairs = codes
    rows = rows.to(packed.device)
    packed[rows // ops.BLOCK, :, rows % ops.BLOCK] = pairs.to(packed.device, torch.uint8)


class RowStats(NamedTuple):
    """What the side list and the sampler's bound read per row, kept between refreshes: ``(V,)``
    row norms, residual norms, error scales (:mod:`torchaq.layer.error_model`) and the side list."""

    row_norms: Tensor
    residual_norms: Tensor
    error_scales: Tensor
    side_rows: Tensor


def update_side_rows(weight: Tensor, quantizer, rows: Tensor, codes: Tensor, cached: Optional[RowStats],
                     model: Optional[error_model.ErrorModel]) -> Optional[RowStats]:
    """After an incremental re-encode of ``rows`` (``codes`` their new uint8 codes): the new
    :class:`RowStats`, recomputing only those rows (their error scales under the same ``model``).

    :meth:`torchaq.QuantizedSoftmax.refresh_side_rows` decodes all ``V`` rows (``O(V d)``); here
    the norms and error scales of the other rows are the ones cached at the last refresh (their
    weight and codes did not change), so the cost is ``O(n d k)`` for ``n`` changed rows plus
    ``O(V log V)`` for the side list's robust statistics
    (:func:`torchaq.layer.side_list.select_side_rows_from_norms`, the same rule). Returns None
    when nothing usable is cached (the caller then runs the full pass).
    """
    if cached is None or model is None:
        return None
    norms, res, scales = cached.row_norms, cached.residual_norms, cached.error_scales
    if norms.shape != res.shape or scales.shape != res.shape or norms.device != res.device \
            or not bool(torch.isfinite(res).all()):
        return None
    if rows.numel():
        rows_w = weight.detach()[rows.to(weight.device)].float()
        residuals = rows_w - quantizer.decode(codes, dtype=torch.float32).to(rows_w.device)
        norms, res, scales = norms.clone(), res.clone(), scales.clone()
        norms[rows] = side_list.row_norms(rows_w)
        res[rows] = side_list.row_norms(residuals)
        scales[rows] = error_model.error_scales(residuals, res[rows], model)
    return RowStats(norms, res, scales, side_list.select_side_rows_from_norms(norms, res))


def all_side_rows(weight: Tensor, quantizer, codes: Tensor,
                  queries: Optional[Tensor] = None) -> Tuple[RowStats, error_model.ErrorModel]:
    """:class:`RowStats` after a full re-encode, from the uint8 ``(V, M)`` ``codes`` just computed,
    and the error model they used (fitted on this weight; incremental refreshes reuse it): one decode,
    and the residuals are computed once. The side list follows the rule on the row and residual norms
    alone (what every refresh applies), or with checked ``queries`` ``(B, d)`` also their observed
    errors (:func:`torchaq.layer.side_list.select_side_rows`). Cost ``O(V d k)``.
    """
    weight = weight.detach().float()
    recon = quantizer.decode(codes, dtype=torch.float32).to(weight.device)
    side = None if queries is None else side_list.select_side_rows(weight, recon, queries)
    residuals = torch.sub(weight, recon, out=recon)  # in place: one (V, d) buffer, not two
    model = error_model.fit_error_model(weight)
    norms, res = side_list.row_norms(weight), side_list.row_norms(residuals)
    scales = error_model.error_scales(residuals, res, model)
    if side is None:
        side = side_list.select_side_rows_from_norms(norms, res)
    return RowStats(norms, res, scales, side), model
