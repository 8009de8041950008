"""``torch.ops.torchaq.pack_codes`` / ``unpack_codes``: the blocked code layout the scan kernels read.

Packed code layout (shared by the CPU and GPU kernels)
------------------------------------------------------
Classes are grouped in blocks of 32. ``packed`` has shape ``(ceil(N / 32), P, 32)`` uint8:

* 4-bit codes, ``P = ceil(M / 2)``: ``packed[b, p, i] = code[32 b + i, 2 p] | code[32 b + i, 2 p + 1] << 4``
  -- one 32-byte row holds one *pair* of subspaces for 32 classes, low nibble first, which is
  exactly what one ``vpshufb`` over a 16-entry table consumes (FAISS fast-scan / ScaNN LUT16).
* 8-bit codes, ``P = M``: ``packed[b, m, i] = code[32 b + i, m]``.

Padding classes (``N`` not a multiple of 32) and the padding subspace (odd ``M`` with 4 bits)
hold code 0; the scan kernels ignore padding classes, and the padding subspace has no LUT row.
"""
from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor

from torchaq.ops.layout import BLOCK, check_pack_args, check_unpack_args, num_blocks, packed_width
from torchaq.ops.schemas import LIB


@torch.library.register_fake("torchaq::pack_codes")
def _pack_codes_fake(codes: Tensor, bits: int) -> Tensor:
    check_pack_args(codes, bits)
    n, m = codes.shape
    return codes.new_empty((num_blocks(n), packed_width(m, bits), BLOCK))


@torch.library.impl(LIB, "pack_codes", "CompositeExplicitAutograd")
def pack_codes_reference(codes: Tensor, bits: int) -> Tensor:
    check_pack_args(codes, bits)
    n, m = codes.shape
    nb = num_blocks(n)
    if bits == 4:
        if codes.numel() and int(codes.max()) > 15:
            raise ValueError("codes must be < 16 for bits=4")
        padded = codes.new_zeros((nb * BLOCK, 2 * packed_width(m, 4)))
        padded[:n, :m] = codes
        pairs = padded[:, 0::2] | (padded[:, 1::2] << 4)
    else:
        pairs = codes.new_zeros((nb * BLOCK, m))
        pairs[:n] = codes
    return rearrange(pairs, "(nb i) p -> nb p i", i=BLOCK).contiguous()


@torch.library.register_fake("torchaq::unpack_codes")
def _unpack_codes_fake(packed: Tensor, num_subspaces: int, bits: int, num_classes: int) -> Tensor:
    check_unpack_args(packed, num_subspaces, bits, num_classes)
    return packed.new_empty((num_classes, num_subspaces))


def codes_of_packed_rows(rows: Tensor, num_subspaces: int, bits: int) -> Tensor:
    """``(n, M)`` codes from ``(n, P)`` packed rows (``packed[nb, :, i]`` of the classes wanted)."""
    if bits == 4:  # low nibble = even subspace, high nibble = odd subspace
        rows = rearrange(torch.stack([rows & 15, rows >> 4], dim=-1), "n p two -> n (p two)")
    return rows[:, :num_subspaces].contiguous()


@torch.library.impl(LIB, "unpack_codes", "CompositeExplicitAutograd")
def unpack_codes_reference(packed: Tensor, num_subspaces: int, bits: int, num_classes: int) -> Tensor:
    check_unpack_args(packed, num_subspaces, bits, num_classes)
    return codes_of_packed_rows(rearrange(packed, "nb p i -> (nb i) p")[:num_classes], num_subspaces, bits)



def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """Pack ``(N, M)`` uint8 codes into the blocked layout the scan kernels read (see module doc)."""
    return torch.ops.torchaq.pack_codes(codes, bits)


def unpack_codes(packed: Tensor, num_subspaces: int, bits: int, num_classes: int) -> Tensor:
    """Inverse of :func:`pack_codes`."""
    return torch.ops.torchaq.unpack_codes(packed, num_subspaces, bits, num_classes)

