"""The ``torch.ops.torchaq.*`` operators: schemas, fake kernels and pure-torch references.

Every op is declared here once. The pure-torch reference is registered as the
``CompositeExplicitAutograd`` kernel, so it is the fallback on every device and the oracle of
the tests; the C++ extension (``torchaq/csrc``) overrides the ``CPU`` key and the Triton kernels
(``triton_kernels/``) the ``CUDA`` key when they are available.

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

import math
from typing import Optional, Tuple

import torch
from einops import rearrange
from torch import Tensor

from .rescore import exact_logits

BLOCK = 32  # classes per packed block

_LIB = torch.library.Library("torchaq", "DEF")
_LIB.define("compute_lut(Tensor queries, Tensor codebooks) -> Tensor")
_LIB.define("pack_codes(Tensor codes, int bits) -> Tensor")
_LIB.define("unpack_codes(Tensor packed, int num_subspaces, int bits, int num_classes) -> Tensor")
_LIB.define("lut_score(Tensor lut, Tensor packed, int num_classes, Tensor? bias=None) -> Tensor")
_LIB.define(
    "lut_topk(Tensor lut, Tensor packed, int num_classes, int k, Tensor? bias=None) -> (Tensor, Tensor)"
)
_LIB.define("rescore_topk(Tensor h, Tensor weight, Tensor? bias, Tensor candidates, int k) -> (Tensor, Tensor)")


# --------------------------------------------------------------------------------------------
# argument checks, shared by the fake and the reference kernels (C++ / Triton repeat them)
# --------------------------------------------------------------------------------------------
BITS_OF_K = {16: 4, 256: 8}  # codewords per subspace -> code width in bits


def bits_of_lut(lut: Tensor) -> int:
    """4 for a 16-entry LUT, 8 for a 256-entry one."""
    return BITS_OF_K[int(lut.shape[-1])]  # int(): a SymInt under dynamic shapes is unhashable


def packed_width(num_subspaces: int, bits: int) -> int:
    """Bytes per class in the packed layout: ``ceil(M / 2)`` for 4-bit, ``M`` for 8-bit."""
    return (num_subspaces + 1) // 2 if bits == 4 else num_subspaces


def _check_bits(bits: int) -> None:
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")


def check_lut_scan_args(lut: Tensor, packed: Tensor, num_classes: int, bias: Optional[Tensor]) -> int:
    """Validate the arguments of ``lut_score`` / ``lut_topk``; return the code width in bits."""
    if lut.dim() != 3:
        raise ValueError(f"lut must be (B, M, K), got shape {tuple(lut.shape)}")
    if lut.dtype != torch.float32:
        raise TypeError(f"lut must be float32, got {lut.dtype}")
    if lut.shape[-1] not in (16, 256):
        raise ValueError(f"lut must have K = 16 (4-bit) or 256 (8-bit) entries, got K = {lut.shape[-1]}")
    bits = bits_of_lut(lut)
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed must be uint8 (from torchaq.ops.pack_codes), got {packed.dtype}")
    if packed.dim() != 3 or packed.shape[-1] != BLOCK:
        raise ValueError(f"packed must be (ceil(N/32), P, 32) from pack_codes, got shape {tuple(packed.shape)}")
    if num_classes < 0 or packed.shape[0] != (num_classes + BLOCK - 1) // BLOCK:
        raise ValueError(
            f"num_classes={num_classes} does not match packed with {packed.shape[0]} blocks of {BLOCK}"
        )
    width = packed_width(lut.shape[1], bits)
    if packed.shape[1] != width:
        raise ValueError(
            f"packed has {packed.shape[1]} bytes per class but lut has M = {lut.shape[1]} "
            f"subspaces of {bits} bits ({width} bytes): mismatched num_subspaces"
        )
    if packed.device != lut.device:
        raise ValueError(f"packed is on {packed.device} but lut is on {lut.device}")
    if bias is not None:
        if bias.shape != (num_classes,):
            raise ValueError(f"bias must have shape ({num_classes},), got {tuple(bias.shape)}")
        if bias.dtype != torch.float32:
            raise TypeError(f"bias must be float32, got {bias.dtype}")
        if bias.device != lut.device:
            raise ValueError(f"bias is on {bias.device} but lut is on {lut.device}")
    return bits


def _check_k(k: int) -> None:
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")


# --------------------------------------------------------------------------------------------
# compute_lut: LUT[b, m, j] = <q_m, C_m[j]>
# --------------------------------------------------------------------------------------------
def _check_compute_lut(queries: Tensor, codebooks: Tensor) -> None:
    if codebooks.dim() != 3:
        raise ValueError(f"codebooks must be (M, K, dsub), got shape {tuple(codebooks.shape)}")
    if queries.dim() != 2:
        raise ValueError(f"queries must be (B, d), got shape {tuple(queries.shape)}")
    m, _, dsub = codebooks.shape
    if queries.shape[1] != m * dsub:
        raise ValueError(
            f"queries have d = {queries.shape[1]} but codebooks cover M * dsub = {m} * {dsub} = {m * dsub} "
            "(pad queries with zeros to the quantizer's padded dimension)"
        )
    if not queries.is_floating_point() or not codebooks.is_floating_point():
        raise TypeError(f"queries and codebooks must be floating point, got {queries.dtype}, {codebooks.dtype}")
    if queries.device != codebooks.device:
        raise ValueError(f"queries are on {queries.device} but codebooks on {codebooks.device}")


@torch.library.register_fake("torchaq::compute_lut")
def _compute_lut_fake(queries: Tensor, codebooks: Tensor) -> Tensor:
    _check_compute_lut(queries, codebooks)
    return queries.new_empty((queries.shape[0], codebooks.shape[0], codebooks.shape[1]), dtype=torch.float32)


@torch.library.impl(_LIB, "compute_lut", "CompositeExplicitAutograd")
def _compute_lut_ref(queries: Tensor, codebooks: Tensor) -> Tensor:
    _check_compute_lut(queries, codebooks)
    m, _, dsub = codebooks.shape
    q = queries.float().reshape(queries.shape[0], m, dsub)
    return torch.einsum("bmd,mkd->bmk", q, codebooks.float()).contiguous()


# --------------------------------------------------------------------------------------------
# pack / unpack
# --------------------------------------------------------------------------------------------
def _check_pack(codes: Tensor, bits: int) -> None:
    _check_bits(bits)
    if codes.dim() != 2:
        raise ValueError(f"codes must be (N, M), got shape {tuple(codes.shape)}")
    if codes.dtype != torch.uint8:
        raise TypeError(f"codes must be uint8, got {codes.dtype}")


@torch.library.register_fake("torchaq::pack_codes")
def _pack_codes_fake(codes: Tensor, bits: int) -> Tensor:
    _check_pack(codes, bits)
    n, m = codes.shape
    return codes.new_empty(((n + BLOCK - 1) // BLOCK, packed_width(m, bits), BLOCK))


@torch.library.impl(_LIB, "pack_codes", "CompositeExplicitAutograd")
def _pack_codes_ref(codes: Tensor, bits: int) -> Tensor:
    _check_pack(codes, bits)
    n, m = codes.shape
    nb = (n + BLOCK - 1) // BLOCK
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


def _check_unpack(packed: Tensor, num_subspaces: int, bits: int, num_classes: int) -> None:
    _check_bits(bits)
    if packed.dtype != torch.uint8 or packed.dim() != 3 or packed.shape[-1] != BLOCK:
        raise ValueError(f"packed must be uint8 (ceil(N/32), P, 32), got {packed.dtype} {tuple(packed.shape)}")
    if packed.shape[1] != packed_width(num_subspaces, bits):
        raise ValueError(f"packed width {packed.shape[1]} does not match num_subspaces={num_subspaces}, bits={bits}")
    if num_classes < 0 or packed.shape[0] != (num_classes + BLOCK - 1) // BLOCK:
        raise ValueError(f"num_classes={num_classes} does not match {packed.shape[0]} packed blocks")


@torch.library.register_fake("torchaq::unpack_codes")
def _unpack_codes_fake(packed: Tensor, num_subspaces: int, bits: int, num_classes: int) -> Tensor:
    _check_unpack(packed, num_subspaces, bits, num_classes)
    return packed.new_empty((num_classes, num_subspaces))


@torch.library.impl(_LIB, "unpack_codes", "CompositeExplicitAutograd")
def _unpack_codes_ref(packed: Tensor, num_subspaces: int, bits: int, num_classes: int) -> Tensor:
    _check_unpack(packed, num_subspaces, bits, num_classes)
    rows = rearrange(packed, "nb p i -> (nb i) p")
    if bits == 4:  # low nibble = even subspace, high nibble = odd subspace
        rows = rearrange(torch.stack([rows & 15, rows >> 4], dim=-1), "n p two -> n (p two)")
    return rows[:num_classes, :num_subspaces].contiguous()


# --------------------------------------------------------------------------------------------
# lut_score / lut_topk: score[b, n] = sum_m LUT[b, m, code[n, m]] (+ bias[n])
# --------------------------------------------------------------------------------------------
def _chunk_rows(batch: int, num_subspaces: int) -> int:
    # keep the (B, chunk, M) gathered block around 8M floats (32 MB)
    return max(BLOCK, (8 << 20) // max(1, batch * num_subspaces) // BLOCK * BLOCK)


def _score_chunks(lut: Tensor, packed: Tensor, num_classes: int, bias: Optional[Tensor]):
    """Yield ``(start, scores)`` with exact float32 LUT sums for consecutive chunks of classes."""
    batch, m, k = lut.shape
    bits = bits_of_lut(lut)
    flat = lut.reshape(batch, m * k)
    offsets = torch.arange(m, device=lut.device) * k
    rows_per_chunk = _chunk_rows(batch, m)
    blocks_per_chunk = rows_per_chunk // BLOCK
    for b0 in range(0, packed.shape[0], blocks_per_chunk):
        start = b0 * BLOCK
        stop = min(num_classes, start + rows_per_chunk)
        chunk = packed[b0 : b0 + blocks_per_chunk]
        codes = _unpack_codes_ref(chunk, m, bits, stop - start).long() + offsets
        scores = flat[:, codes].sum(-1)
        if bias is not None:
            scores = scores + bias[start:stop]
        yield start, scores


@torch.library.register_fake("torchaq::lut_score")
def _lut_score_fake(lut: Tensor, packed: Tensor, num_classes: int, bias: Optional[Tensor] = None) -> Tensor:
    check_lut_scan_args(lut, packed, num_classes, bias)
    return lut.new_empty((lut.shape[0], num_classes))


@torch.library.impl(_LIB, "lut_score", "CompositeExplicitAutograd")
def _lut_score_ref(lut: Tensor, packed: Tensor, num_classes: int, bias: Optional[Tensor] = None) -> Tensor:
    check_lut_scan_args(lut, packed, num_classes, bias)
    out = lut.new_empty((lut.shape[0], num_classes))
    for start, scores in _score_chunks(lut, packed, num_classes, bias):
        out[:, start : start + scores.shape[1]] = scores
    return out


@torch.library.register_fake("torchaq::lut_topk")
def _lut_topk_fake(
    lut: Tensor, packed: Tensor, num_classes: int, k: int, bias: Optional[Tensor] = None
) -> Tuple[Tensor, Tensor]:
    check_lut_scan_args(lut, packed, num_classes, bias)
    _check_k(k)
    kk = min(k, num_classes)
    return lut.new_empty((lut.shape[0], kk)), lut.new_empty((lut.shape[0], kk), dtype=torch.int64)


@torch.library.impl(_LIB, "lut_topk", "CompositeExplicitAutograd")
def _lut_topk_ref(
    lut: Tensor, packed: Tensor, num_classes: int, k: int, bias: Optional[Tensor] = None
) -> Tuple[Tensor, Tensor]:
    check_lut_scan_args(lut, packed, num_classes, bias)
    _check_k(k)
    # a nan / inf score has no place in a ranking (the kernels would disagree on it): refuse it
    if not bool(torch.isfinite(lut).all()):
        raise ValueError("lut_topk needs finite lut entries (got inf or nan)")
    if bias is not None and not bool(torch.isfinite(bias).all()):
        raise ValueError("lut_topk needs a finite bias (got inf or nan)")
    kk = min(k, num_classes)
    batch = lut.shape[0]
    best_v = lut.new_full((batch, 0), -math.inf)
    best_i = torch.zeros((batch, 0), dtype=torch.int64, device=lut.device)
    for start, scores in _score_chunks(lut, packed, num_classes, bias):
        idx = torch.arange(start, start + scores.shape[1], device=lut.device).expand(batch, -1)
        v = torch.cat([best_v, scores], dim=1)
        i = torch.cat([best_i, idx], dim=1)
        best_v, pos = v.topk(min(kk, v.shape[1]), dim=1)
        best_i = i.gather(1, pos)
    return best_v.contiguous(), best_i.contiguous()


# --------------------------------------------------------------------------------------------
# rescore_topk: exact logits of per-row candidate classes, best k first
# --------------------------------------------------------------------------------------------
def _check_rescore(h: Tensor, weight: Tensor, bias: Optional[Tensor], candidates: Tensor, k: int) -> None:
    if h.dim() != 2:
        raise ValueError(f"h must be (B, d), got shape {tuple(h.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be (V, d), got shape {tuple(weight.shape)}")
    if not h.is_floating_point() or not weight.is_floating_point():
        raise TypeError(f"h and weight must be floating point, got {h.dtype}, {weight.dtype}")
    if h.shape[1] != weight.shape[1]:
        raise ValueError(f"h has d = {h.shape[1]} but weight has d = {weight.shape[1]}")
    if candidates.dim() != 2 or candidates.shape[0] != h.shape[0]:
        raise ValueError(f"candidates must be (B, C) with B = {h.shape[0]}, got shape {tuple(candidates.shape)}")
    if candidates.dtype != torch.int64:
        raise TypeError(f"candidates must be int64, got {candidates.dtype}")
    if bias is not None:
        if bias.dim() != 1 or bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
        if not bias.is_floating_point():
            raise TypeError(f"bias must be floating point, got {bias.dtype}")
    for name, t in (("weight", weight), ("candidates", candidates), ("bias", bias)):
        if t is not None and t.device != h.device:
            raise ValueError(f"{name} is on {t.device} but h is on {h.device}")
    _check_k(k)


@torch.library.register_fake("torchaq::rescore_topk")
def _rescore_topk_fake(
    h: Tensor, weight: Tensor, bias: Optional[Tensor], candidates: Tensor, k: int
) -> Tuple[Tensor, Tensor]:
    _check_rescore(h, weight, bias, candidates, k)
    kk = min(k, candidates.shape[1])
    return h.new_empty((h.shape[0], kk), dtype=torch.float32), candidates.new_empty((h.shape[0], kk))


@torch.library.impl(_LIB, "rescore_topk", "CompositeExplicitAutograd")
def _rescore_topk_ref(
    h: Tensor, weight: Tensor, bias: Optional[Tensor], candidates: Tensor, k: int
) -> Tuple[Tensor, Tensor]:
    _check_rescore(h, weight, bias, candidates, k)
    if candidates.numel() and (int(candidates.min()) < 0 or int(candidates.max()) >= weight.shape[0]):
        raise ValueError(
            f"candidates must be class ids in [0, {weight.shape[0]}), got values in "
            f"[{int(candidates.min())}, {int(candidates.max())}]"
        )
    kk = min(k, candidates.shape[1])
    ids = candidates.sort(dim=1).values  # class order: the stable sort below breaks ties by class
    logits = exact_logits(h, weight, bias, ids)
    repeat = torch.zeros_like(ids, dtype=torch.bool)
    repeat[:, 1:] = ids[:, 1:] == ids[:, :-1]
    logits = logits.masked_fill(repeat, -math.inf)
    values, order = logits.sort(dim=1, descending=True, stable=True)
    return values[:, :kk].contiguous(), ids.gather(1, order[:, :kk]).contiguous()


# --------------------------------------------------------------------------------------------
# Python entry points (what the rest of the package calls)
# --------------------------------------------------------------------------------------------
def compute_lut(queries: Tensor, codebooks: Tensor) -> Tensor:
    """``LUT[b, m, j] = <q_m, C_m[j]>`` for queries ``(B, M*dsub)`` and codebooks ``(M, K, dsub)``; float32."""
    return torch.ops.torchaq.compute_lut(queries, codebooks)


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """Pack ``(N, M)`` uint8 codes into the blocked layout the scan kernels read (see module doc)."""
    return torch.ops.torchaq.pack_codes(codes, bits)


def unpack_codes(packed: Tensor, num_subspaces: int, bits: int, num_classes: int) -> Tensor:
    """Inverse of :func:`pack_codes`."""
    return torch.ops.torchaq.unpack_codes(packed, num_subspaces, bits, num_classes)


def lut_score(lut: Tensor, packed: Tensor, num_classes: int, bias: Optional[Tensor] = None) -> Tensor:
    """Scores of all classes, ``(B, N)`` float32: ``sum_m lut[b, m, code[n, m]] + bias[n]``.

    Exact float sums on every backend (no LUT quantization): this is what
    :meth:`torchaq.AnisotropicPQ.score` returns.
    """
    return torch.ops.torchaq.lut_score(lut, packed, num_classes, bias)


def lut_topk(
    lut: Tensor, packed: Tensor, num_classes: int, k: int, bias: Optional[Tensor] = None
) -> Tuple[Tensor, Tensor]:
    """Top-``k`` classes by LUT score, ``(values, indices)`` of shape ``(B, min(k, N))``, best first.

    The reference sums the float LUT exactly; the CPU (C++) and CUDA (Triton) kernels may quantize
    the LUT (4-bit codes: uint8 entries, uint16 sums) and return de-quantized approximate scores,
    which is why callers re-score the returned candidates exactly.
    """
    return torch.ops.torchaq.lut_topk(lut, packed, num_classes, k, bias)


def rescore_topk(
    h: Tensor, weight: Tensor, bias: Optional[Tensor], candidates: Tensor, k: int
) -> Tuple[Tensor, Tensor]:
    """Exact logits of candidate classes, best ``k`` first: ``(values, indices)`` of shape ``(B, min(k, C))``.

    ``logit[b, c] = <h[b], weight[c]> + bias[c]`` (float32) for the ``C`` classes in row ``b`` of
    ``candidates`` (int64 ``(B, C)``), ranked by logit (descending), ties by class id (ascending);
    a class repeated in a row counts once (its repeats score ``-inf``). The re-score step after
    every LUT scan (:meth:`torchaq.QuantizedSoftmax.topk`). Cost: ``B * C * d`` multiply-adds and
    ``B * C`` row reads; the CPU kernel reads each row once and keeps only the top ``k``, where the
    reference (:func:`torchaq.rescore.exact_logits` then a sort) gathers a ``(B, C, d)`` block.
    """
    return torch.ops.torchaq.rescore_topk(h, weight, bias, candidates, k)
