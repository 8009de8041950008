"""The contract every backend of the scan ops keeps: the packed code layout and the argument checks.

One home for what Python (:mod:`torchaq.ops`), the C++ kernels (``torchaq/csrc``, constants in
``scan_kernels.h``, exposed as ``torchaq._C.layout()`` and compared in the tests) and the Triton
kernels (``triton_kernels/``) must agree on.

Packed layout: classes are grouped in blocks of ``BLOCK = 32``; ``packed`` has shape
``(ceil(N / 32), P, 32)`` uint8 with ``P = packed_width(M, bits)`` bytes per class -- two 4-bit
codes per byte (low nibble = even subspace) or one 8-bit code.

The checks are written with ``torch._check_value`` / ``torch._check_type`` (as extension-cpp and
bitsandbytes do): they read shapes, dtypes and devices only, so the fake kernels run them under
``torch.compile`` without data-dependent guards, and they raise ``ValueError`` / ``TypeError``
that name the argument. :func:`check_finite` reads data and is for real tensors only.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

BLOCK = 32  # classes per packed block
BITS_OF_K = {16: 4, 256: 8}  # codewords per subspace -> code width in bits


def bits_of_lut(lut: Tensor) -> int:
    """4 for a 16-entry LUT, 8 for a 256-entry one."""
    return BITS_OF_K[int(lut.shape[-1])]  # int(): a SymInt under dynamic shapes is unhashable


def packed_width(num_subspaces: int, bits: int) -> int:
    """Bytes per class in the packed layout: ``ceil(M / 2)`` for 4-bit, ``M`` for 8-bit."""
    return (num_subspaces + 1) // 2 if bits == 4 else num_subspaces


def num_blocks(num_classes: int) -> int:
    """Packed blocks of ``BLOCK`` classes that hold ``num_classes`` classes."""
    return (num_classes + BLOCK - 1) // BLOCK


def check_bits(bits: int) -> None:
    torch._check_value(bits in (4, 8), lambda: f"bits must be 4 or 8, got {bits}")


def check_k(k: int) -> None:
    torch._check_value(k >= 0, lambda: f"k must be >= 0, got {k}")


def check_lut_scan_args(lut: Tensor, packed: Tensor, num_classes: int, bias: Optional[Tensor]) -> int:
    """Validate the arguments of ``lut_score`` / ``lut_topk``; return the code width in bits."""
    torch._check_value(lut.dim() == 3, lambda: f"lut must be (B, M, K), got shape {tuple(lut.shape)}")
    torch._check_type(lut.dtype == torch.float32, lambda: f"lut must be float32, got {lut.dtype}")
    torch._check_value(
        lut.shape[-1] in (16, 256),
        lambda: f"lut must have K = 16 (4-bit) or 256 (8-bit) entries, got K = {lut.shape[-1]}",
    )
    bits = bits_of_lut(lut)
    torch._check_type(
        packed.dtype == torch.uint8, lambda: f"packed must be uint8 (from torchaq.ops.pack_codes), got {packed.dtype}"
    )
    torch._check_value(
        packed.dim() == 3 and packed.shape[-1] == BLOCK,
        lambda: f"packed must be (ceil(N/32), P, 32) from pack_codes, got shape {tuple(packed.shape)}",
    )
    torch._check_value(
        num_classes >= 0 and packed.shape[0] == num_blocks(num_classes),
        lambda: f"num_classes={num_classes} does not match packed with {packed.shape[0]} blocks of {BLOCK}",
    )
    width = packed_width(lut.shape[1], bits)
    torch._check_value(
        packed.shape[1] == width,
        lambda: f"packed has {packed.shape[1]} bytes per class but lut has M = {lut.shape[1]} "
        f"subspaces of {bits} bits ({width} bytes): mismatched num_subspaces",
    )
    torch._check_value(packed.device == lut.device, lambda: f"packed is on {packed.device} but lut is on {lut.device}")
    if bias is not None:
        torch._check_value(
            tuple(bias.shape) == (num_classes,), lambda: f"bias must have shape ({num_classes},), got {tuple(bias.shape)}"
        )
        torch._check_type(bias.dtype == torch.float32, lambda: f"bias must be float32, got {bias.dtype}")
        torch._check_value(bias.device == lut.device, lambda: f"bias is on {bias.device} but lut is on {lut.device}")
    return bits


def check_finite(lut: Tensor, bias: Optional[Tensor]) -> None:
    """``lut_topk`` ranks scores: a NaN / Inf in ``lut`` or ``bias`` has no place in a ranking (the
    kernels would each order it differently), so every backend refuses it with this one check."""
    if lut.device.type == "meta":
        return
    if not bool(torch.isfinite(lut).all()):
        raise ValueError("lut_topk needs finite lut entries (got inf or nan)")
    if bias is not None and not bool(torch.isfinite(bias).all()):
        raise ValueError("lut_topk needs a finite bias (got inf or nan)")


def check_compute_lut_args(queries: Tensor, codebooks: Tensor) -> None:
    """Validate the arguments of ``compute_lut``."""
    torch._check_value(codebooks.dim() == 3, lambda: f"codebooks must be (M, K, dsub), got shape {tuple(codebooks.shape)}")
    torch._check_value(queries.dim() == 2, lambda: f"queries must be (B, d), got shape {tuple(queries.shape)}")
    m, _, dsub = codebooks.shape
    torch._check_value(
        queries.shape[1] == m * dsub,
        lambda: f"queries have d = {queries.shape[1]} but codebooks cover M * dsub = {m} * {dsub} = {m * dsub} "
        "(pad queries with zeros to the quantizer's padded dimension)",
    )
    torch._check_type(
        queries.is_floating_point() and codebooks.is_floating_point(),
        lambda: f"queries and codebooks must be floating point, got {queries.dtype}, {codebooks.dtype}",
    )
    torch._check_value(
        queries.device == codebooks.device, lambda: f"queries are on {queries.device} but codebooks on {codebooks.device}"
    )


def check_pack_args(codes: Tensor, bits: int) -> None:
    check_bits(bits)
    torch._check_value(codes.dim() == 2, lambda: f"codes must be (N, M), got shape {tuple(codes.shape)}")
    torch._check_type(codes.dtype == torch.uint8, lambda: f"codes must be uint8, got {codes.dtype}")


def check_unpack_args(packed: Tensor, num_subspaces: int, bits: int, num_classes: int) -> None:
    check_bits(bits)
    torch._check_value(
        packed.dtype == torch.uint8 and packed.dim() == 3 and packed.shape[-1] == BLOCK,
        lambda: f"packed must be uint8 (ceil(N/32), P, 32), got {packed.dtype} {tuple(packed.shape)}",
    )
    torch._check_value(
        packed.shape[1] == packed_width(num_subspaces, bits),
        lambda: f"packed width {packed.shape[1]} does not match num_subspaces={num_subspaces}, bits={bits}",
    )
    torch._check_value(
        num_classes >= 0 and packed.shape[0] == num_blocks(num_classes),
        lambda: f"num_classes={num_classes} does not match {packed.shape[0]} packed blocks",
    )
