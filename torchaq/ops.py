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

# the layout constants and argument checks every backend shares (re-exported here)
from .layout import (  # noqa: F401
    BITS_OF_K,
    BLOCK,
    bits_of_lut,
    check_compute_lut_args,
    check_finite,
    check_k,
    check_lut_scan_args,
    check_pack_args,
    check_unpack_args,
    num_blocks,
    packed_width,
)

from .rescore import exact_logits

_LIB = torch.library.Library("torchaq", "DEF")
_LIB.define("compute_lut(Tensor queries, Tensor codebooks) -> Tensor")
_LIB.define("pack_codes(Tensor codes, int bits) -> Tensor")
_LIB.define("unpack_codes(Tensor packed, int num_subspaces, int bits, int num_classes) -> Tensor")
_LIB.define("lut_score(Tensor lut, Tensor packed, int num_classes, Tensor? bias=None) -> Tensor")
_LIB.define(
    "lut_topk(Tensor lut, Tensor packed, int num_classes, int k, Tensor? bias=None) -> (Tensor, Tensor)"
)
_LIB.define(
    "aq_encode(Tensor x, Tensor codebooks, Tensor codes, Tensor eta, Tensor perturb, int icm_iters, bool greedy)"
    " -> Tensor"
)
_LIB.define("rescore_topk(Tensor h, Tensor weight, Tensor? bias, Tensor candidates, int k) -> (Tensor, Tensor)")


# --------------------------------------------------------------------------------------------
# compute_lut: LUT[b, m, j] = <q_m, C_m[j]>
# --------------------------------------------------------------------------------------------
@torch.library.register_fake("torchaq::compute_lut")
def _compute_lut_fake(queries: Tensor, codebooks: Tensor) -> Tensor:
    check_compute_lut_args(queries, codebooks)
    return queries.new_empty((queries.shape[0], codebooks.shape[0], codebooks.shape[1]), dtype=torch.float32)


@torch.library.impl(_LIB, "compute_lut", "CompositeExplicitAutograd")
def compute_lut_reference(queries: Tensor, codebooks: Tensor) -> Tensor:
    check_compute_lut_args(queries, codebooks)
    m, _, dsub = codebooks.shape
    q = queries.float().reshape(queries.shape[0], m, dsub)
    return torch.einsum("bmd,mkd->bmk", q, codebooks.float()).contiguous()


# --------------------------------------------------------------------------------------------
# pack / unpack
# --------------------------------------------------------------------------------------------
@torch.library.register_fake("torchaq::pack_codes")
def _pack_codes_fake(codes: Tensor, bits: int) -> Tensor:
    check_pack_args(codes, bits)
    n, m = codes.shape
    return codes.new_empty((num_blocks(n), packed_width(m, bits), BLOCK))


@torch.library.impl(_LIB, "pack_codes", "CompositeExplicitAutograd")
def _pack_codes_ref(codes: Tensor, bits: int) -> Tensor:
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


@torch.library.impl(_LIB, "unpack_codes", "CompositeExplicitAutograd")
def _unpack_codes_ref(packed: Tensor, num_subspaces: int, bits: int, num_classes: int) -> Tensor:
    check_unpack_args(packed, num_subspaces, bits, num_classes)
    return codes_of_packed_rows(rearrange(packed, "nb p i -> (nb i) p")[:num_classes], num_subspaces, bits)


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
    check_k(k)
    kk = min(k, num_classes)
    return lut.new_empty((lut.shape[0], kk)), lut.new_empty((lut.shape[0], kk), dtype=torch.int64)


@torch.library.impl(_LIB, "lut_topk", "CompositeExplicitAutograd")
def _lut_topk_ref(
    lut: Tensor, packed: Tensor, num_classes: int, k: int, bias: Optional[Tensor] = None
) -> Tuple[Tensor, Tensor]:
    check_lut_scan_args(lut, packed, num_classes, bias)
    check_k(k)
    check_finite(lut, bias)
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
# aq_encode: score-aware LSQ++ encoding for additive codebooks (torchaq/aq_encode.py)
# --------------------------------------------------------------------------------------------
@torch.library.register_fake("torchaq::aq_encode")
def _aq_encode_fake(x, codebooks, codes, eta, perturb, icm_iters, greedy):
    from .aq_encode import check_aq_encode_args

    check_aq_encode_args(x, codebooks, codes, eta, perturb, icm_iters)
    return codes.new_empty(codes.shape)


@torch.library.impl(_LIB, "aq_encode", "CompositeExplicitAutograd")
def _aq_encode_ref(x, codebooks, codes, eta, perturb, icm_iters, greedy):
    from .aq_encode import aq_encode_reference

    return aq_encode_reference(x, codebooks, codes, eta, perturb, icm_iters, greedy)


def aq_encode(
    x: Tensor, codebooks: Tensor, codes: Tensor, eta: Tensor, perturb: Tensor, icm_iters: int, greedy: bool
) -> Tensor:
    """Additive codes ``(N, M)`` int64 of ``x`` minimising ``|r|^2 + (eta - 1) <r, x>^2 / |x|^2`` (LSQ++ search).

    See :func:`torchaq.aq_encode.aq_encode_reference` for the arguments and the algorithm.
    """
    return torch.ops.torchaq.aq_encode(x, codebooks, codes, eta, perturb, icm_iters, greedy)


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
    check_k(k)


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


# --------------------------------------------------------------------------------------------
# pq_encode / anisotropic_encode: codes of rows x (N, M * dsub) under codebooks (M, K, dsub)
# --------------------------------------------------------------------------------------------
_LIB.define("pq_encode(Tensor x, Tensor codebooks) -> Tensor")
_LIB.define("anisotropic_encode(Tensor x, Tensor codebooks, Tensor eta, int max_rounds) -> Tensor")


def _check_encode(x: Tensor, codebooks: Tensor, eta: Optional[Tensor] = None, max_rounds: int = 0) -> None:
    if x.dim() != 2:
        raise ValueError(f"x must be (N, D), got shape {tuple(x.shape)}")
    if codebooks.dim() != 3:
        raise ValueError(f"codebooks must be (M, K, dsub), got shape {tuple(codebooks.shape)}")
    if x.dtype != torch.float32:
        raise TypeError(f"x must be float32, got {x.dtype}")
    if codebooks.dtype != torch.float32:
        raise TypeError(f"codebooks must be float32, got {codebooks.dtype}")
    m, k, dsub = codebooks.shape
    torch._check(m >= 1 and k >= 1 and dsub >= 1, lambda: f"codebooks must be non-empty (M, K, dsub), got {tuple(codebooks.shape)}")
    if x.shape[1] != m * dsub:
        raise ValueError(f"x has {x.shape[1]} columns but codebooks (M, K, dsub) = {tuple(codebooks.shape)} need M * dsub = {m * dsub}")
    if x.device != codebooks.device:
        raise ValueError(f"x is on {x.device} but codebooks on {codebooks.device}")
    if eta is not None:
        if eta.dim() != 1 or eta.shape[0] != x.shape[0]:
            raise ValueError(f"eta must have shape ({x.shape[0]},), got {tuple(eta.shape)}")
        if eta.dtype != torch.float32:
            raise TypeError(f"eta must be float32, got {eta.dtype}")
        if eta.device != x.device:
            raise ValueError(f"eta is on {eta.device} but x on {x.device}")
        if max_rounds < 0:
            raise ValueError(f"max_rounds must be >= 0, got {max_rounds}")


@torch.library.register_fake("torchaq::pq_encode")
def _pq_encode_fake(x: Tensor, codebooks: Tensor) -> Tensor:
    _check_encode(x, codebooks)
    return x.new_empty((x.shape[0], codebooks.shape[0]), dtype=torch.int64)


@torch.library.impl(_LIB, "pq_encode", "CompositeExplicitAutograd")
def _pq_encode_ref(x: Tensor, codebooks: Tensor) -> Tensor:
    from .encode import l2_encode_reference

    _check_encode(x, codebooks)
    return l2_encode_reference(x, codebooks)


@torch.library.register_fake("torchaq::anisotropic_encode")
def _anisotropic_encode_fake(x: Tensor, codebooks: Tensor, eta: Tensor, max_rounds: int) -> Tensor:
    _check_encode(x, codebooks, eta, max_rounds)
    return x.new_empty((x.shape[0], codebooks.shape[0]), dtype=torch.int64)


@torch.library.impl(_LIB, "anisotropic_encode", "CompositeExplicitAutograd")
def _anisotropic_encode_ref(x: Tensor, codebooks: Tensor, eta: Tensor, max_rounds: int) -> Tensor:
    from .encode import anisotropic_encode_reference

    _check_encode(x, codebooks, eta, max_rounds)
    return anisotropic_encode_reference(x, codebooks, eta, max_rounds)


def pq_encode(x: Tensor, codebooks: Tensor) -> Tensor:
    """Plain PQ codes ``argmin_j |x_m - C_m[j]|^2`` (first index on ties): ``(N, M)`` int64.

    ``x`` float32 ``(N, M * dsub)``, ``codebooks`` float32 ``(M, K, dsub)``. Cost ``O(N M K dsub)``.
    """
    return torch.ops.torchaq.pq_encode(x, codebooks)


def anisotropic_encode(x: Tensor, codebooks: Tensor, eta: Tensor, max_rounds: int) -> Tensor:
    """Score-aware codes by coordinate descent (:func:`torchaq.encode.anisotropic_encode_reference`).

    ``eta`` float32 ``(N,)`` per row; ``max_rounds`` rounds at most (0: the L2 codes). Cost
    ``O(N M K (dsub + rounds))``.
    """
    return torch.ops.torchaq.anisotropic_encode(x, codebooks, eta, max_rounds)


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


# --------------------------------------------------------------------------------------------
# anisotropic_normal_apply: the product A c of the joint codebook update (torchaq/normal_apply.py)
# --------------------------------------------------------------------------------------------
_LIB.define("anisotropic_normal_apply(Tensor x, Tensor codes, Tensor coef, Tensor codebooks) -> Tensor")


@torch.library.register_fake("torchaq::anisotropic_normal_apply")
def _normal_apply_fake(x: Tensor, codes: Tensor, coef: Tensor, codebooks: Tensor) -> Tensor:
    from .normal_apply import check_normal_apply_args

    check_normal_apply_args(x, codes, coef, codebooks)
    return codebooks.new_empty(codebooks.shape)


@torch.library.impl(_LIB, "anisotropic_normal_apply", "CompositeExplicitAutograd")
def _normal_apply_ref(x: Tensor, codes: Tensor, coef: Tensor, codebooks: Tensor) -> Tensor:
    from .normal_apply import normal_apply_reference

    return normal_apply_reference(x, codes, coef, codebooks)


def anisotropic_normal_apply(x: Tensor, codes: Tensor, coef: Tensor, codebooks: Tensor) -> Tensor:
    """``(A c)[m, j] = sum_{i: codes[i, m] = j} x~_{i,m} + coef_i <x~_i, x_i> x_{i,m}`` (``x~ = decode(codes, c)``).

    The normal-equations product of :func:`torchaq.codebook_update.joint_codebook_update`
    (:mod:`torchaq.normal_apply`). ``x`` float32 ``(N, M * dsub)``, ``codes`` int64 or uint8
    ``(N, M)``, ``coef`` float32 ``(N,)``, ``codebooks`` float32 ``(M, K, dsub)``; returns
    ``(M, K, dsub)``. Cost ``O(N M dsub)``.
    """
    return torch.ops.torchaq.anisotropic_normal_apply(x, codes, coef, codebooks)


_LIB.define(
    "anisotropic_normal_rhs(Tensor x, Tensor codes, Tensor eta, Tensor coef, int num_codewords) -> (Tensor, Tensor)"
)


@torch.library.register_fake("torchaq::anisotropic_normal_rhs")
def _normal_rhs_fake(x: Tensor, codes: Tensor, eta: Tensor, coef: Tensor, num_codewords: int):
    from .normal_apply import check_normal_rhs_args

    check_normal_rhs_args(x, codes, eta, coef, num_codewords)
    m = codes.shape[1]
    shape = (m, num_codewords, x.shape[1] // m)
    return x.new_empty(shape), x.new_empty(shape)


@torch.library.impl(_LIB, "anisotropic_normal_rhs", "CompositeExplicitAutograd")
def _normal_rhs_ref(x: Tensor, codes: Tensor, eta: Tensor, coef: Tensor, num_codewords: int):
    from .normal_apply import normal_rhs_reference

    return normal_rhs_reference(x, codes, eta, coef, num_codewords)


def anisotropic_normal_rhs(x: Tensor, codes: Tensor, eta: Tensor, coef: Tensor, num_codewords: int):
    """``(b, diag A)`` of the joint codebook update's normal equations (:mod:`torchaq.normal_apply`):
    ``b[m, j] = sum eta_i x_{i,m}``, ``diag[m, j] = sum 1 + coef_i x_{i,m}^2`` over the rows with
    ``codes[i, m] = j``; two ``(M, num_codewords, dsub)`` float32 tensors. Cost ``O(N M dsub)``.
    """
    return torch.ops.torchaq.anisotropic_normal_rhs(x, codes, eta, coef, num_codewords)


# --------------------------------------------------------------------------------------------
# layer_topk: LUT + scan + exact re-score of the candidates and the side list, one op (layer_topk.py)
# --------------------------------------------------------------------------------------------
from . import layer_topk as _layer_topk  # noqa: E402

_layer_topk._register(_LIB)
