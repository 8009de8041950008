"""``torchaq.QuantizedSoftmax``: a drop-in output layer with fast approximate top-k inference."""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import ops
from . import outliers
from ._checks import check_features
from .partition import log_partition
from .quantizer import AnisotropicPQ
from .rescore import exact_logits
from .sampled_softmax import layer_sampled_softmax_loss

# Default number of LUT candidates re-scored exactly, as a function of k: enough that the exact
# top-k is almost always among them (benchmarks/layer.py measures recall@10 >= 0.99 on real
# data with d/2 subspaces), small enough that re-scoring costs far less than the dense layer.
MIN_CANDIDATES = 256
CANDIDATES_PER_K = 16


def default_candidates(k: int, num_classes: int) -> int:
    """``min(V, max(256, 16 k))`` candidates re-scored exactly by :meth:`QuantizedSoftmax.topk`."""
    return min(num_classes, max(MIN_CANDIDATES, CANDIDATES_PER_K * k))


class QuantizedSoftmax(nn.Module):
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
    by :func:`torchaq.outliers.select_side_rows` (its docstring says how, and what it costs):
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
    ):
        super().__init__()
        if not isinstance(weight, Tensor) or weight.dim() != 2 or not weight.is_floating_point():
            desc = f"{weight.dtype} {tuple(weight.shape)}" if isinstance(weight, Tensor) else type(weight).__name__
            raise ValueError(f"weight must be a floating-point (V, d) tensor, got {desc}")
        num_classes, dim = weight.shape
        if bias is not None and (not isinstance(bias, Tensor) or bias.shape != (num_classes,)):
            raise ValueError(f"bias must have shape ({num_classes},), got {getattr(bias, 'shape', bias)}")
        if candidates is not None and (not isinstance(candidates, int) or candidates < 1):
            raise ValueError(f"candidates must be a positive integer, got {candidates!r}")
        self.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight.detach().clone())
        if bias is None:
            self.register_parameter("bias", None)
        else:
            self.bias = bias if isinstance(bias, nn.Parameter) else nn.Parameter(bias.detach().clone())
        self.num_classes, self.dim = num_classes, dim
        self.candidates = candidates
        self.quantizer = AnisotropicPQ(
            dim, num_subspaces or max(1, dim // 2), bits=bits, threshold=threshold, eta=eta, seed=seed
        ).to(weight.device)
        width = ops.packed_width(self.quantizer.num_subspaces, bits)
        self.register_buffer(
            "packed_codes",
            torch.zeros(((num_classes + ops.BLOCK - 1) // ops.BLOCK, width, ops.BLOCK), dtype=torch.uint8, device=weight.device),
        )
        self._init_side_rows()
        self._fit_iters, self._progress = fit_iters, progress
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
        """Re-encode the weight rows (after the weights changed); ``refit=True`` also re-learns the codebooks.

        Cost: re-encoding is one anisotropic encoding pass over the ``V`` rows (``O(V M K dsub)``
        plus the coordinate-descent rounds; about a second for V = 30k, d = 384 on 2 cores).
        Re-fitting runs :meth:`torchaq.AnisotropicPQ.fit` (k-means plus ``fit_iters``
        alternations; tens of seconds at that size, minutes at V = 256k, d = 1024).
        """
        weight = self.weight.detach()
        if refit:
            if queries is not None:
                queries = self._flat_h(queries, "queries")
            keep = outliers.fit_rows_mask(weight)  # huge-norm rows do not shape the codebooks
            fit_rows = weight[keep] if int(keep.sum()) >= self.quantizer.num_codewords else weight
            self.quantizer.fit(fit_rows, queries=queries, iters=self._fit_iters, progress=self._progress)
        self.packed_codes = self.quantizer.pack(self.quantizer.encode(weight))
        self.refresh_side_rows()
        return self

    # ---------------------------------------------------------------------------------------
    # argument checks
    # ---------------------------------------------------------------------------------------
    def _flat_h(self, h: Tensor, name: str = "h") -> Tensor:
        check_features(h, self.dim, name, self.weight.device, "layer")
        if not torch.compiler.is_compiling() and h.numel() and not bool(torch.isfinite(h).all()):
            raise ValueError(f"{name} contains NaN or Inf")
        return h.reshape(-1, self.dim)

    def _check_k(self, k: int, name: str = "k") -> None:
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= self.num_classes:
            raise ValueError(f"{name} must be an integer in [1, V={self.num_classes}], got {k!r}")

    # ---------------------------------------------------------------------------------------
    # the layer
    # ---------------------------------------------------------------------------------------
    def forward(self, h: Tensor) -> Tensor:
        """Exact logits ``h @ W.T + b``, exactly as the ``nn.Linear`` this layer replaces."""
        return F.linear(h, self.weight, self.bias)

    def candidate_logits(
        self, h: Tensor, candidates: Optional[int] = None, k: int = 1
    ) -> Tuple[Tensor, Tensor, Tensor]:
        """LUT scan for the best classes of each row of ``h``, then their exact logits.

        Returns ``(logits, classes, lut)``: float32 and int64 ``(B, C)`` for the flattened ``h``,
        sorted by exact logit (best first), and the ``(B, M, K)`` lookup tables. ``C`` is
        ``candidates``, else the layer's ``candidates``, else :func:`default_candidates`.
        """
        flat = self._flat_h(h)
        if candidates is None:
            candidates = self.candidates or default_candidates(k, self.num_classes)
            candidates = min(candidates, self.num_classes)
        self._check_k(candidates, "candidates")
        if candidates < k:
            raise ValueError(f"candidates={candidates} must be >= k={k}")
        lut = self.quantizer.lut(flat)
        scan_k = min(candidates, self.num_classes - self.side_rows.numel())
        _, classes = ops.lut_topk(lut, self.packed_codes, self.num_classes, scan_k, self._scan_bias())
        classes = self._with_side_rows(classes)
        bias = None if self.bias is None else self.bias.detach()
        logits = exact_logits(flat, self.weight.detach(), bias, classes)
        logits, order = logits.sort(dim=1, descending=True)
        return logits, classes.gather(1, order), lut

    def _bound_complete(self, h: Tensor, logits: Tensor, classes: Tensor, lut: Tensor, k: int):
        """``guarantee="bound"``: add every row the residual bound cannot rule out (also returns the counts)."""
        scores = ops.lut_score(lut, self.packed_codes, self.num_classes, self._bias32())
        bias = None if self.bias is None else self.bias.detach()
        return outliers.bound_complete(
            self._flat_h(h), self.weight.detach(), bias, scores, self.residual_norms, logits, classes, k
        )

    def _bias32(self) -> Optional[Tensor]:
        return None if self.bias is None else self.bias.detach().float()

    # ---------------------------------------------------------------------------------------
    # the exact side list (torchaq.outliers)
    # ---------------------------------------------------------------------------------------
    def _init_side_rows(self) -> None:
        device = self.weight.device
        self.register_buffer("side_rows", torch.zeros(0, dtype=torch.int64, device=device))
        self.register_buffer("residual_norms", torch.full((self.num_classes,), math.inf, device=device))
        self._scan_bias_cache: Tuple = (None, None)

    @torch.no_grad()
    def refresh_side_rows(self, queries: Optional[Tensor] = None) -> Tensor:
        """Re-choose the exact side list and the residual norms from the current weight and codes.

        :meth:`refresh` calls it (without queries, so that every refresh applies the same rule);
        optional ``queries`` add the observed-error statistic of
        :func:`torchaq.outliers.select_side_rows`. Returns ``side_rows``.
        """
        weight = self.weight.detach()
        codes = ops.unpack_codes(self.packed_codes, self.quantizer.num_subspaces, self.quantizer.bits, self.num_classes)
        recon = self.quantizer.decode(codes, dtype=torch.float32).to(weight.device)
        queries = None if queries is None else self._flat_h(queries, "queries")
        self.residual_norms = outliers.residual_norms(weight, recon)
        self.side_rows = outliers.select_side_rows(weight, recon, queries)
        return self.side_rows

    def _scan_bias(self) -> Optional[Tensor]:
        """The bias the LUT scan ranks with: the layer's, side rows pushed to the bottom (cached)."""
        if self.side_rows.numel() == 0:
            return self._bias32()
        if torch.compiler.is_compiling():
            return outliers.scan_bias(self.bias, self.side_rows, self.num_classes, self.weight.device)
        key = (self.side_rows.data_ptr(), self.side_rows._version, self.side_rows.device)
        if self.bias is not None:
            key += (self.bias.data_ptr(), self.bias._version)
        if self._scan_bias_cache[0] != key:
            self._scan_bias_cache = (key, outliers.scan_bias(self.bias, self.side_rows, self.num_classes, self.weight.device))
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

    @torch.no_grad()
    def topk(
        self, h: Tensor, k: int = 10, candidates: Optional[int] = None, guarantee: Optional[str] = None
    ) -> Tuple[Tensor, Tensor]:
        """Approximate top-``k`` classes with their exact logits: ``(values, indices)`` of shape ``(..., k)``.

        LUT scores over all classes -> the ``candidates`` best (default
        :func:`default_candidates`) plus the exact side list -> exact logits of those rows (bias
        included) -> top-``k``. ``guarantee="bound"`` makes the top-``k`` provably exact: every
        other row whose Cauchy-Schwarz bound ``s_i + |h| |W_i - decode(code_i)|`` reaches the
        ``k``-th exact logit found is re-scored too (:func:`torchaq.outliers.bound_complete`;
        costs a float LUT score pass over all ``V`` classes on top).
        """
        self._check_k(k)
        if guarantee not in (None, "bound"):
            raise ValueError(f'guarantee must be None or "bound", got {guarantee!r}')
        logits, classes, lut = self.candidate_logits(h, candidates, k)
        if guarantee == "bound":
            logits, classes, _ = self._bound_complete(h, logits, classes, lut, k)
        lead = h.shape[:-1]
        return logits[:, :k].reshape(lead + (k,)), classes[:, :k].reshape(lead + (k,))

    @torch.no_grad()
    def log_softmax_topk(self, h: Tensor, k: int = 10, candidates: Optional[int] = None) -> Tuple[Tensor, Tensor]:
        """Log-probabilities of the approximate top-``k`` classes: ``(logp, indices)`` of shape ``(..., k)``.

        ``log p_c = logit_c - log Z`` with the log-partition ``log Z`` from the exact logits of the
        candidates (side list included) plus the LUT mass of all other classes, corrected by an
        importance sample of exactly scored classes of that rest (:func:`torchaq.partition.log_partition`:
        the plain LUT mass of the rest is biased low when it holds much of the mass, i.e. flat
        softmaxes). ``benchmarks/outliers.py`` measures the error on flat and peaked softmaxes.
        Costs a full ``(B, V)`` LUT score pass and ``B * 256 * d`` exact multiply-adds on top of :meth:`topk`.
        """
        self._check_k(k)
        logits, classes, lut = self.candidate_logits(h, candidates, k)
        approx = ops.lut_score(lut, self.packed_codes, self.num_classes, self._bias32())
        bias = None if self.bias is None else self.bias.detach()
        log_z = log_partition(self._flat_h(h), self.weight.detach(), bias, logits, classes, approx)
        logp = logits[:, :k] - log_z.unsqueeze(1)
        lead = h.shape[:-1]
        return logp.reshape(lead + (k,)), classes[:, :k].reshape(lead + (k,))

    @torch.no_grad()
    def sample(
        self,
        h: Tensor,
        top_k: int = 50,
        top_p: Optional[float] = None,
        temperature: float = 1.0,
        generator: Optional[torch.Generator] = None,
        candidates: Optional[int] = None,
    ) -> Tensor:
        """Top-k (and optionally top-p) sampling of one class per row of ``h``: int64 ``(...)``.

        The ``top_k`` classes are the best of the exactly re-scored candidates, so whenever they
        are the true top-k the distribution is exactly that of top-k sampling from the dense
        logits: ``softmax(logits / temperature)`` restricted to them (then, with ``top_p``, to
        the smallest prefix whose probability reaches ``top_p``, as in Hugging Face's
        ``TopPLogitsWarper``). ``generator`` makes draws reproducible.
        """
        self._check_k(top_k, "top_k")
        if top_p is not None and not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
        if not isinstance(temperature, (int, float)) or not temperature > 0 or not math.isfinite(temperature):
            raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
        logits, classes, _ = self.candidate_logits(h, candidates, top_k)
        logits = logits[:, :top_k] / temperature
        if top_p is not None and top_p < 1:
            probs = logits.softmax(dim=1)
            before = probs.cumsum(dim=1) - probs  # mass of the strictly better classes
            logits = logits.masked_fill(before >= top_p, -math.inf)  # always keeps the best class
        choice = torch.multinomial(logits.softmax(dim=1), 1, generator=generator)
        return classes.gather(1, choice).reshape(h.shape[:-1])

    sampled_softmax_loss = layer_sampled_softmax_loss

    def extra_repr(self) -> str:
        q = self.quantizer
        return (
            f"V={self.num_classes}, d={self.dim}, bits={q.bits}, subspaces={q.num_subspaces}, "
            f"rule={q.rule}, bias={self.bias is not None}"
        )
