"""What every torchaq quantizer shares: the anisotropy rule, argument checks, fitted state, packing
and scoring through the scan ops, and the ``nn.Module`` plumbing (state_dict, dtype casts).

:class:`torchaq.AnisotropicPQ` (concatenated sub-vectors) and :class:`torchaq.AnisotropicAQ`
(sums of full-width codewords) differ only in how they fit, encode, decode and build a lookup
table; both store ``M`` codes of ``bits`` bits per vector, so the packed layout, the scan and
everything above them (the layer, the sampled softmax) treat them alike.
"""
from __future__ import annotations

import math
import numbers
from typing import Dict, Optional

import torch
from torch import Tensor, nn

from torchaq import ops
from torchaq.checks import check_int, has_data
from torchaq.quantizers import extra_state
from torchaq.quantizers.calibrate import AnisotropyRule
from torchaq.quantizers.loss import eta as sphere_eta

UNSET = object()  # "threshold not given": the default 0.2 applies unless eta= is given
# rows used to learn the codebooks (a seeded random sample beyond this): it bounds the cost of
# fit for very large V; encoding all rows is encode's job
MAX_FIT_ROWS = 65536
# held-out queries used for calibration: a selection slice and a disjoint check slice
CALIBRATION_QUERIES = 1000
# fewest sample queries that calibration accepts
MIN_CALIBRATION_QUERIES = 20


def sample_rows(x: Tensor, count: int, generator: torch.Generator) -> Tensor:
    """``count`` seeded random rows of ``x`` (all of ``x`` when it has no more)."""
    if x.shape[0] <= count:
        return x
    return x[torch.randperm(x.shape[0], generator=generator)[:count].to(x.device)]


def _is_real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def parse_rule(threshold, eta) -> AnisotropyRule:
    """The anisotropy rule of a constructor's ``threshold=`` / ``eta=`` (see :class:`torchaq.AnisotropicPQ`)."""
    if eta is not None and threshold is not UNSET and threshold is not None:
        raise ValueError("give either threshold= or eta=, not both")
    if eta is not None:
        if not _is_real(eta) or eta < 1:
            raise ValueError(f"eta must be a finite number >= 1 (h_par >= h_perp), got {eta!r}")
        return AnisotropyRule("isotropic") if eta == 1 else AnisotropyRule("eta", float(eta))
    threshold = 0.2 if threshold is UNSET else threshold
    if threshold is None:
        return AnisotropyRule("isotropic")
    if not _is_real(threshold) or threshold <= 0:
        raise ValueError(f"threshold must be a finite number > 0 or None, got {threshold!r}")
    return AnisotropyRule("threshold", float(threshold))


def check_bits(bits) -> int:
    if not isinstance(bits, numbers.Integral) or isinstance(bits, bool) or bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8 (an integer), got {bits!r}")
    return int(bits)


class ScoreAwareQuantizer(nn.Module):
    """Base of the quantizers: ``M = num_subspaces`` codes of ``bits`` bits per ``dim``-vector.

    Subclasses call :meth:`_init_quantizer` from their constructor and implement ``fit``,
    ``encode``, ``decode``, ``lut`` and ``loss``. The codebooks are the float32 buffer
    ``codebooks``; they stay float32 whatever dtype the module is cast to.
    """

    #: what one code column is called in error messages
    codes_name = "num_subspaces"

    def _init_quantizer(self, dim: int, num_subspaces: int, bits: int, seed: int, rule: AnisotropyRule,
                        codebook_shape) -> None:
        self.dim, self.num_subspaces, self.bits = dim, num_subspaces, bits
        self.num_codewords = 2**bits
        self.seed = seed
        #: the anisotropy rule used by ``encode`` (set by the constructor, or chosen by calibration)
        self.rule = rule
        #: calibration scores ``{rule: recall}`` of the last ``fit`` with queries, else ``None``
        self.calibration: Optional[Dict[str, float]] = None
        self._fit_dtype = torch.float32
        self.register_buffer("codebooks", torch.zeros(codebook_shape))
        # a Python flag, not a buffer: torch.compile traces no tensor read for it, and a meta-device
        # copy can still say whether it is fitted. It travels in the extra state (state_dict).
        self.fitted = False

    # ---------------------------------------------------------------------------------------
    # argument checks
    # ---------------------------------------------------------------------------------------
    def _check_rows(self, x: Tensor, name: str) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 2:
            raise ValueError(f"{name} must be 2-D (rows, dim={self.dim}), got shape {tuple(x.shape)}")
        if x.shape[1] != self.dim:
            raise ValueError(f"{name} has {x.shape[1]} columns but the quantizer has dim={self.dim}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
        if not has_data(x) or x.numel() == 0:
            return
        lo, hi = torch.aminmax(x)  # one pass, no (N, dim) mask: NaN propagates, an Inf is an extreme
        if bool(torch.isfinite(lo) & torch.isfinite(hi)):
            return
        bad = ~torch.isfinite(x).all(dim=1)
        if bool(bad.any()):
            raise ValueError(f"{name} has NaN or Inf values in row {int(bad.nonzero()[0])} ({int(bad.sum())} rows)")

    def check_fitted(self) -> None:
        if not self.fitted:
            raise RuntimeError(f"{type(self).__name__} is not fitted: call fit(x) first (or load a state_dict)")

    def _check_codes(self, codes: Tensor) -> Tensor:
        if not isinstance(codes, Tensor) or codes.dim() != 2 or codes.shape[1] != self.num_subspaces:
            shape = tuple(codes.shape) if isinstance(codes, Tensor) else type(codes).__name__
            raise ValueError(f"codes must be (N, {self.codes_name}={self.num_subspaces}), got {shape}")
        if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
            raise TypeError(f"codes must be an integer tensor (uint8 from encode), got {codes.dtype}")
        if codes.numel() and has_data(codes) and (int(codes.min()) < 0 or int(codes.max()) >= self.num_codewords):
            raise ValueError(f"codes must be in [0, {self.num_codewords}) for bits={self.bits}")
        return codes

    def _check_fit_args(self, x: Tensor, queries: Optional[Tensor], iters, max_rows, progress) -> None:
        """The checks every ``fit`` starts with (``x``, ``queries``, ``iters``, ``max_rows``, ``progress``, the threshold)."""
        self._check_rows(x, "x")
        if not isinstance(progress, bool):
            raise TypeError(f"progress must be a bool, got {progress!r}")
        if x.shape[0] < self.num_codewords:
            raise ValueError(
                f"x has {x.shape[0]} rows but bits={self.bits} needs at least {self.num_codewords} (one per codeword)"
            )
        check_int(iters, "iters", low=0)
        if max_rows is not None:
            check_int(max_rows, "max_rows", low=self.num_codewords, what=f"None or an integer >= {self.num_codewords}")
        if queries is not None:
            self._check_rows(queries, "queries")
            if queries.shape[0] < MIN_CALIBRATION_QUERIES:
                raise ValueError(
                    f"queries must have at least {MIN_CALIBRATION_QUERIES} rows for calibration, got {queries.shape[0]}"
                )
            if queries.device != x.device:
                raise ValueError(f"queries are on {queries.device} but x is on {x.device}")
        if self.rule.kind == "threshold":
            max_norm = float(x.float().norm(dim=1).max())
            if self.rule.value >= max_norm * (1 - 1e-5):  # float32 norms of unit rows
                raise ValueError(
                    f"threshold={self.rule.value:g} must be below the largest row norm of x ({max_norm:.4g}); "
                    "for unit-norm data the threshold must lie in (0, 1)"
                )

    # ---------------------------------------------------------------------------------------
    # anisotropy, packing, scoring
    # ---------------------------------------------------------------------------------------
    def row_eta(self, x: Tensor, rule: Optional[AnisotropyRule] = None) -> Tensor:
        """Per-row ``eta`` of ``rule`` (default: :attr:`rule`) for float32 rows (zero padding does not
        change a norm)."""
        rule = self.rule if rule is None else rule
        if rule.kind == "threshold":
            return sphere_eta(rule.value, self.dim, x.norm(dim=1)).to(x.device).float()
        value = 1.0 if rule.kind == "isotropic" else rule.value
        return torch.full((x.shape[0],), value, dtype=torch.float32, device=x.device)

    def pack(self, codes: Tensor) -> Tensor:
        """Codes in the blocked layout of the scan kernels (:func:`torchaq.ops.pack_codes`)."""
        return ops.pack_codes(self._check_codes(codes).to(torch.uint8).contiguous(), self.bits)

    def score(self, q: Tensor, codes: Tensor) -> Tensor:
        """Approximate inner products ``sum_m LUT[b, m, codes[n, m]] = <q, decode(codes)[n]>``: ``(B, N)`` float32."""
        if not isinstance(q, Tensor) or q.dim() != 2:
            raise ValueError(f"q must be (B, dim={self.dim}), got shape {tuple(getattr(q, 'shape', ()))}")
        lut = self.lut(q)
        return ops.lut_score(lut, self.pack(codes.to(lut.device)), codes.shape[0])

    # ---------------------------------------------------------------------------------------
    # nn.Module plumbing
    # ---------------------------------------------------------------------------------------
    def _apply(self, fn, recurse=True):
        # .to(dtype) / .half() / .bfloat16() cast floating buffers: the codebooks stay float32 (a
        # bfloat16 round trip moves every codeword and changes top-k results); devices still move
        codebooks = self.codebooks
        super()._apply(fn, recurse)
        if self.codebooks.dtype != torch.float32:
            self.codebooks = codebooks.to(device=self.codebooks.device, dtype=torch.float32)
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        old_flag = state_dict.pop(prefix + "fitted", None)  # a buffer in state dicts of earlier versions
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if old_flag is not None:
            self.fitted = bool(old_flag)

    def get_extra_state(self) -> Tensor:
        """The fitted flag, rule, calibration and fit dtype as one float64 tensor
        (:mod:`torchaq.quantizers.extra_state`: a state_dict of tensors only, so safetensors can store it)."""
        return extra_state.encode(self.fitted, self.rule, self.calibration, self._fit_dtype)

    def set_extra_state(self, state) -> None:
        """Reads :meth:`get_extra_state`'s tensor, or the dict that earlier versions stored."""
        self.fitted, self.rule, self.calibration, self._fit_dtype = extra_state.decode(state)
