"""``torchaq.QuantizedSoftmax``: a drop-in output layer with fast approximate top-k inference."""
from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torchaq import backends, ops
from torchaq.layer import construction, exact, side_list
from torchaq.checks import check_int
from torchaq.layer.candidates import default_candidates
from torchaq.layer.indexed import IndexedLayer
from torchaq.layer.partition import log_partition
from torchaq.layer.exact_sampling import sample_full
from torchaq.layer.logprobs import layer_token_logprobs
from torchaq.layer.sampling import check_sampling_args, draw_top_p
from torchaq.quantizers.aq import AnisotropicAQ
from torchaq.quantizers.pq import AnisotropicPQ
from torchaq.training.sampled_softmax import layer_sampled_softmax_loss

class QuantizedSoftmax(IndexedLayer):
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
    ranks them. ``residual_norms`` (``|W_i - decode(code_i)|``) backs ``topk(..., guarantee="bound")``,
    ``error_scales`` (:mod:`torchaq.layer.error_model`) the tail bound of :meth:`sample`.

    Two ways to build it (:mod:`torchaq.layer.construction`)::

        QuantizedSoftmax(weight, bias=None, ...)          # from a (V, d) weight (fits now)
        QuantizedSoftmax(in_features, out_features, bias=True, device=None, dtype=None, ...)
                                                          # nn.Linear-shaped: fits on first use / fit()

    ``in_features`` / ``out_features`` are ``d`` / ``V``, as on ``nn.Linear``. A skeleton built with
    ``fit=False`` (even from ``torch.empty``) accepts a ``state_dict``; a state with a NaN weight or
    a side row outside ``[0, V)`` is refused at load time, naming the key (:mod:`torchaq.layer.state`).
    Tables the codes cannot serve (``V < 2**bits``, ``d < 8``) are scored exactly instead
    (:func:`torchaq.layer.exact.exact_reason`; :attr:`exact_reason` says why).

    Args:
        weight: ``(V, d)`` weight (an ``nn.Parameter`` is kept as is, e.g. a tied embedding), or
            ``in_features`` (an int).
        out_features: ``V`` when ``weight`` is ``in_features``; otherwise the bias may come here
            positionally, as before.
        bias: optional ``(V,)`` bias (``True`` / ``False`` in the ``nn.Linear`` form).
        num_subspaces: ``M`` PQ subspaces (default ``d // 2``: 2 dimensions per 4-bit code).
        bits: 4 or 8 bits per code.
        threshold, eta: anisotropy of the quantizer (see :class:`torchaq.AnisotropicPQ`);
            default isotropic unless ``queries`` are given, which calibrate it.
        queries: optional ``(B, d)`` sample hidden states for calibration.
        candidates: default number of candidates re-scored exactly (default
            :func:`default_candidates`).
        fit: fit the quantizer now (default: yes from a weight, no in the ``nn.Linear`` form;
            ``False`` to load a ``state_dict`` into the layer). An unfitted layer fits on first use.
        fit_iters, seed, progress: passed to :meth:`torchaq.AnisotropicPQ.fit`.
        quantizer: ``"pq"`` (:class:`torchaq.AnisotropicPQ`, the default) or ``"aq"``
            (:class:`torchaq.AnisotropicAQ`: additive codes, ``num_subspaces`` codebooks of
            full-width codewords; higher recall at equal bits, a LUT costing ``d`` times more per
            codebook and a slower fit / refresh). ``"pq"`` stays the default: with the default
            ``d / 2`` codebooks AQ's LUT costs ``8 d^2`` multiply-adds per query and its fit
            ``O((M K)^3)`` per update; AQ pays off with far fewer codebooks, e.g. ``d / 4`` at
            half the bits (``benchmarks/aq_layer.py``, ``quality.py --aq``).
        device, dtype: of the parameters, in the ``nn.Linear`` form only.
    """

    def __init__(
        self,
        weight,
        out_features=None,
        bias=None,
        num_subspaces: Optional[int] = None,
        bits: int = 4,
        threshold: Optional[float] = None,
        eta: Optional[float] = None,
        queries: Optional[Tensor] = None,
        candidates: Optional[int] = None,
        fit: Optional[bool] = None,
        fit_iters: int = 5,
        seed: int = 0,
        progress: bool = True,
        quantizer: str = "pq",
        device=None,
        dtype=None,
    ):
        super().__init__()
        if quantizer not in ("pq", "aq"):
            raise ValueError(f'quantizer must be "pq" or "aq", got {quantizer!r}')
        if fit is not None and not isinstance(fit, bool):
            raise ValueError(f"fit must be True, False or None, got {fit!r}")
        weight, bias, from_shape = construction.parameters(weight, out_features, bias, device, dtype, fit is not False)
        fit = not from_shape if fit is None else fit
        #: fit on first use (the nn.Linear form); an explicit fit=False skeleton waits for a state_dict
        self.fit_on_first_use = from_shape and not fit
        num_classes, dim = weight.shape
        if candidates is not None:
            candidates = check_int(candidates, "candidates", low=1)
        if num_subspaces is not None:  # None: d // 2; 0 is an error, not the default
            num_subspaces = check_int(num_subspaces, "num_subspaces", 1, dim, f"in [1, d={dim}]")
        self.weight = weight
        if bias is None:
            self.register_parameter("bias", None)
        else:
            self.bias = bias
        self.num_classes, self.dim = num_classes, dim
        self.candidates = candidates
        # topk's int8 shortlist stage: True (default size, default_shortlist), an int, or False (off)
        self.shortlist = True
        quantizer_cls = AnisotropicAQ if quantizer == "aq" else AnisotropicPQ
        self.quantizer = quantizer_cls(
            dim, max(1, dim // 2) if num_subspaces is None else num_subspaces, bits=bits, threshold=threshold, eta=eta, seed=seed
        ).to(weight.device)
        #: why this table is scored exactly instead of through the codes (None: it is not)
        self.exact_reason = exact.exact_reason(num_classes, dim, self.quantizer.bits)
        width = ops.packed_width(self.quantizer.num_subspaces, bits)
        self.register_buffer(
            "packed_codes",
            torch.zeros(((num_classes + ops.BLOCK - 1) // ops.BLOCK, width, ops.BLOCK), dtype=torch.uint8, device=weight.device),
        )
        self._init_side_rows()
        self.fit_iters, self.progress = fit_iters, progress
        # incremental refresh state: weight snapshot and per-row fingerprints at the last encode
        self._snapshot: Optional[staleness.Snapshot] = None
        self._fingerprint: Optional[Tensor] = None
        self._encode_key: Optional[tuple] = None
        self._stale_warned, self._stale_count = False, 0
        # a function of the class, not a lambda: the layer stays picklable (torch.save(model))
        self.register_load_state_dict_post_hook(QuantizedSoftmax._after_load)
        if fit:
            self.fit(queries)

    @property
    def in_features(self) -> int:
        """``d``, as on ``nn.Linear``."""
        return self.dim

    @property
    def out_features(self) -> int:
        """``V``, as on ``nn.Linear``."""
        return self.num_classes

    @property
    def fitted(self) -> bool:
        """Whether the index is built (always True for an exactly scored table)."""
        return self.exact_reason is not None or self.quantizer.fitted

    def fit(self, queries: Optional[Tensor] = None) -> "QuantizedSoftmax":
        """Fit the codebooks to the current weight and encode it (``refresh(refit=True, queries=queries)``)."""
        return self.refresh(refit=True, queries=queries)

    def ensure_fitted(self) -> None:
        """Fit now if the layer was built in the ``nn.Linear`` form and never fitted or loaded;
        a ``fit=False`` skeleton raises instead (it is waiting for a ``state_dict``)."""
        if not self.fitted:
            if not self.fit_on_first_use:
                self.quantizer.check_fitted()
            self.fit()

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kwargs) -> "QuantizedSoftmax":
        """Build from an ``nn.Linear(d, V)``, sharing its weight and bias parameters."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        return cls(linear.weight, linear.bias, **kwargs)

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
        An exactly scored table (:attr:`exact_reason`) returns its exact top ``keep`` and ``lut=None``.
        """
        self.warn_if_stale()
        self.ensure_fitted()
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
        keep = candidates if keep is None else keep
        if self.exact_reason is not None:
            return exact.topk(self.flat_features(h), self.weight, self.bias, min(keep, candidates)) + (None,)
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
        logits, classes = torch.ops.torchaq.rescore_topk.default(flat, self.weight.detach(), bias, classes, keep)
        return logits, classes, lut

    @torch.no_grad()
    def scan(self, h: Tensor, k: int) -> Tuple[Tensor, Tensor]:
        """The LUT scan alone: approximate scores and classes ``(B, k')`` of the best coded rows for
        ``(B, d)`` rows ``h``, best first, with ``k' = min(k, V - len(side_rows))``. Rows of the
        exact side list (:attr:`side_rows`) are never returned: callers score them exactly
        (the sampled softmax adds them to every hard set). Cost: one LUT and one scan of ``V`` codes."""
        flat = self.flat_features(h)
        self.ensure_fitted()
        if self.exact_reason is not None:  # no codes: the exact scores
            return exact.topk(flat, self.weight, self.bias, self._check_k(k))
        lut = self.quantizer.lut(flat)
        k = min(self._check_k(k), self.num_classes - self.side_rows.numel())
        return ops.lut_topk(lut, self.packed_codes, self.num_classes, k, self.scan_bias())

    def _bound_topk(self, flat: Tensor, candidates: Optional[int], k: int) -> Tuple[Tensor, Tensor]:
        """``guarantee="bound"``: add every row the residual bound cannot rule out, ``ROW_CHUNK`` rows
        at a time (the bound's ``(rows, V)`` score and bound tables never span the whole batch)."""
        bias = None if self.bias is None else self.bias.detach()
        out_v = torch.empty(flat.shape[0], k, device=flat.device)
        out_i = torch.empty(flat.shape[0], k, dtype=torch.int64, device=flat.device)
        for a, b in exact.row_chunks(flat.shape[0]):
            logits, classes, lut = self.candidate_logits(flat[a:b], candidates, k)
            scores = functools.partial(ops.lut_score, lut, self.packed_codes, self.num_classes, self.float_bias())
            logits, classes, _ = side_list.bound_complete(  # the scores buffer is made and freed inside
                flat[a:b], self.weight.detach(), bias, scores, self.residual_norms, logits, classes, k)
            out_v[a:b], out_i[a:b] = logits[:, :k], classes[:, :k]
        return out_v, out_i

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
        # no autograd here; the one-op path reads detached parameters, so it needs no no_grad context
        # (which, like a no_grad decorator, costs a visible share of a batch-1 call)
        if torch.is_grad_enabled() and (guarantee is not None or self.exact_reason is not None
                                        or getattr(h, "requires_grad", True)):
            with torch.no_grad():
                return self.topk(h, k, candidates, guarantee)
        if type(k) is not int or not 0 < k <= self.num_classes:
            k = self._check_k(k)
        if guarantee not in (None, "bound"):
            raise ValueError(f'guarantee must be None or "bound", got {guarantee!r}')
        if self.exact_reason is not None:  # exact by construction: the bound has nothing to add
            self.warn_if_stale()
            logits, classes = exact.topk(self.flat_features(h), self.weight, self.bias, k)
        elif guarantee is None:
            logits, classes = self._topk_one_op(h, candidates, k)
        else:
            logits, classes = self._bound_topk(self.flat_features(h), candidates, k)
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
        softmaxes). ``benchmarks/outliers.py`` measures the error on flat and peaked softmaxes.
        Costs a full LUT score pass over ``V`` and ``256 d`` exact multiply-adds per row on top of
        :meth:`topk`; rows go ``ROW_CHUNK`` at a time (:mod:`torchaq.layer.exact`), so the ``(rows, V)``
        temporaries never span the whole batch and the peak stays below the dense layer's.
        """
        k = self._check_k(k)
        flat = self.flat_features(h)
        if self.exact_reason is not None:
            self.warn_if_stale()
            logp, idx = exact.log_softmax_topk(flat, self.weight, self.bias, k)
        else:
            bias = None if self.bias is None else self.bias.detach()
            logp = torch.empty(flat.shape[0], k, device=flat.device)
            idx = torch.empty(flat.shape[0], k, dtype=torch.int64, device=flat.device)
            for a, b in exact.row_chunks(flat.shape[0]):
                logits, classes, lut = self.candidate_logits(flat[a:b], candidates, k)
                log_z = log_partition(flat[a:b], self.weight.detach(), bias, logits, classes,
                                      ops.lut_score(lut, self.packed_codes, self.num_classes, self.float_bias()))
                logp[a:b], idx[a:b] = logits[:, :k] - log_z.unsqueeze(1), classes[:, :k]
        lead = h.shape[:-1]
        return logp.reshape(lead + (k,)), idx.reshape(lead + (k,))

    @torch.no_grad()
    def entropy(self, h: Tensor) -> Tensor:
        """Softmax entropy ``H = -sum_c p_c log p_c`` in nats per row of ``h``: float32 ``(...)``.

        Exact to float rounding (well within 0.01 nats) by a streaming log-sum-exp over blocks of
        classes (:func:`torchaq.layer.exact.entropy`): never a ``(B, V)`` tensor, at most
        ``ROW_CHUNK x CLASS_CHUNK`` logits at once; ``B V d`` multiply-adds, as the dense layer.
        """
        return exact.entropy(self.flat_features(h), self.weight, self.bias).reshape(h.shape[:-1])

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
        if method == "full":  # (sample_full enters no_grad itself where it needs to: not on its one-op path)
            self.warn_if_stale()
            return sample_full(self, h, top_k, top_p, min_p, temperature, generator, seeds, return_logprobs, candidates)
        if torch.is_grad_enabled():  # no autograd here (a no_grad decorator costs more at batch 1)
            with torch.no_grad():
                return self.sample(h, top_k, top_p, min_p, temperature, generator, seeds, return_logprobs, candidates,
                                   method)
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
        scoring = f"exact ({self.exact_reason})" if self.exact_reason is not None else f"rule={q.rule}"
        return (
            f"V={self.num_classes}, d={self.dim}, bits={q.bits}, subspaces={q.num_subspaces}, "
            f"{scoring}, bias={self.bias is not None}"
        )
