"""``torchaq.QuantizedSoftmax``: a drop-in output layer with fast approximate top-k inference."""
from __future__ import annotations

import math
import warnings
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torchaq import backends, ops
from torchaq.layer import incremental, side_list
from torchaq.checks import check_features, check_int, has_data
from torchaq.layer.candidates import default_candidates
from torchaq.layer.fast_topk import FastTopk
from torchaq.layer.partition import log_partition
from torchaq.layer.exact_sampling import sample_full
from torchaq.layer.logprobs import layer_token_logprobs
from torchaq.layer.sampling import check_sampling_args, draw_top_p
from torchaq.quantizers.aq import AnisotropicAQ
from torchaq.quantizers.pq import AnisotropicPQ
from torchaq.training.sampled_softmax import layer_sampled_softmax_loss

class QuantizedSoftmax(FastTopk):
    """An output layer ``logits = h @ W.T + b`` whose top-k search runs on quantized weights.

    ``layer(h)`` returns the exact logits of the ``nn.Linear`` it replaces (differentiable; use
    it for training). For inference, :meth:`topk`, :meth:`log_softmax_topk` and :meth:`sample`
    score all ``V`` classes from per-query lookup tables over 4- or 8-bit anisotropic PQ codes
    of ``W`` (:class:`torchaq.AnisotropicPQ`; the C++ SIMD scan on CPU, Triton on CUDA, the
    torch reference elsewhere), keep ``candidates`` classes, and re-score those exactly: the
    returned values are exact logits, and only the *membership* of the top-k is approximate.

    The layer keeps the float ``weight`` (and ``bias``) as parameters -- shared with the module
    it was built from, so a tied embedding stays tied -- and the quantizer's codebooks and the
    packed codes as buffers; ``state_dict`` round-trips. After an optimiser step moves the
    weights, :meth:`refresh` re-encodes the rows against the current codebooks
    (``refresh(refit=True)`` re-learns them).

    Rows the codes cannot represent (a huge norm, a residual far above the rest: special tokens)
    are kept in an exact side list, the ``side_rows`` buffer, chosen at fit and at every refresh
    by :func:`torchaq.layer.side_list.select_side_rows` (its docstring says how, and what it costs):
    they are scored exactly for every query and merged into the candidates of :meth:`topk`,
    :meth:`sample`, :meth:`log_softmax_topk` and the sampled softmax's hard set; the scan never
    ranks them. ``residual_norms`` (``|W_i - decode(code_i)|``) backs ``topk(..., guarantee="bound")``.

    Args:
        weight: ``(V, d)`` weight (an ``nn.Parameter`` is kept as is, e.g. a tied embedding).
        bias: optional ``(V,)`` bias.
        num_subspaces: ``M`` PQ subspaces (default ``d // 2``: 2 dimensions per 4-bit code).
        bits: 4 or 8 bits per code.
        threshold, eta: anisotropy of the quantizer (see :class:`torchaq.AnisotropicPQ`);
            default isotropic unless ``queries`` are given, which calibrate it.
        queries: optional ``(B, d)`` sample hidden states for calibration.
        candidates: default number of candidates re-scored exactly (default
            :func:`default_candidates`).
        fit: fit the quantizer now (``False`` to load a ``state_dict`` into the layer).
        fit_iters, seed, progress: passed to :meth:`torchaq.AnisotropicPQ.fit`.
        quantizer: ``"pq"`` (:class:`torchaq.AnisotropicPQ`, the default) or ``"aq"``
            (:class:`torchaq.AnisotropicAQ`: additive codes, ``num_subspaces`` codebooks of
            full-width codewords; higher recall at equal bits, a LUT costing ``d`` times more per
            codebook and a slower fit / refresh). ``"pq"`` stays the default: with the default
            ``d / 2`` codebooks AQ's LUT costs ``8 d^2`` multiply-adds per query and its fit
            ``O((M K)^3)`` per update; AQ pays off with far fewer codebooks, e.g. ``d / 4`` at
            half the bits (``benchmarks/aq_layer.py``, ``quality.py --aq``).
    """

    def __init__(
        self,
        weight: Tensor,
        bias: Optional[Tensor] = None,
        num_subspaces: Optional[int] = None,
        bits: int = 4,
        threshold: Optional[float] = None,
        eta: Optional[float] = None,
        queries: Optional[Tensor] = None,
        candidates: Optional[int] = None,
        fit: bool = True,
        fit_iters: int = 5,
        seed: int = 0,
        progress: bool = True,
        quantizer: str = "pq",
    ):
        super().__init__()
        if quantizer not in ("pq", "aq"):
            raise ValueError(f'quantizer must be "pq" or "aq", got {quantizer!r}')
        if not isinstance(weight, Tensor) or weight.dim() != 2 or not weight.is_floating_point():
            desc = f"{weight.dtype} {tuple(weight.shape)}" if isinstance(weight, Tensor) else type(weight).__name__
            raise ValueError(f"weight must be a floating-point (V, d) tensor, got {desc}")
        num_classes, dim = weight.shape
        if bias is not None:
            if not isinstance(bias, Tensor) or bias.shape != (num_classes,) or not bias.is_floating_point():
                desc = f"{bias.dtype} {tuple(bias.shape)}" if isinstance(bias, Tensor) else type(bias).__name__
                raise ValueError(f"bias must be a floating-point ({num_classes},) tensor, got {desc}")
            if has_data(bias) and not bool(torch.isfinite(bias).all()):
                raise ValueError("bias contains NaN or Inf")
        if candidates is not None:
            candidates = check_int(candidates, "candidates", low=1)
        if num_subspaces is not None:  # None: d // 2; 0 is an error, not the default
            num_subspaces = check_int(num_subspaces, "num_subspaces", 1, dim, f"in [1, d={dim}]")
        self.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight.detach().clone())
        if bias is None:
            self.register_parameter("bias", None)
        else:
            self.bias = bias if isinstance(bias, nn.Parameter) else nn.Parameter(bias.detach().clone())
        self.num_classes, self.dim = num_classes, dim
        self.candidates = candidates
        # topk's int8 shortlist stage: True (default size, default_shortlist), an int, or False (off)
        self.shortlist = True
        quantizer_cls = AnisotropicAQ if quantizer == "aq" else AnisotropicPQ
        self.quantizer = quantizer_cls(
            dim, max(1, dim // 2) if num_subspaces is None else num_subspaces, bits=bits, threshold=threshold, eta=eta, seed=seed
        ).to(weight.device)
        width = ops.packed_width(self.quantizer.num_subspaces, bits)
        self.register_buffer(
            "packed_codes",
            torch.zeros(((num_classes + ops.BLOCK - 1) // ops.BLOCK, width, ops.BLOCK), dtype=torch.uint8, device=weight.device),
        )
        self._init_side_rows()
        self.fit_iters, self.progress = fit_iters, progress
        # incremental refresh state: weight version and per-row fingerprints at the last encode
        self._refresh_version: Optional[int] = None
        self._fingerprint: Optional[Tensor] = None
        self._encode_key: Optional[tuple] = None
        self._stale_warned = False
        # a function of the class, not a lambda: the layer stays picklable (torch.save(model))
        self.register_load_state_dict_post_hook(QuantizedSoftmax._after_load)
        if fit:
            self.refresh(refit=True, queries=queries)

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kwargs) -> "QuantizedSoftmax":
        """Build from an ``nn.Linear(d, V)``, sharing its weight and bias parameters."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        return cls(linear.weight, linear.bias, **kwargs)

    # ---------------------------------------------------------------------------------------
    # keeping the index in step with the weights
    # ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def refresh(self, refit: bool = False, queries: Optional[Tensor] = None) -> "QuantizedSoftmax":
        """Re-encode the weight rows that changed since the last refresh; ``refit=True`` re-learns the codebooks.

        Only rows whose fingerprint (:mod:`torchaq.layer.incremental`: projections onto fixed random
        directions) changed are re-encoded, and only their residual norms recomputed (the side list
        is re-picked from cached per-row norms, ``O(V log V)``), so the cost grows with the rows a
        step moved, plus one ``O(V d)`` fingerprint pass (``benchmarks/refresh.py`` measures it); if
        ``weight._version`` did not move nothing is done at all. A full re-encode (first refresh,
        new codebooks, another device, or more than half the rows moved) is one anisotropic
        encoding pass over the ``V`` rows, ``O(V M K (dsub + rounds))``, plus one decode for the side list.
        Re-fitting runs :meth:`torchaq.AnisotropicPQ.fit` (k-means plus ``fit_iters`` alternations).
        """
        weight = self.weight.detach()
        if refit:
            if queries is not None:
                queries = self.flat_features(queries, "queries")
            keep = side_list.fit_rows_mask(weight)  # huge-norm rows do not shape the codebooks
            fit_rows = weight[keep] if int(keep.sum()) >= self.quantizer.num_codewords else weight
            self.quantizer.fit(fit_rows, queries=queries, iters=self.fit_iters, progress=self.progress)
        same_index = not refit and self._encode_key is not None and self._encode_key == self._encoding_key()
        if same_index and self._refresh_version is not None and self._weight_version() == self._refresh_version:
            return self
        fingerprint = incremental.row_fingerprint(weight, incremental.fingerprint_directions(self.dim, weight.device))
        rows = incremental.changed_rows(fingerprint, self._fingerprint) if same_index else None
        if rows is not None and rows.numel() > self.num_classes * incremental.FULL_PASS_SHARE:
            rows = None  # most rows moved (e.g. an AdamW step): the full pass is cheaper than row scatters
        if rows is None:
            codes = self.quantizer.encode(weight)
            self.packed_codes = self.quantizer.pack(codes)
            # refresh_side_rows() from the codes in hand
            self._row_norms, self.residual_norms, self.side_rows = incremental.all_side_rows(weight, self.quantizer, codes)
        else:
            codes = self.quantizer.encode(weight[rows]) if rows.numel() else None
            if codes is not None:
                incremental.write_packed_rows(self.packed_codes, rows, codes, self.quantizer.bits)
            # the side list, touching only these rows
            update = incremental.update_side_rows(weight, self.quantizer, rows, codes, self._row_norms, self.residual_norms)
            if update is None:
                self.refresh_side_rows()
            else:
                self._row_norms, self.residual_norms, self.side_rows = update
        self._fingerprint, self._encode_key = fingerprint, self._encoding_key()
        self._refresh_version = self._weight_version()
        return self

    def _encoding_key(self) -> tuple:
        """What the packed codes were encoded with: codebooks (storage, version), rule, code buffer."""
        cb = self.quantizer.codebooks
        return (cb.data_ptr(), cb._version, str(self.quantizer.rule), self.packed_codes.data_ptr())

    def _weight_version(self) -> Optional[int]:
        try:
            return self.weight._version
        except RuntimeError:  # inference tensors have no version counter
            return None

    def __setstate__(self, state) -> None:
        """After unpickling (``torch.save(model)`` / ``copy.deepcopy``): the codes match the weight."""
        super().__setstate__(state)
        self._mark_fresh()

    def _after_load(self, incompatible_keys) -> None:
        """``load_state_dict`` post-hook (registered on the class's function, so it pickles)."""
        self._mark_fresh()

    def _mark_fresh(self) -> None:
        """After ``load_state_dict``: the loaded codes match the loaded weight; next refresh is full."""
        self._refresh_version, self._fingerprint, self._encode_key = self._weight_version(), None, None

    def _warn_if_stale(self) -> None:
        """Warn once if the weight changed in place (optimiser step, tied embedding) since the last refresh."""
        if self._stale_warned or torch.compiler.is_compiling() or self._refresh_version is None:
            return
        version = self._weight_version()
        if version is not None and version != self._refresh_version:
            self._stale_warned = True
            warnings.warn(
                "QuantizedSoftmax: the weight changed since the last refresh(); the quantized index is stale, "
                "so top-k / sampling use outdated codes. Call layer.refresh() after updating the weight.",
                RuntimeWarning,
                stacklevel=4,
            )

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

    # ---------------------------------------------------------------------------------------
    # the layer
    # ---------------------------------------------------------------------------------------
    def forward(self, h: Tensor) -> Tensor:
        """Exact logits ``h @ W.T + b``, exactly as the ``nn.Linear`` this layer replaces."""
        return F.linear(h, self.weight, self.bias)

    def candidate_logits(
        self, h: Tensor, candidates: Optional[int] = None, k: int = 1, keep: Optional[int] = None
    ) -> Tuple[Tensor, Tensor, Tensor]:
        """LUT scan for the best classes of each row of ``h``, then their exact logits.

        Returns ``(logits, classes, lut)``: float32 and int64 ``(B, keep)`` for the flattened
        ``h``, the best ``keep`` (default: all ``C``) of the ``C`` candidates by exact logit, best
        first, and the ``(B, M, K)`` lookup tables. ``C`` is ``candidates``, else the layer's
        ``candidates``, else :func:`default_candidates`. The re-score is
        :func:`torchaq.ops.rescore_topk` (``B * C * d`` multiply-adds, one read per candidate row).
        """
        self._warn_if_stale()
        # the C++ scan refuses a non-finite LUT in the same pass that quantizes it, which covers a
        # non-finite h for free (no separate pass over h, which costs as much as the re-score at batch 1)
        scan_checks = h.device.type == "cpu" and backends.CPU_EXTENSION_LOADED
        flat = self.flat_features(h, finite=not scan_checks)
        if candidates is None:
            candidates = self.candidates or default_candidates(k, self.num_classes)
            candidates = min(candidates, self.num_classes)
        candidates = self._check_k(candidates, "candidates")
        if candidates < k:
            raise ValueError(f"candidates={candidates} must be >= k={k}")
        self.quantizer.check_fitted()
        # quantizer.lut(flat) without its re-checks (per-call overhead counts at batch 1)
        lut = self.quantizer.lut_unchecked(flat)
        # the scan ranks the coded rows; the side list is appended to every row's candidates
        scan_k = min(candidates, self.num_classes - self.side_rows.numel())
        try:
            _, classes = torch.ops.torchaq.lut_topk.default(lut, self.packed_codes, self.num_classes, scan_k,
                                                            self.scan_bias())
        except ValueError as err:
            if scan_checks and "finite lut" in str(err):
                raise ValueError("h contains NaN or Inf (or values so large that its lookup table overflows)") from err
            raise
        classes = self._with_side_rows(classes)
        bias = None if self.bias is None else self.bias.detach()
        keep = candidates if keep is None else keep
        logits, classes = torch.ops.torchaq.rescore_topk.default(flat, self.weight.detach(), bias, classes, keep)
        return logits, classes, lut

    @torch.no_grad()
    def scan(self, h: Tensor, k: int) -> Tuple[Tensor, Tensor]:
        """The LUT scan alone: approximate scores and classes ``(B, k')`` of the best coded rows for
        ``(B, d)`` rows ``h``, best first, with ``k' = min(k, V - len(side_rows))``. Rows of the
        exact side list (:attr:`side_rows`) are never returned: callers score them exactly
        (the sampled softmax adds them to every hard set). Cost: one LUT and one scan of ``V`` codes."""
        flat = self.flat_features(h)
        lut = self.quantizer.lut(flat)
        k = min(self._check_k(k), self.num_classes - self.side_rows.numel())
        return ops.lut_topk(lut, self.packed_codes, self.num_classes, k, self.scan_bias())

    def _bound_complete(self, h: Tensor, logits: Tensor, classes: Tensor, lut: Tensor, k: int):
        """``guarantee="bound"``: add every row the residual bound cannot rule out (also returns the counts)."""
        scores = ops.lut_score(lut, self.packed_codes, self.num_classes, self.float_bias())
        bias = None if self.bias is None else self.bias.detach()
        return side_list.bound_complete(
            self.flat_features(h), self.weight.detach(), bias, scores, self.residual_norms, logits, classes, k
        )

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
        self._scan_bias_cache: Tuple = (None, None)
        self._row_norms: Optional[Tensor] = None  # |W_i| at the last refresh (incremental refreshes reuse them)

    @torch.no_grad()
    def refresh_side_rows(self, queries: Optional[Tensor] = None) -> Tensor:
        """Re-choose the exact side list and the residual norms from the current weight and codes.

        :meth:`refresh` calls it (without queries, so that every refresh applies the same rule);
        optional ``queries`` add the observed-error statistic of
        :func:`torchaq.layer.side_list.select_side_rows`. Returns ``side_rows``.
        """
        codes = ops.unpack_codes(self.packed_codes, self.quantizer.num_subspaces, self.quantizer.bits, self.num_classes)
        if queries is None:  # the rule reads the row and residual norms alone (also what refresh keeps)
            self._row_norms, self.residual_norms, self.side_rows = incremental.all_side_rows(
                self.weight, self.quantizer, codes)
            return self.side_rows
        weight = self.weight.detach()
        recon = self.quantizer.decode(codes, dtype=torch.float32).to(weight.device)
        queries = self.flat_features(queries, "queries")
        self.residual_norms = side_list.residual_norms(weight, recon)
        self._row_norms = weight.float().norm(dim=1)  # kept for incremental refreshes
        self.side_rows = side_list.select_side_rows(weight, recon, queries)
        return self.side_rows

    def scan_bias(self) -> Optional[Tensor]:
        """The bias the LUT scan ranks with: the layer's (float32), side rows pushed to the bottom
        (:func:`torchaq.layer.side_list.scan_bias`; cached per side list and bias version)."""
        if self.side_rows.numel() == 0:
            return self.float_bias()
        if torch.compiler.is_compiling():
            return side_list.scan_bias(self.bias, self.side_rows, self.num_classes, self.weight.device)
        key = (self.side_rows.data_ptr(), self.side_rows._version, self.side_rows.device)
        if self.bias is not None:
            key += (self.bias.data_ptr(), self.bias._version)
        if self._scan_bias_cache[0] != key:
            self._scan_bias_cache = (key, side_list.scan_bias(self.bias, self.side_rows, self.num_classes, self.weight.device))
        return self._scan_bias_cache[1]

    def _with_side_rows(self, classes: Tensor) -> Tensor:
        """``(B, C)`` scan candidates -> ``(B, C + S)`` with the side rows appended (the scan never returns them)."""
        if self.side_rows.numel() == 0:
            return classes
        return torch.cat([classes, self.side_rows.to(classes.device).expand(classes.shape[0], -1)], dim=1)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        # the side list's length varies: take the stored one's shape (older checkpoints have none)
        key = prefix + "side_rows"
        if key in state_dict:
            self.side_rows = torch.zeros_like(state_dict[key], device=self.weight.device)
        else:
            state_dict[key] = self.side_rows
        state_dict.setdefault(prefix + "residual_norms", torch.full((self.num_classes,), math.inf))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def topk(
        self, h: Tensor, k: int = 10, candidates: Optional[int] = None, guarantee: Optional[str] = None
    ) -> Tuple[Tensor, Tensor]:
        """Approximate top-``k`` classes with their exact logits: ``(values, indices)`` of shape ``(..., k)``.

        LUT scores over all classes -> the ``candidates`` best (default
        :func:`default_candidates`) plus the exact side list -> exact logits of those rows (bias
        included) -> top-``k``. ``guarantee="bound"`` makes the top-``k`` provably exact: every
        other row whose Cauchy-Schwarz bound ``s_i + |h| |W_i - decode(code_i)|`` reaches the
        ``k``-th exact logit found is re-scored too (:func:`torchaq.layer.side_list.bound_complete`;
        costs a float LUT score pass over all ``V`` classes on top).

        Candidates are ranked by an int8 copy of their weight rows first and only the best
        ``shortlist`` of them (attribute; ``True``: :func:`default_shortlist`, ``False``: all) are
        re-scored exactly (:mod:`torchaq.ops.layer_topk`); values stay exact logits.
        """
        if torch.is_grad_enabled():  # no autograd here (a no_grad decorator costs more at batch 1)
            with torch.no_grad():
                return self.topk(h, k, candidates, guarantee)
        if type(k) is not int or not 0 < k <= self.num_classes:
            k = self._check_k(k)
        if guarantee not in (None, "bound"):
            raise ValueError(f'guarantee must be None or "bound", got {guarantee!r}')
        if guarantee is None:
            logits, classes = self._topk_one_op(h, candidates, k)
        else:
            logits, classes, lut = self.candidate_logits(h, candidates, k)
            logits, classes, _ = self._bound_complete(h, logits, classes, lut, k)
            logits, classes = logits[:, :k], classes[:, :k]
        if h.dim() == 2:
            return logits, classes
        lead = h.shape[:-1]
        return logits.reshape(lead + (k,)), classes.reshape(lead + (k,))

    @torch.no_grad()
    def log_softmax_topk(self, h: Tensor, k: int = 10, candidates: Optional[int] = None) -> Tuple[Tensor, Tensor]:
        """Log-probabilities of the approximate top-``k`` classes: ``(logp, indices)`` of shape ``(..., k)``.

        ``log p_c = logit_c - log Z`` with the log-partition ``log Z`` from the exact logits of the
        candidates (side list included) plus the LUT mass of all other classes, corrected by an
        importance sample of exactly scored classes of that rest (:func:`torchaq.layer.partition.log_partition`:
        the plain LUT mass of the rest is biased low when it holds much of the mass, i.e. flat
        softmaxes). ``benchmarks/side_list.py`` measures the error on flat and peaked softmaxes.
        Costs a full ``(B, V)`` LUT score pass and ``B * 256 * d`` exact multiply-adds on top of :meth:`topk`.
        """
        k = self._check_k(k)
        logits, classes, lut = self.candidate_logits(h, candidates, k)
        approx = ops.lut_score(lut, self.packed_codes, self.num_classes, self.float_bias())
        bias = None if self.bias is None else self.bias.detach()
        log_z = log_partition(self.flat_features(h), self.weight.detach(), bias, logits, classes, approx)
        logp = logits[:, :k] - log_z.unsqueeze(1)
        lead = h.shape[:-1]
        return logp.reshape(lead + (k,)), classes[:, :k].reshape(lead + (k,))

    @torch.no_grad()
    def sample(self, h: Tensor, top_k: Optional[int] = None, top_p: Optional[float] = 1.0, min_p: Optional[float] = None,
               temperature: float = 1.0, generator: Optional[torch.Generator] = None, seeds: Optional[Tensor] = None,
               return_logprobs: bool = False, candidates: Optional[int] = None, method: str = "full"):
        """One class per row of ``h`` drawn from the full-vocabulary softmax: int64 ``(...)``.

        ``method="full"`` (default) draws from ``softmax(logits / temperature)`` over all ``V``
        classes, after the truncations asked for (Hugging Face's order): ``top_k`` (None or 0: off)
        exact over all ``V``, ``top_p``'s nucleus against the full partition function, ``min_p``
        relative to the exact top-1 (:mod:`torchaq.layer.exact_sampling` says how, which
        guarantees hold, and what it costs). ``seeds`` (int64, one per row) makes a row's draw the
        same alone or in any batch; ``generator`` draws those seeds. ``return_logprobs=True``
        returns a :class:`~torchaq.layer.exact_sampling.SampleOutput` ``(tokens, logprobs,
        truncated_logprobs)``: the tokens' exact log-probabilities under the full softmax and the
        truncated one (one exact pass over ``W`` per row).

        ``method="candidates"`` is the earlier sampler, kept for comparison: top-k (default 50) and
        top-p among the ``candidates`` re-scored classes only (the mass outside them is never drawn).
        """
        if method == "full":
            self._warn_if_stale()
            return sample_full(self, h, top_k, top_p, min_p, temperature, generator, seeds, return_logprobs, candidates)
        if method != "candidates":
            raise ValueError(f'method must be "full" or "candidates", got {method!r}')
        if min_p is not None or seeds is not None or return_logprobs:
            raise ValueError('min_p, seeds and return_logprobs need method="full"')
        top_k = self._check_k(50 if top_k is None else top_k, "top_k")
        top_p, temperature = check_sampling_args(None if top_p == 1.0 else top_p, temperature)
        logits, classes, _ = self.candidate_logits(h, candidates, top_k)
        choice = draw_top_p(logits[:, :top_k], top_p, temperature, generator)
        return classes.gather(1, choice).reshape(h.shape[:-1])

    @torch.no_grad()
    def token_logprobs(self, h: Tensor, tokens: Tensor, temperature: float = 1.0) -> Tensor:
        """Exact ``log softmax(h @ W.T + b)[tokens]`` (at ``temperature``) without a ``(B, V)`` matrix.

        ``tokens``: int64 ``h.shape[:-1]`` (one per row; result shaped like it) or ``h.shape[:-1] + (n,)``.
        Exact and batch-invariant (:mod:`torchaq.layer.logprobs`); costs one pass over ``W`` per row.
        """
        return layer_token_logprobs(self, h, tokens, temperature)

    sampled_softmax_loss = layer_sampled_softmax_loss

    def extra_repr(self) -> str:
        q = self.quantizer
        return (
            f"V={self.num_classes}, d={self.dim}, bits={q.bits}, subspaces={q.num_subspaces}, "
            f"rule={q.rule}, bias={self.bias is not None}"
        )
