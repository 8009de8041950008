"""The matrix-free product of the joint codebook update: ``A c`` of its normal equations.

For fixed codes the joint anisotropic codebook update (:mod:`torchaq.codebook_update`; Guo et al.
2020, section 4.2) solves ``A C = b`` with
``A c = sum_i B_i^T W_i B_i c``, ``W_i = I + (eta_i - 1) x_i x_i^T / |x_i|^2``. With the decoded row
``x~_i = B_i c`` and ``coef_i = (eta_i - 1) / |x_i|^2``::

    (A c)[m, j] = sum_{i : codes[i, m] = j}  x~_{i,m} + coef_i <x~_i, x_i> x_{i,m}

This module holds the argument checks and the pure-torch reference of
``torch.ops.torchaq.anisotropic_normal_apply`` (declared in :mod:`torchaq.ops`; the C++ kernel is
``torchaq/csrc/normal_apply.cpp``). Cost: ``O(N M dsub)`` per product (one decode, one dot per row,
one scatter-add), memory ``O(M K dsub)`` besides the inputs.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .encode import row_chunks


def check_normal_apply_args(x: Tensor, codes: Tensor, coef: Tensor, codebooks: Tensor) -> None:
    """Shape, dtype and device checks (data-independent; ValueError / TypeError naming the argument)."""
    if x.dim() != 2:
        raise ValueError(f"x must be (N, D), got shape {tuple(x.shape)}")
    if codebooks.dim() != 3:
        raise ValueError(f"codebooks must be (M, K, dsub), got shape {tuple(codebooks.shape)}")
    if codes.dim() != 2:
        raise ValueError(f"codes must be (N, M), got shape {tuple(codes.shape)}")
    for name, t in (("x", x), ("coef", coef), ("codebooks", codebooks)):
        if t.dtype != torch.float32:
            raise TypeError(f"{name} must be float32, got {t.dtype}")
    if codes.dtype not in (torch.int64, torch.uint8):
        raise TypeError(f"codes must be int64 or uint8, got {codes.dtype}")
    m, k, dsub = codebooks.shape
    torch._check(m >= 1 and k >= 1 and dsub >= 1, lambda: f"codebooks must be non-empty (M, K, dsub), got {tuple(codebooks.shape)}")
    if x.shape[1] != m * dsub:
        raise ValueError(f"x has {x.shape[1]} columns but codebooks (M, K, dsub) = {tuple(codebooks.shape)} need M * dsub = {m * dsub}")
    if codes.shape != (x.shape[0], m):
        raise ValueError(f"codes must have shape ({x.shape[0]}, {m}), got {tuple(codes.shape)}")
    if coef.dim() != 1 or coef.shape[0] != x.shape[0]:
        raise ValueError(f"coef must have shape ({x.shape[0]},), got {tuple(coef.shape)}")
    for name, t in (("codes", codes), ("coef", coef), ("codebooks", codebooks)):
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x on {x.device}")


def normal_apply_reference(x: Tensor, codes: Tensor, coef: Tensor, codebooks: Tensor) -> Tensor:
    """Pure-torch ``A c`` (module docstring): ``(M, K, dsub)`` float32; the default kernel and test oracle.

    Raises ValueError for a code outside ``[0, K)``. Rows are processed in chunks (one decode as
    an ``index_select`` over the stacked codewords, then one ``index_add_``).
    """
    check_normal_apply_args(x, codes, coef, codebooks)
    m, k, dsub = codebooks.shape
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= k):
        raise ValueError(f"codes must be in [0, {k}), got values in [{int(codes.min())}, {int(codes.max())}]")
    out = torch.zeros(m * k, dsub, dtype=torch.float32, device=x.device)
    flat = codebooks.reshape(-1, dsub)
    offsets = torch.arange(m, device=x.device) * k
    for start, stop in row_chunks(x.shape[0], x.shape[1] * 4):
        slots = (codes[start:stop].long() + offsets).reshape(-1)
        x_hat = flat.index_select(0, slots).reshape(stop - start, -1)
        xc = x[start:stop]
        w_x_hat = x_hat + (coef[start:stop] * (x_hat * xc).sum(1)).unsqueeze(1) * xc
        out.index_add_(0, slots, w_x_hat.reshape(-1, dsub))
    return out.reshape(m, k, dsub)
