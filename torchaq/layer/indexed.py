"""The index half of :class:`torchaq.QuantizedSoftmax`: building it, keeping it fresh, saving and loading it.

:class:`IndexedLayer` holds everything that ties the packed codes, the exact side list and the
residual norms to the weight: :meth:`~IndexedLayer.refresh` (incremental re-encoding,
:mod:`torchaq.layer.incremental`), the stale-index warning (:mod:`torchaq.layer.staleness`),
the side list (:mod:`torchaq.layer.side_list`) and ``state_dict`` loading with its checks
(:mod:`torchaq.layer.state`). :class:`torchaq.QuantizedSoftmax` adds the scoring on top.
"""
from __future__ import annotations

import math
import warnings
from typing import Optional, Tuple

import torch
from torch import Tensor

from torchaq import ops
from torchaq.checks import check_features, check_int, has_data
from torchaq.layer import construction, error_model, incremental, probe, side_list, staleness, state
from torchaq.layer.fast_topk import FastTopk


class IndexedLayer(FastTopk):
    """Base of :class:`torchaq.QuantizedSoftmax` that keeps its index in step with its weight (module docstring)."""

    # ---------------------------------------------------------------------------------------
    # keeping the index in step with the weights
    # ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def refresh(self, refit: bool = False, queries: Optional[Tensor] = None) -> "IndexedLayer":
        """Re-encode the weight rows that changed since the last refresh; ``refit=True`` re-learns the codebooks.

        Only rows whose fingerprint (:mod:`torchaq.layer.incremental`: projections onto fixed random
        directions) changed are re-encoded, and only their residual norms recomputed (the side list
        is re-picked from cached per-row norms, ``O(V log V)``), so the cost grows with the rows a
        step moved, plus one ``O(V d)`` fingerprint pass (``benchmarks/refresh.py`` measures it). The
        fingerprint pass runs every time: writes through ``weight.data`` move neither the version
        counter nor (with ``copy_``) the storage, and only the rows' values show them. A full
        re-encode (first refresh, new codebooks, another device, or more than half the rows moved)
        is one anisotropic encoding pass over the ``V`` rows, ``O(V M K (dsub + rounds))``, plus one
        decode for the side list. Re-fitting runs :meth:`torchaq.AnisotropicPQ.fit` (k-means plus
        ``fit_iters`` alternations). An exactly scored table (:attr:`exact_reason`) has no index:
        refresh only re-arms the staleness check. Every refresh drops the cached int8 shortlist rows.
        """
        weight = self.weight.detach()
        if self.exact_reason is not None:
            self._mark_fresh()
            return self
        if refit:
            construction.check_weight_rows(self.weight, self.bias)
            if queries is not None:
                queries = self.flat_features(queries, "queries")
            keep = side_list.fit_rows_mask(weight)  # huge-norm rows do not shape the codebooks
            fit_rows = weight[keep] if int(keep.sum()) >= self.quantizer.num_codewords else weight
            self.quantizer.fit(fit_rows, queries=queries, iters=self.fit_iters, progress=self.progress)
        same_index = not refit and self._encode_key is not None and self._encode_key == self._encoding_key()
        fingerprint = incremental.row_fingerprint(weight, incremental.fingerprint_directions(self.dim, weight.device))
        rows = incremental.changed_rows(fingerprint, self._fingerprint) if same_index else None
        if rows is not None and rows.numel() > self.num_classes * incremental.FULL_PASS_SHARE:
            rows = None  # most rows moved (e.g. an AdamW step): the full pass is cheaper than row scatters
        if rows is None:
            construction.check_weight_rows(self.weight)
            codes = self.quantizer.encode(weight)
            self.packed_codes = self.quantizer.pack(codes)
            # refresh_side_rows() from the codes in hand
            self._set_row_stats(*incremental.all_side_rows(weight, self.quantizer, codes))
        elif rows.numel():
            construction.check_weight_rows(weight[rows])
            codes = self.quantizer.encode(weight[rows])
            incremental.write_packed_rows(self.packed_codes, rows, codes, self.quantizer.bits)
            # the side list, touching only these rows
            cached = None if self._row_norms is None else incremental.RowStats(
                self._row_norms, self.residual_norms, self.error_scales, self.side_rows)
            update = incremental.update_side_rows(weight, self.quantizer, rows, codes, cached, self._error_model)
            if update is None:
                self.refresh_side_rows()
            else:
                self._set_row_stats(update, self._error_model)
        self._mark_fresh()
        self._fingerprint, self._encode_key = fingerprint, self._encoding_key()
        if refit:
            probe.warn_if_poor(self, queries)
        return self

    def _encoding_key(self) -> tuple:
        """What the packed codes were encoded with: codebooks (storage, version), rule, code buffer."""
        cb = self.quantizer.codebooks
        return (cb.data_ptr(), staleness.version_of(cb), str(self.quantizer.rule), self.packed_codes.data_ptr())

    def _apply(self, fn, recurse=True):
        # .to(dtype / device) moves the weight to new storage: the same index, not a stale one
        out = super()._apply(fn, recurse)
        if "_snapshot" in self.__dict__ and self._snapshot is not None:
            self._mark_fresh()
        return out

    def __setstate__(self, state) -> None:
        """After unpickling (``torch.save(model)`` / ``copy.deepcopy``): the codes match the weight."""
        super().__setstate__(state)
        self._mark_fresh(full=True)

    def _after_load(self, incompatible_keys) -> None:
        """``load_state_dict`` post-hook (registered on the class's function, so it pickles)."""
        self._mark_fresh(full=True)
        if self.__dict__.pop("_legacy_state", False) and self.exact_reason is None and self.quantizer.fitted \
                and has_data(self.weight):
            # a checkpoint from before error_scales: derive them from its weight and codes (O(V d k)),
            # keeping its side list (which may have been chosen with queries)
            codes = ops.unpack_codes(self.packed_codes, self.quantizer.num_subspaces, self.quantizer.bits,
                                     self.num_classes)
            stats, model = incremental.all_side_rows(self.weight, self.quantizer, codes)
            self._set_row_stats(incremental.RowStats(*stats[:3], self.side_rows), model)

    def _mark_fresh(self, full: bool = False) -> None:
        """The index matches the weight now: snapshot it, re-arm the stale warning, drop cached
        int8 rows; ``full=True`` (after a load) makes the next refresh a full re-encode."""
        self._snapshot, self._stale_warned = staleness.snapshot(self.weight), False
        if full:
            self._fingerprint, self._encode_key = None, None
        self.drop_caches()

    def warn_if_stale(self) -> None:
        """Warn if the weight changed (in place, through ``.data``, or replaced) since the last
        refresh; once between refreshes -- every refresh re-arms it, and each warning is numbered so
        Python's once-per-message filter shows the next one. Under ``torch.compile`` a stale index
        raises instead (:func:`torchaq.layer.staleness.assert_fresh_in_graph`: a warning cannot run
        inside a graph without a break)."""
        if torch.compiler.is_compiling():
            staleness.assert_fresh_in_graph(self.weight, self._snapshot)
            return
        if self._stale_warned or self._snapshot is None:
            return
        cause = staleness.changed(self.weight, self._snapshot)
        if cause is not None:
            self._stale_warned, self._stale_count = True, self._stale_count + 1
            warnings.warn(staleness.message(cause, self._stale_count), RuntimeWarning, stacklevel=4)

    # ---------------------------------------------------------------------------------------
    # argument checks
    # ---------------------------------------------------------------------------------------
    def flat_features(self, h: Tensor, name: str = "h", finite: bool = True) -> Tensor:
        """``h`` ``(..., d)`` checked (floating point, last dim ``d``, on the layer's device, finite
        unless ``finite=False``; errors name ``name``) and flattened to ``(B, d)``."""
        check_features(h, self.dim, name, self.weight.device, "layer")
        if finite and h.numel() and has_data(h) and not bool(torch.isfinite(h).all()):
            raise ValueError(f"{name} contains NaN or Inf")
        return h if h.dim() == 2 else h.reshape(-1, self.dim)

    def _check_k(self, k: int, name: str = "k") -> int:
        return check_int(k, name, 1, self.num_classes, f"in [1, V={self.num_classes}]")

    def float_bias(self) -> Optional[Tensor]:
        """The bias as a detached float32 tensor (None without bias): what the LUT scan adds."""
        return None if self.bias is None else self.bias.detach().float()

    # ---------------------------------------------------------------------------------------
    # the exact side list (torchaq.layer.side_list)
    # ---------------------------------------------------------------------------------------
    def _init_side_rows(self) -> None:
        device = self.weight.device
        self.register_buffer("side_rows", torch.zeros(0, dtype=torch.int64, device=device))
        self.register_buffer("residual_norms", torch.full((self.num_classes,), math.inf, device=device))
        # the sampler's per-class LUT error scale (torchaq.layer.error_model); inf until the first refresh
        self.register_buffer("error_scales", torch.full((self.num_classes,), math.inf, device=device))
        self._scan_bias_cache: Tuple = (None, None)
        self._row_norms: Optional[Tensor] = None  # |W_i| at the last refresh (incremental refreshes reuse them)
        self._error_model: Optional[error_model.ErrorModel] = None  # fitted at the last full re-encode

    def _set_row_stats(self, stats: incremental.RowStats, model: error_model.ErrorModel) -> None:
        self._row_norms, self.residual_norms, self.error_scales, self.side_rows = stats
        self._error_model = model

    @torch.no_grad()
    def refresh_side_rows(self, queries: Optional[Tensor] = None) -> Tensor:
        """Re-choose the exact side list and the residual norms from the current weight and codes.

        :meth:`refresh` calls it (without queries, so that every refresh applies the same rule);
        optional ``queries`` add the observed-error statistic of
        :func:`torchaq.layer.side_list.select_side_rows`. Returns ``side_rows``.
        """
        queries = None if queries is None else self.flat_features(queries, "queries")
        codes = ops.unpack_codes(self.packed_codes, self.quantizer.num_subspaces, self.quantizer.bits, self.num_classes)
        self._set_row_stats(*incremental.all_side_rows(self.weight, self.quantizer, codes, queries))
        return self.side_rows

    def scan_bias(self) -> Optional[Tensor]:
        """The bias the LUT scan ranks with: the layer's (float32), side rows pushed to the bottom
        (:func:`torchaq.layer.side_list.scan_bias`; cached per side list and bias version)."""
        side, bias = self.side_rows, self.bias  # (module attribute look-ups cost at batch 1)
        if side.numel() == 0:
            return self.float_bias()
        if torch.compiler.is_compiling():
            return side_list.scan_bias(bias, side, self.num_classes, self.weight.device)
        key = (side.data_ptr(), side._version, side.device)
        if bias is not None:
            key += (bias.data_ptr(), bias._version)
        if self._scan_bias_cache[0] != key:
            self._scan_bias_cache = (key, side_list.scan_bias(self.bias, self.side_rows, self.num_classes, self.weight.device))
        return self._scan_bias_cache[1]

    def _with_side_rows(self, classes: Tensor) -> Tensor:
        """``(B, C)`` scan candidates -> ``(B, C + S)`` with the side rows appended (the scan never returns them)."""
        if self.side_rows.numel() == 0:
            return classes
        return torch.cat([classes, self.side_rows.to(classes.device).expand(classes.shape[0], -1)], dim=1)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        # refuse bad tensors naming the key; the side list's length varies: take the stored one's shape
        self._legacy_state = prefix + "packed_codes" in state_dict and prefix + "error_scales" not in state_dict
        state.adapt(state_dict, prefix, self.num_classes, self.side_rows)
        before = len(error_msgs)
        state.check(state_dict, prefix, self.num_classes, error_msgs)
        if len(error_msgs) > before:
            return
        self.side_rows = torch.zeros_like(state_dict[prefix + "side_rows"], device=self.weight.device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
