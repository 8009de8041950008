"""The log-partition ``log Z`` behind :meth:`torchaq.QuantizedSoftmax.log_softmax_topk`, the same at every world size.

``Z = sum_c exp(l_c)`` splits into the candidates ``C`` (exact logits, already computed) and the
rest ``R``. Summing the float LUT scores ``s_c`` of the rest instead of their logits is biased
low: the rest is, by construction, the classes the scan ranked *below* the candidates, so their
LUT errors ``e_c = l_c - s_c`` are selected to be negative, and a flat softmax puts much of its
mass there. The rest is instead estimated by importance sampling with the LUT softmax as the
proposal (a ratio estimator with the LUT mass as control variate):

    Z_R ~= (sum_{c in R} exp(s_c)) * (1/n) sum_{j=1..n} exp(l_{c_j} - s_{c_j}),
    c_j ~ exp(s_c) / sum_{c' in R} exp(s_{c'})

which is unbiased for ``Z_R`` because ``E[exp(l - s)] = Z_R / sum_R exp(s)`` under that proposal.
The ``n`` classes are drawn by systematic sampling (the ``(j + 1/2) / n`` quantiles of the
proposal's cumulative mass), which is deterministic -- the same ``h`` gives the same ``log Z``.

**Sums that do not depend on how the classes are split.** Every mass is a sum of *integers*:
with ``M`` the row's largest term (an exact max), each term ``exp(x - M) <= 1`` is rounded to a
fixed-point integer ``round(exp(x - M) 2^S)`` (``S = 61 - bit_length(V)``, so ``V`` terms fit in
int64; absolute error ``2^-S`` per term against a sum ``>= 1``), and the exponential is computed
from IEEE ``+`` / ``*`` only (:func:`portable_exp`), whose results do not depend on a value's
position in a SIMD vector (library ``exp`` kernels may round a vector's tail differently).
Integer sums and cumulative sums are associative, so a vocabulary split over ranks
(:mod:`torchaq.distributed`) gives bitwise the single-device ``log Z``: each rank sums its slice,
the ranks exchange their ``(B, 2)`` integer totals and ``(B, n)`` sampled ratios (``comm``),
and every rank finishes with the same float operations on the same tensors. Integer sums are also
what lets the work go one block of classes at a time (block totals and a running carry give the
same integers as one pass): ``CLASS_BLOCKS`` blocks of at least ``MIN_BLOCK`` classes, so the float64
temporaries are ``(B, V / CLASS_BLOCKS)`` and the peak stays below the dense layer's ``(B, V)`` pair. Cost on
top of the ``(B, V)`` LUT score pass: about twenty elementwise passes over ``(B, V)`` (two sweeps:
totals, then the cumulative search), and ``B n d`` multiply-adds for the exact logits of the sample.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from torchaq.ops.rescore import row_logits

# classes of the rest scored exactly per row to correct its LUT mass
REST_SAMPLES = 256
# blocks of the fixed-point sums and cumulative search (bounds the (B, V / blocks) temporaries)
CLASS_BLOCKS = 32
MIN_BLOCK = 512
# (row, class) pairs of the sample scored at once: the (pairs, d) gather of h holds about V / 4 floats
# (a quarter of one dense logit row), at least MIN_PAIRS and at most MAX_PAIRS
MIN_PAIRS, MAX_PAIRS = 16, 4096
_LN2 = math.log(2.0)
# Taylor coefficients 1/i! of exp on [-ln2/2, ln2/2] (degree 7: relative error < 2e-8 in float64)
_COEFFS = [1.0 / math.factorial(i) for i in range(8)]


def portable_exp(x: Tensor) -> Tensor:
    """``exp(x)`` for ``x <= 0`` in float64 from IEEE ``+`` and ``*`` only (relative error ~1e-8; 0 below ``e^-700``).

    Bitwise the same for an element wherever it sits in a tensor (vectorised library ``exp``
    kernels may round a vector's tail with the scalar routine). ``-inf`` gives 0.
    """
    # in place where the result is the same IEEE operation: three float64 temporaries of x's size
    x = x.to(torch.float64, copy=True).clamp_(min=-700.0)
    n = (x * (1.0 / _LN2)).round_()
    x.sub_(n * _LN2)  # r = x - n ln2 (the product rounded first, as written: no fused multiply-add)
    p = torch.full_like(x, _COEFFS[-1])
    for c in reversed(_COEFFS[:-1]):
        p.mul_(x).add_(c)
    del x
    two_n = n.to(torch.int64)
    del n
    two_n.add_(1023).bitwise_left_shift_(52)  # 2^n exactly, from its bits
    return p.mul_(two_n.view(torch.float64))


def fixed_point_bits(num_classes: int) -> int:
    """``S``: fraction bits of the fixed-point masses, so that ``2 V`` terms ``<= 1`` fit in int64."""
    return 61 - int(num_classes).bit_length()


def _fixed(x: Tensor, ref: Tensor, bits: int) -> Tensor:
    """``round(exp(x - ref) 2^bits)`` as int64 (``-inf`` -> 0)."""
    return portable_exp(x.float() - ref.unsqueeze(1)).mul_(float(2.0 ** bits)).round_().to(torch.int64)


class _SingleDevice:
    """The ``comm`` of one device: the whole vocabulary is here."""

    def max(self, x: Tensor) -> Tensor:
        return x

    def totals(self, x: Tensor) -> Tensor:
        return x.unsqueeze(0)

    rank = 0

    def merge_samples(self, x: Tensor) -> Tensor:
        return x


def log_partition(
    h: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    logits: Tensor,
    classes: Tensor,
    lut_scores: Tensor,
    samples: int = REST_SAMPLES,
    comm=None,
    num_classes: Optional[int] = None,
) -> Tensor:
    """``log Z`` per row ``(B,)`` from the exact candidate ``logits`` / ``classes`` ``(B, C)`` and the
    float LUT scores ``(B, V)`` of every class (bias included; overwritten in place); see the module docstring.

    Candidates may repeat a class or hold ``-inf`` logits (masked duplicates); both are handled.
    ``samples = 0`` gives the uncorrected estimate ``logsumexp(candidates, LUT scores of the rest)``.

    ``comm`` (vocabulary split over ranks; default: one device): this call sees one slice,
    ``classes`` and ``lut_scores`` in slice-local ids, and ``comm`` provides ``max(x)`` (an
    all-reduce max of ``(B,)``), ``totals(x)`` (all-gather of ``(B, 2)`` int64, giving ``(P, B,
    2)``), ``rank`` and ``merge_samples(x)`` (an all-reduce max of ``(B, n)``); ``num_classes`` is
    the whole vocabulary's size (default ``lut_scores.shape[1]``; it sets the fixed point).
    """
    comm = _SingleDevice() if comm is None else comm
    num_classes = lut_scores.shape[1] if num_classes is None else num_classes
    bits = fixed_point_bits(2 * num_classes)  # V rest terms + at most V candidates
    rest = lut_scores.scatter_(1, classes, -math.inf)  # in place: the only (B, V) buffer
    rows, num = rest.shape
    none = rest.new_full((rows,), -math.inf)
    local_max = torch.maximum(rest.amax(1) if num else none, logits.float().amax(1) if logits.shape[1] else none)
    ref = comm.max(local_max.float())
    ref = torch.where(torch.isfinite(ref), ref, torch.zeros_like(ref))
    width = max(MIN_BLOCK, -(-num // CLASS_BLOCKS))
    blocks = range(0, num, width)
    rest_sum = torch.zeros(rows, dtype=torch.int64, device=rest.device)
    for a in blocks:
        rest_sum += _fixed(rest[:, a : a + width], ref, bits).sum(1)
    mine = torch.stack([_fixed(logits, ref, bits).sum(1), rest_sum], 1)  # (B, 2)
    every = comm.totals(mine)  # (P, B, 2): exact integers
    cand_total, rest_total = every.sum(0).unbind(1)
    scale = 2.0 ** -bits
    log_cand = torch.log(cand_total.double() * scale)
    log_rest = torch.log(rest_total.double() * scale)
    if samples > 0 and num > 0:
        prefix = every[: comm.rank, :, 1].sum(0)  # mass of the lower ranks' slices
        n2 = 2 * samples
        j = torch.arange(samples, device=rest.device, dtype=torch.int64) * 2 + 1  # (2j + 1)
        total = rest_total.unsqueeze(1)
        # t_j = floor((2j + 1) T / 2n) + 1 in [1, T], without int64 overflow
        target = total // n2 * j + (total % n2) * j // n2 + 1
        local = target - prefix.unsqueeze(1)
        owned = (local >= 1) & (local <= every[comm.rank, :, 1].unsqueeze(1))
        local = local.clamp(min=1).contiguous()
        # the first class whose cumulative mass reaches ``local``, block by block with a running carry
        pick = torch.full(local.shape, num - 1, dtype=torch.int64, device=rest.device)
        carry = torch.zeros(rows, 1, dtype=torch.int64, device=rest.device)
        for a in blocks:
            cum = _fixed(rest[:, a : a + width], ref, bits).cumsum_(1).add_(carry)
            inside = (local > carry) & (local <= cum[:, -1:])
            found = torch.searchsorted(cum, local).clamp_(max=cum.shape[1] - 1) + a
            pick = torch.where(inside, found, pick)
            carry = cum[:, -1:]
        ratio = torch.full(pick.shape, -math.inf, device=rest.device)
        r, c = owned.nonzero(as_tuple=True)
        pairs = min(MAX_PAIRS, max(MIN_PAIRS, num_classes // (4 * h.shape[1])))
        for a in range(0, r.numel(), pairs):
            rr, cc = r[a : a + pairs], c[a : a + pairs]
            cls = pick[rr, cc]
            ratio[rr, cc] = pointwise_logits(h[rr], weight, bias, cls) - rest[rr, cls]
        ratio = comm.merge_samples(ratio)
        correction = torch.logsumexp(ratio.double(), dim=1) - math.log(samples)
        has_rest = rest_total > 0
        log_rest = torch.where(has_rest, log_rest + correction, log_rest)
    return (ref.double() + torch.logaddexp(log_cand, log_rest)).float()


def pointwise_logits(h: Tensor, weight: Tensor, bias: Optional[Tensor], classes: Tensor) -> Tensor:
    """``<h_i, W[classes_i]> + bias`` for ``(N, d)`` rows and ``(N,)`` classes, with the re-score kernel
    (``torchaq::rescore_topk``: each value computed alone, the same bits in any batch)."""
    if h.shape[0] == 0:
        return h.new_zeros((0,), dtype=torch.float32)
    if h.device.type == "cpu":
        return torch.ops.torchaq.rescore_topk(h, weight, bias, classes.unsqueeze(1), 1)[0].squeeze(1)
    return row_logits(h, weight, bias, classes.unsqueeze(1)).squeeze(1)
