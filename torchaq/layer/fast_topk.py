"""The one-op fast paths of :meth:`torchaq.QuantizedSoftmax.topk` and ``sample`` and the cache of what they read.

At batch 1 the Python around the scan (module attribute look-ups, several op dispatches) costs
as much as a third of a ``topk`` call and more than half of a ``sample`` call, so :class:`FastTopk`
gathers the tensors ``torchaq::layer_topk`` and ``torchaq::layer_sample`` read once and keeps them
until the layer changes: any attribute assignment, ``.to()`` / ``_apply``, a parameter whose
``.data`` was swapped (checked by pointer), new codebooks.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from torchaq.checks import check_features
from torchaq.layer.candidates import default_candidates, default_shortlist
from torchaq.layer.staleness import version_of
from torchaq.ops.layer_topk import quantize_rows_int8
from torchaq.quantizers.pq import AnisotropicPQ


class FastTopk(nn.Module):
    """Base of :class:`torchaq.QuantizedSoftmax` holding its ``layer_topk`` fast path (module docstring)."""

    def _topk_one_op(self, h: Tensor, candidates: Optional[int], k: int) -> Tuple[Tensor, Tensor]:
        """``candidate_logits(h, candidates, k, keep=k)[:2]`` as one ``torchaq::layer_topk`` call
        (:mod:`torchaq.ops.layer_topk`), for PQ layers: at batch 1 the Python around the scan (module
        attribute look-ups, several op dispatches) otherwise costs a third of the call, so the tensors
        the op reads are gathered once (:meth:`_one_op_state`). When the layer has no bias and the coded
        rows cannot run out (``C + S < V``), the scan runs without the side-row exclusion bias: a side
        row it returns is a repeat the re-score counts once (a biased scan costs more than the slot)."""
        st = None if torch.compiler.is_compiling() else self._one_op_state()
        if st is None:
            if not isinstance(self.quantizer, AnisotropicPQ):
                with torch.no_grad():
                    return self.candidate_logits(h, candidates, k, keep=k)[:2]
            # traced (torch.compile) or AQ-free fallback: no cached pointers, no int8 shortlist
            st = self._one_op_tensors() + (None, None, (None, None), None)
        weight, bias = self._detached(st)
        codebooks, packed, side, pad, num_classes = st[2:7]
        if not self._stale_warned or st[7] is None:
            self.warn_if_stale()
        if not isinstance(h, Tensor) or h.dim() != 2 or h.device != weight.device:
            h = self.flat_features(h, finite=False)  # the op refuses a non-finite h
        elif h.shape[1] != self.dim or not h.is_floating_point():
            check_features(h, self.dim, "h", weight.device, "layer")
        if candidates is None:  # >= k (k <= V was checked)
            candidates = min(self.candidates or default_candidates(k, num_classes), num_classes)
        else:
            candidates = self._check_k(candidates, "candidates")
        if candidates < k:
            raise ValueError(f"candidates={candidates} must be >= k={k}")
        scan_k = min(candidates, num_classes - side.shape[0])
        # the scan ranks with the layer's bias; the side rows' exclusion only where it matters
        exclude = side.shape[0] > 0 and scan_k + side.shape[0] >= num_classes
        scan_bias = self.scan_bias() if bias is not None or exclude else None
        queries = self._queries(h, pad)
        w8, scale = (st[9] if st[8] == st[10] else self._shortlist_rows(weight)) if self.shortlist else (None, None)
        return torch.ops.torchaq.layer_topk.default(
            h, queries, codebooks, packed, num_classes, scan_k, scan_bias, weight, bias, side, w8, scale,
            default_shortlist(k) if self.shortlist is True else int(self.shortlist), k)

    def one_op_sample(self, h: Tensor, seeds: Tensor, head: int, sigmas: float, rounding: float, temperature: float,
                      weight_range: float, block: int, proposals: int, rounds: int) -> Tuple[Tensor, Tensor, Tensor]:
        """The untruncated full-vocabulary draw of ``(B, d)`` rows ``h`` of a PQ layer as one
        ``torchaq::layer_sample`` call (:mod:`torchaq.ops.layer_sample`: its arguments, and the
        ``(tokens, logits, done)`` it returns). :mod:`torchaq.layer.exact_sampling` calls it; the
        parameters go in detached, so it needs no ``no_grad``."""
        st = None if torch.compiler.is_compiling() else self._one_op_state()
        if st is None:  # traced (torch.compile): no cached pointers
            st = self._one_op_tensors()
        weight, bias = self._detached(st)
        norms = st[11][2] if len(st) > 11 else self.error_scales
        codebooks, packed, side, pad, num_classes = st[2:7]
        queries = self._queries(h, pad)
        return torch.ops.torchaq.layer_sample.default(
            h, queries, codebooks, packed, num_classes, self.scan_bias(), weight, bias, side, norms, seeds,
            head, sigmas, rounding, temperature, weight_range, block, proposals, rounds)

    @staticmethod
    def _detached(st: tuple) -> Tuple[Tensor, Optional[Tensor]]:
        """The detached weight and bias of the op inputs ``st``: the ops get no autograd history and need
        no ``no_grad`` context. From the cache (:meth:`_one_op_state`: the weight's pointer is checked
        there, the bias's here), else (traced) detached now."""
        if len(st) <= 11:
            return st[0].detach(), None if st[1] is None else st[1].detach()
        weight, bias = st[11][:2]
        if bias is not None and bias.data_ptr() != st[1].data_ptr():
            bias = st[1].detach()
        return weight, bias

    def _queries(self, h: Tensor, pad: bool) -> Tensor:
        """``h`` as the ops' float32 queries, zero-padded to the quantizer's ``M * dsub`` where ``pad``."""
        return self.quantizer.pad(h) if pad else h if h.dtype == torch.float32 else h.float()

    def one_op_memo(self) -> Optional[dict]:
        """A dict for values derived from the layer's op inputs (the sampler's head width and bound
        factors), kept and dropped with the cached inputs (:meth:`_one_op_state`); None where there is
        no cache (AQ layers, ``torch.compile`` tracing)."""
        st = None if torch.compiler.is_compiling() else self._one_op_state()
        return None if st is None else st[12]

    def shortlist_rows(self) -> Tuple[Optional[Tensor], Optional[Tensor]]:
        """The int8 rows and per-row scales :meth:`topk` ranks its candidates with, or ``(None, None)``
        when it re-scores every candidate (shortlist off, a weight not float32 on CPU). The public seam
        for :mod:`torchaq.distributed`, which reproduces :meth:`topk` over a split vocabulary."""
        return self._shortlist_rows(self.weight) if self.shortlist else (None, None)

    def shortlist_size(self, k: int) -> int:
        """How many candidates :meth:`topk` re-scores exactly after the int8 ranking: ``max(shortlist, k)``."""
        return max(default_shortlist(k) if self.shortlist is True else int(self.shortlist), k)

    def _shortlist_rows(self, weight: Tensor) -> Tuple[Optional[Tensor], Optional[Tensor]]:
        """The int8 copy of the weight rows (:func:`torchaq.ops.layer_topk.quantize_rows_int8`) that ranks
        the candidates before the exact re-score, cached per weight version (float32 weights only)."""
        if weight.dtype != torch.float32 or weight.device.type != "cpu":
            return None, None
        try:
            version = weight._version
        except RuntimeError:  # inference tensors have no version counter (and cannot change)
            version = None
        key = (weight.data_ptr(), version)
        cached = self.__dict__.get("_shortlist_cache")
        if cached is None or cached[0] != key:
            cached = (key,) + quantize_rows_int8(weight)
            self.__dict__["_shortlist_cache"] = cached
        return cached[1], cached[2]

    def _one_op_tensors(self) -> tuple:
        """What ``layer_topk`` reads: weight, bias, codebooks, packed codes, side list, whether ``h``
        needs padding, ``V`` (parameters as they are: ``topk`` runs under ``no_grad``)."""
        self.ensure_fitted()
        q = self.quantizer
        return (self.weight, self.bias, q.codebooks, self.packed_codes, self.side_rows, q.padded_dim != q.dim,
                self.num_classes)

    def _one_op_state(self) -> Optional[tuple]:
        """:meth:`_one_op_tensors`, cached (None for AQ layers). Any attribute assignment on the layer
        (``refresh``, ``load_state_dict``, a new parameter) and ``.to()`` / ``_apply`` drop the cache;
        so does a parameter whose ``.data`` was swapped (checked by pointer)."""
        st = self.__dict__.get("_one_op_cache")
        weight = self._parameters["weight"]
        if st is not None and st[0] is weight and weight.data_ptr() == st[7] and (
                st[2] is self._modules["quantizer"]._buffers.get("codebooks")):
            try:
                version = weight._version
            except RuntimeError:  # inference tensors have no version counter
                version = None
            if version != st[8]:  # the weight changed in place: the int8 rows may need an update
                st = st[:8] + (version,) + st[9:]
                self.__dict__["_one_op_cache"] = st
            return st
        if not isinstance(self.quantizer, AnisotropicPQ):
            return None
        st = self._one_op_tensors()
        version = version_of(st[0])
        w8 = self._shortlist_rows(st[0]) if self.shortlist else (None, None)
        bias = None if st[1] is None else st[1].detach()
        # (..., data pointer, weight version now, int8 rows and scales, weight version of the int8 rows,
        # detached weight / bias / error scales, the memo of one_op_memo)
        st = st + (st[0].data_ptr(), version, w8, version, (st[0].detach(), bias, self.error_scales), {})
        self.__dict__["_one_op_cache"] = st
        return st

    def drop_caches(self) -> None:
        """Forget the cached op inputs and int8 shortlist rows (``refresh`` and loads call it: a
        write through ``weight.data`` moves neither the pointer nor the version they are keyed on)."""
        self.__dict__["_one_op_cache"] = None
        self.__dict__["_shortlist_cache"] = None

    def __setattr__(self, name, value):
        self.__dict__["_one_op_cache"] = None
        super().__setattr__(name, value)

    def _apply(self, fn, recurse=True):
        self.__dict__["_one_op_cache"] = None
        return super()._apply(fn, recurse)
