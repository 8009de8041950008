"""``torchaq.QuantizedSoftmax``: a drop-in output layer with fast approximate top-k inference."""
from __future__ import annotations

import math
import warnings
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import incremental, ops
from ._checks import check_features
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
        self._fit_iters, self._progress = fit_iters, progress
        # incremental refresh state: weight version and per-row fingerprints at the last encode
        self._refresh_version: Optional[int] = None
        self._fingerprint: Optional[Tensor] = None
        self._encode_key: Optional[tuple] = None
        self._stale_warned = False
        self.register_load_state_dict_post_hook(lambda module, _keys: module._mark_fresh())
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

        Only rows whose fingerprint (:mod:`torchaq.incremental`: projections onto fixed random
        directions) changed are re-encoded, so the cost grows with the rows a step moved, plus one
        ``O(V d)`` fingerprint pass (``benchmarks/refresh.py`` measures it); if
        ``weight._version`` did not move nothing is done at all. A full re-encode (first refresh, new codebooks, another device)
        is one anisotropic encoding pass over the ``V`` rows, ``O(V M K (dsub + rounds))``.
        Re-fitting runs :meth:`torchaq.AnisotropicPQ.fit` (k-means plus ``fit_iters`` alternations).
        """
        weight = self.weight.detach()
        if refit:
            if queries is not None:
                queries = self._flat_h(queries, "queries")
            self.quantizer.fit(weight, queries=queries, iters=self._fit_iters, progress=self._progress)
        same_index = not refit and self._encode_key is not None and self._encode_key == self._encoding_key()
        if same_index and self._refresh_version is not None and self._weight_version() == self._refresh_version:
            return self
        fingerprint = incremental.row_fingerprint(weight, incremental.fingerprint_directions(self.dim, weight.device))
        rows = incremental.changed_rows(fingerprint, self._fingerprint) if same_index else None
        if rows is None:
            self.packed_codes = self.quantizer.pack(self.quantizer.encode(weight))
        elif rows.numel():
            codes = self.quantizer.encode(weight[rows])
            incremental.write_packed_rows(self.packed_codes, rows, codes, self.quantizer.bits)
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
        self._warn_if_stale()
        flat = self._flat_h(h)
        if candidates is None:
            candidates = self.candidates or default_candidates(k, self.num_classes)
            candidates = min(candidates, self.num_classes)
        self._check_k(candidates, "candidates")
        if candidates < k:
            raise ValueError(f"candidates={candidates} must be >= k={k}")
        lut = self.quantizer.lut(flat)
        _, classes = ops.lut_topk(lut, self.packed_codes, self.num_classes, candidates, self._bias32())
        bias = None if self.bias is None else self.bias.detach()
        logits = exact_logits(flat, self.weight.detach(), bias, classes)
        logits, order = logits.sort(dim=1, descending=True)
        return logits, classes.gather(1, order), lut

    def _bias32(self) -> Optional[Tensor]:
        return None if self.bias is None else self.bias.detach().float()

    @torch.no_grad()
    def topk(self, h: Tensor, k: int = 10, candidates: Optional[int] = None) -> Tuple[Tensor, Tensor]:
        """Approximate top-``k`` classes with their exact logits: ``(values, indices)`` of shape ``(..., k)``.

        LUT scores over all classes -> the ``candidates`` best (default
        :func:`default_candidates`) -> exact logits of those rows (bias included) -> top-``k``.
        """
        self._check_k(k)
        logits, classes, _ = self.candidate_logits(h, candidates, k)
        lead = h.shape[:-1]
        return logits[:, :k].reshape(lead + (k,)), classes[:, :k].reshape(lead + (k,))

    @torch.no_grad()
    def log_softmax_topk(self, h: Tensor, k: int = 10, candidates: Optional[int] = None) -> Tuple[Tensor, Tensor]:
        """Log-probabilities of the approximate top-``k`` classes: ``(logp, indices)`` of shape ``(..., k)``.

        ``log p_c = logit_c - log Z`` with the log-partition estimated as
        ``log Z ~= logsumexp(exact logits of the candidates, LUT scores of all other classes)``.
        The candidates hold nearly all of the probability mass, and the LUT scores of the rest
        are unbiased-in-the-mean approximations of their logits (4-bit codes: a few percent
        error per logit), so the error of ``log Z`` is far below that of the LUT scores
        themselves: ``benchmarks/layer.py`` measures it (mean ``|log Z error|`` ~1e-3 nats on
        real data). Costs a full ``(B, V)`` LUT score pass on top of :meth:`topk`.
        """
        self._check_k(k)
        logits, classes, lut = self.candidate_logits(h, candidates, k)
        approx = ops.lut_score(lut, self.packed_codes, self.num_classes, self._bias32())
        rest = approx.scatter(1, classes, -math.inf)
        log_z = torch.logaddexp(torch.logsumexp(logits, dim=1), torch.logsumexp(rest, dim=1))
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
