"""The matrix-free product of the joint codebook update: ``A c`` of its normal equations.

For fixed codes the joint anisotropic codebook update (:mod:`torchaq.quantizers.codebook_update`; Guo et al.
2020, section 4.2) solves ``A C = b`` with
``A c = sum_i B_i^T W_i B_i c``, ``W_i = I + (eta_i - 1) x_i x_i^T / |x_i|^2``. With the decoded row
``x~_i = B_i c`` and ``coef_i = (eta_i - 1) / |x_i|^2``::

    (A c)[m, j] = sum_{i : codes[i, m] = j}  x~_{i,m} + coef_i <x~_i, x_i> x_{i,m}

The right-hand side and the exact diagonal of ``A`` (the Jacobi preconditioner) are scatters
of the rows too::

    b[m, j]       = sum_{i : codes[i, m] = j}  eta_i x_{i,m}
    diag A[m, j]  = sum_{i : codes[i, m] = j}  1 + coef_i x_{i,m}^2      (elementwise)

This module holds the argument checks and the pure-torch references of
``torch.ops.torchaq.anisotropic_normal_apply`` and ``torch.ops.torchaq.anisotropic_normal_rhs``
(declared in :mod:`torchaq.ops.schemas`; the C++ kernels are in ``torchaq/csrc/normal_apply.cpp``). Cost:
``O(N M dsub)`` per call (one decode, one dot per row, one scatter-add), memory ``O(M K dsub)``
besides the inputs.
"""
from __future__ import annotations

import torch
from torch import Tensor

from torchaq.ops.encode import row_chunks
from torchaq.ops.schemas import LIB


def check_normal_apply_args(x: Tensor, codes: Tensor, coef: Tensor, codebooks: Tensor) -> None:
    """Shape, dtype and device checks (data-independent; ValueError / TypeError naming the argument)."""
    if x.dim() != 2:
        raise ValueError(f"x must be (N, D), got shape {tuple(x.shape)}")
    if codebooks.dim() != 3:
        raise ValueError(f"codebooks must be (M, K, dsub), got shape {tuple(codebooks.shape)}")
    _check_rows_codes_coef(x, codes, coef, codebooks.shape, codebooks)


def check_normal_rhs_args(x: Tensor, codes: Tensor, eta: Tensor, coef: Tensor, num_codewords: int) -> None:
    """Checks of :func:`anisotropic_normal_rhs_reference` (shapes from ``codes`` and ``num_codewords``)."""
    if x.dim() != 2:
        raise ValueError(f"x must be (N, D), got shape {tuple(x.shape)}")
    if codes.dim() != 2:
        raise ValueError(f"codes must be (N, M), got shape {tuple(codes.shape)}")
    if isinstance(num_codewords, bool) or num_codewords < 1:
        raise ValueError(f"num_codewords must be >= 1, got {num_codewords}")
    m = codes.shape[1]
    if m < 1 or x.shape[1] % m:
        raise ValueError(f"x has {x.shape[1]} columns, not a multiple of M = {m} (codes.shape[1])")
    if eta.dtype != torch.float32:
        raise TypeError(f"eta must be float32, got {eta.dtype}")
    if eta.dim() != 1 or eta.shape[0] != x.shape[0]:
        raise ValueError(f"eta must have shape ({x.shape[0]},), got {tuple(eta.shape)}")
    if eta.device != x.device:
        raise ValueError(f"eta is on {eta.device} but x on {x.device}")
    _check_rows_codes_coef(x, codes, coef, (m, num_codewords, x.shape[1] // m), None)


def _check_rows_codes_coef(x: Tensor, codes: Tensor, coef: Tensor, cb_shape, codebooks) -> None:
    if codes.dim() != 2:
        raise ValueError(f"codes must be (N, M), got shape {tuple(codes.shape)}")
    tensors = (("x", x), ("coef", coef)) + ((("codebooks", codebooks),) if codebooks is not None else ())
    for name, t in tensors:
        if t.dtype != torch.float32:
            raise TypeError(f"{name} must be float32, got {t.dtype}")
    if codes.dtype not in (torch.int64, torch.uint8):
        raise TypeError(f"codes must be int64 or uint8, got {codes.dtype}")
    m, k, dsub = cb_shape
    torch._check(m >= 1 and k >= 1 and dsub >= 1, lambda: f"codebooks must be non-empty (M, K, dsub), got {tuple(cb_shape)}")
    if x.shape[1] != m * dsub:
        raise ValueError(f"x has {x.shape[1]} columns but codebooks (M, K, dsub) = {tuple(cb_shape)} need M * dsub = {m * dsub}")
    if codes.shape != (x.shape[0], m):
        raise ValueError(f"codes must have shape ({x.shape[0]}, {m}), got {tuple(codes.shape)}")
    if coef.dim() != 1 or coef.shape[0] != x.shape[0]:
        raise ValueError(f"coef must have shape ({x.shape[0]},), got {tuple(coef.shape)}")
    for name, t in tensors[1:] + (("codes", codes),):
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x on {x.device}")


def anisotropic_normal_apply_reference(x: Tensor, codes: Tensor, coef: Tensor, codebooks: Tensor) -> Tensor:
    """Pure-torch ``A c`` (module docstring): ``(M, K, dsub)`` float32; the default kernel and test oracle.

    Raises ValueError for a code outside ``[0, K)``. Rows are processed in chunks (one decode as
    an ``index_select`` over the stacked codewords, then one ``index_add_``).
    """
    check_normal_apply_args(x, codes, coef, codebooks)
    m, k, dsub = codebooks.shape
    _check_code_range(codes, k)
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


def _check_code_range(codes: Tensor, k: int) -> None:
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= k):
        raise ValueError(f"codes must be in [0, {k}), got values in [{int(codes.min())}, {int(codes.max())}]")


def anisotropic_normal_rhs_reference(x: Tensor, codes: Tensor, eta: Tensor, coef: Tensor, num_codewords: int):
    """Pure-torch ``(b, diag A)`` (module docstring): two ``(M, K, dsub)`` float32 tensors.

    The default kernel and test oracle of ``torch.ops.torchaq.anisotropic_normal_rhs``; a code
    outside ``[0, num_codewords)`` raises ValueError.
    """
    check_normal_rhs_args(x, codes, eta, coef, num_codewords)
    _check_code_range(codes, num_codewords)
    m = codes.shape[1]
    dsub = x.shape[1] // m
    rhs = torch.zeros(m * num_codewords, dsub, dtype=torch.float32, device=x.device)
    diag = torch.zeros_like(rhs)
    offsets = torch.arange(m, device=x.device) * num_codewords
    for start, stop in row_chunks(x.shape[0], x.shape[1] * 4):
        slots = (codes[start:stop].long() + offsets).reshape(-1)
        xc = x[start:stop]
        rhs.index_add_(0, slots, (eta[start:stop].unsqueeze(1) * xc).reshape(-1, dsub))
        diag.index_add_(0, slots, (1 + coef[start:stop].unsqueeze(1) * xc * xc).reshape(-1, dsub))
    return rhs.reshape(m, num_codewords, dsub), diag.reshape(m, num_codewords, dsub)


@torch.library.register_fake("torchaq::anisotropic_normal_apply")
def _normal_apply_fake(x: Tensor, codes: Tensor, coef: Tensor, codebooks: Tensor) -> Tensor:
    check_normal_apply_args(x, codes, coef, codebooks)
    return codebooks.new_empty(codebooks.shape)


def anisotropic_normal_apply(x: Tensor, codes: Tensor, coef: Tensor, codebooks: Tensor) -> Tensor:
    """``(A c)[m, j] = sum_{i: codes[i, m] = j} x~_{i,m} + coef_i <x~_i, x_i> x_{i,m}`` (``x~ = decode(codes, c)``).

    The normal-equations product of :func:`torchaq.quantizers.codebook_update.joint_codebook_update`.
    ``x`` float32 ``(N, M * dsub)``, ``codes`` int64 or uint8 ``(N, M)``, ``coef`` float32 ``(N,)``, ``codebooks`` float32 ``(M, K, dsub)``; returns
    ``(M, K, dsub)``. Cost ``O(N M dsub)``.
    """
    return torch.ops.torchaq.anisotropic_normal_apply(x, codes, coef, codebooks)


@torch.library.register_fake("torchaq::anisotropic_normal_rhs")
def _normal_rhs_fake(x: Tensor, codes: Tensor, eta: Tensor, coef: Tensor, num_codewords: int):
    check_normal_rhs_args(x, codes, eta, coef, num_codewords)
    m = codes.shape[1]
    shape = (m, num_codewords, x.shape[1] // m)
    return x.new_empty(shape), x.new_empty(shape)


def anisotropic_normal_rhs(x: Tensor, codes: Tensor, eta: Tensor, coef: Tensor, num_codewords: int):
    """``(b, diag A)`` of the joint codebook update's normal equations:
    ``b[m, j] = sum eta_i x_{i,m}``, ``diag[m, j] = sum 1 + coef_i x_{i,m}^2`` over the rows with
    ``codes[i, m] = j``; two ``(M, num_codewords, dsub)`` float32 tensors. Cost ``O(N M dsub)``.
    """
    return torch.ops.torchaq.anisotropic_normal_rhs(x, codes, eta, coef, num_codewords)


torch.library.impl(LIB, "anisotropic_normal_apply", "CompositeExplicitAutograd")(anisotropic_normal_apply_reference)
torch.library.impl(LIB, "anisotropic_normal_rhs", "CompositeExplicitAutograd")(anisotropic_normal_rhs_reference)
