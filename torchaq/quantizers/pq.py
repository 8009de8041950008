"""``torchaq.AnisotropicPQ``: product quantization trained with the score-aware loss."""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Dict, Optional

import torch
from torch import Tensor
from tqdm.auto import tqdm

from torchaq.checks import check_features, check_int
from torchaq.quantizers.calibrate import AnisotropyRule, candidate_rules, exact_top, retrieval_recall, successive_halving
from torchaq.quantizers.codebook_update import joint_codebook_update
from torchaq.ops.encode import decode, l2_encode, score_aware_encode
from torchaq.quantizers.kmeans import subspace_kmeans
from torchaq.quantizers.loss import score_aware_loss
from torchaq.quantizers.base import (  # noqa: F401  (MAX_FIT_ROWS: part of this module's interface)
    CALIBRATION_QUERIES,
    MAX_FIT_ROWS,
    UNSET,
    ScoreAwareQuantizer,
    check_bits,
    parse_rule,
    sample_rows,
)

# rows (a seeded sample) the calibration candidates are trained and scored on
CALIBRATION_ROWS = 4096
# k-means only initialises the codebooks: like FAISS (256 points per centroid) it runs on a
# random sample of the training rows
KMEANS_POINTS_PER_CODEWORD = 256
# queries (at most) of each calibration slice, selection and check: the finalists of the
# successive halving differ by less than the sampling noise of 1000 queries, so PQ uses more of
# the queries it is given (AQ keeps quantizer_base.CALIBRATION_QUERIES)
PQ_CALIBRATION_QUERIES = 2 * CALIBRATION_QUERIES
# CG iterations of each joint codebook update inside fit (warm-started; the next alternation
# continues where it stopped)
FIT_CG_ITERS = 10


class AnisotropicPQ(ScoreAwareQuantizer):
    """Anisotropic product quantizer (Guo et al., ICML 2020, "ScaNN").

    Splits each ``dim``-vector into ``num_subspaces`` (``M``) sub-vectors and quantizes each to
    one of ``K = 2**bits`` codewords. Codes are chosen, and codebooks trained, to minimise the
    score-aware loss ``eta |r_par|^2 + |r_perp|^2`` (:func:`torchaq.score_aware_loss`) instead of
    the reconstruction error, which keeps the inner products that matter -- the large ones --
    more accurate.

    ``fit`` runs per-subspace k-means, then alternates for ``iters`` rounds

    1. anisotropic encoding by coordinate descent over subspaces (ScaNN's noise-shaped encoder,
       :func:`torchaq.ops.encode.anisotropic_encode`), and
    2. the paper's joint codebook update, the exact minimiser of the total loss over all
       codebooks at once (:func:`torchaq.quantizers.codebook_update.joint_codebook_update`; ScaNN only
       runs k-means per block).

    The anisotropy of a row is set by one of
      * ``threshold=T``: the paper's ``eta(T, dim, |x|)`` per row (queries uniform on the sphere);
      * ``eta=e``: a constant ``e`` for every row;
      * ``threshold=None`` (and no ``eta``): isotropic, plain PQ (``eta = 1``).
    When ``fit`` gets sample ``queries`` it *calibrates* instead: it tries isotropic, the rule
    above and a grid of constants by successive halving on a row subsample, keeps the one with
    the best recall of the exact top-10 on held-out queries, and falls back to isotropic if the
    final fit loses on a second held-out slice. The choice is in :attr:`rule`, the scores in
    :attr:`calibration`, and the seconds of each phase of the last fit in :attr:`fit_seconds`.

    A ``dim`` that ``M`` does not divide is split into subspaces of ``ceil(dim / M)`` and
    ``floor(dim / M)`` dimensions; the short ones are padded with one zero internally.
    All math is float32, on the device of the data (codebooks stay float32 in use even if the
    module is cast with ``.to(dtype)``). The module's state (codebooks, the chosen
    rule, calibration scores) round-trips through ``state_dict``.

    Args:
        dim: input dimension ``d``.
        num_subspaces: ``M``, between 1 and ``dim``.
        bits: 4 (16 codewords per subspace) or 8 (256).
        threshold: the paper's ``T`` (> 0; for unit-norm data < 1), or ``None`` for isotropic.
        eta: a constant ``h_par / h_perp`` (>= 1) instead of ``threshold``.
        seed: seeds the k-means initialisation (same seed and data, same codes).
        kmeans_iters: Lloyd iterations of the isotropic start.
    """

    def __init__(
        self,
        dim: int,
        num_subspaces: int,
        bits: int = 4,
        threshold: Optional[float] = UNSET,  # type: ignore[assignment]
        eta: Optional[float] = None,
        seed: int = 0,
        kmeans_iters: int = 20,
    ):
        super().__init__()
        dim = check_int(dim, "dim", low=1)
        num_subspaces = check_int(num_subspaces, "num_subspaces", 1, dim, f"in [1, dim={dim}] (at least one dimension each)")
        bits = check_bits(bits)
        kmeans_iters = check_int(kmeans_iters, "kmeans_iters", low=0)
        seed = check_int(seed, "seed", what="(it seeds the k-means initialisation)")
        self.subspace_dim = -(-dim // num_subspaces)
        self.kmeans_iters = kmeans_iters
        self._init_quantizer(dim, num_subspaces, bits, seed, parse_rule(threshold, eta),
                             (num_subspaces, 2**bits, self.subspace_dim))
        #: seconds the last ``fit`` spent per phase (k-means, encode, codebook update, calibration
        #: scoring), wall clock; on CUDA the phases are not synchronised, so they are indicative only
        self.fit_seconds: Dict[str, float] = {}
        self.register_buffer("pad_index", self._make_pad_index(), persistent=False)

    # ---------------------------------------------------------------------------------------
    # layout: uneven subspaces as padded even ones
    # ---------------------------------------------------------------------------------------
    def _make_pad_index(self) -> Tensor:
        """Position of each input dimension in the padded ``M * dsub`` vector.

        The first ``dim - M (dsub - 1)`` subspaces take ``dsub`` dimensions, the rest
        ``dsub - 1`` plus one zero, so no subspace is all padding.
        """
        m, dsub = self.num_subspaces, self.subspace_dim
        full = self.dim - m * (dsub - 1)
        sizes = [dsub] * full + [dsub - 1] * (m - full)
        return torch.cat([torch.arange(s) + i * dsub for i, s in enumerate(sizes)])

    @property
    def padded_dim(self) -> int:
        return self.num_subspaces * self.subspace_dim

    def pad(self, x: Tensor) -> Tensor:
        """``(..., dim)`` -> ``(..., M * dsub)`` float32 with zeros in the padding positions."""
        x = x.float()
        if self.padded_dim == self.dim:
            return x
        out = x.new_zeros(x.shape[:-1] + (self.padded_dim,))
        out[..., self.pad_index.to(x.device)] = x
        return out

    def unpad(self, x: Tensor) -> Tensor:
        if self.padded_dim == self.dim:
            return x
        return x[..., self.pad_index.to(x.device)]

    # ---------------------------------------------------------------------------------------
    # anisotropy (row_eta: ScoreAwareQuantizer; padding does not change a row's norm)
    # ---------------------------------------------------------------------------------------
    def _encode_padded(self, x: Tensor, rule: AnisotropyRule, codebooks: Optional[Tensor] = None) -> Tensor:
        codebooks = self.codebooks.float() if codebooks is None else codebooks
        if rule.kind == "isotropic":
            return l2_encode(x, codebooks)
        return score_aware_encode(x, codebooks, self.row_eta(x, rule))

    def loss(self, x: Tensor, codes: Optional[Tensor] = None) -> Tensor:
        """Per-row score-aware loss of ``x`` under the current rule (encoding ``x`` if no codes)."""
        self.check_fitted()
        self._check_rows(x, "x")
        codes = self.encode(x) if codes is None else self._check_codes(codes)
        xp = self.pad(x)
        return score_aware_loss(xp, decode(codes.long(), self.codebooks.float()), self.row_eta(xp))

    # ---------------------------------------------------------------------------------------
    # fit
    # ---------------------------------------------------------------------------------------
    @contextmanager
    def _phase(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.fit_seconds[name] = self.fit_seconds.get(name, 0.0) + time.perf_counter() - start

    def _alternate(
        self, x: Tensor, rule: AnisotropyRule, codebooks: Tensor, rounds: int, bar, codes: Optional[Tensor] = None
    ) -> Tensor:
        """``rounds`` of (anisotropic encode, joint codebook update) for ``rule``.

        ``codes``: the codes of ``x`` under ``codebooks`` when the caller already has them. The
        update runs at most ``FIT_CG_ITERS`` warm-started CG iterations: every iterate lowers the
        loss, and the next alternation continues from it.
        """
        eta_rows = self.row_eta(x, rule)
        for _ in range(rounds):
            if codes is None:
                with self._phase("encode"):
                    codes = self._encode_padded(x, rule, codebooks)
            with self._phase("codebook update"):
                codebooks = joint_codebook_update(x, codes, eta_rows, codebooks, max_iters=FIT_CG_ITERS)
            codes = None
            bar.update(1)
            bar.set_postfix_str(f"{rule}", refresh=False)
        return codebooks

    @torch.no_grad()  # x may be an nn.Parameter: fitting builds no autograd state
    def fit(
        self,
        x: Tensor,
        queries: Optional[Tensor] = None,
        iters: int = 5,
        progress: bool = True,
        max_rows: Optional[int] = MAX_FIT_ROWS,
        sampled_from: Optional[int] = None,
    ) -> "AnisotropicPQ":
        """Learn the codebooks from the rows ``x`` (``(N, dim)``, ``N >= 2**bits``); returns ``self``.

        Args:
            x: the vectors to quantize (e.g. the rows of an output layer's weight).
            queries: optional ``(B, dim)`` sample queries (e.g. hidden states); enables query
                calibration of the anisotropy (needs at least 20 rows; up to 2000 are used to
                select and up to 2000 others to check, scoring the training rows).
            iters: alternations of encoding and joint codebook update after k-means.
            progress: show a tqdm progress bar.
            max_rows: learn the codebooks from a seeded random sample of this many rows when
                ``x`` has more (``None``: all rows). Encoding all rows is ``encode``'s job.
            sampled_from: with ``max_rows=None``: ``x`` is the seeded sample of ``len(x)`` rows a
                ``max_rows`` fit would have drawn from this many rows (the row ids
                ``torch.randperm(sampled_from, generator=torch.Generator().manual_seed(seed))[:len(x)]``,
                in that order); the fit then equals that one. ``torchaq.distributed`` uses it.
        """
        self._check_fit_args(x, queries, iters, max_rows, progress)
        xp = self.pad(x)
        generator = torch.Generator().manual_seed(self.seed)
        if max_rows is not None:
            xp = sample_rows(xp, max_rows, generator)
        elif sampled_from is not None and sampled_from > xp.shape[0]:
            # x already is the seeded sample of len(x) rows out of `sampled_from` (drawn by a caller that
            # holds the rows elsewhere, e.g. torchaq.distributed): advance the generator as sampling would
            torch.randperm(int(sampled_from), generator=generator)
        rules = candidate_rules(self.rule) if queries is not None else [self.rule]
        # with calibration: the isotropic fit, a few rounds per candidate, then the winner's rest
        total = self.kmeans_iters + iters
        if queries is not None:
            total += 2 * (len(rules) - 1) + iters  # successive halving, then the winner (about)
        self.fit_seconds = {}
        with tqdm(total=total, desc="AnisotropicPQ.fit", disable=not progress, leave=False) as bar:
            bar.set_postfix_str("k-means", refresh=False)
            sample = sample_rows(xp, KMEANS_POINTS_PER_CODEWORD * self.num_codewords, generator)
            with self._phase("k-means"):
                start = subspace_kmeans(
                    sample, self.num_subspaces, self.num_codewords, self.kmeans_iters, generator, lambda: bar.update(1)
                )
            if queries is None:
                codebooks = self._alternate(xp, self.rule, start, iters, bar)
            else:
                codebooks = self._calibrate(xp, queries, start, rules, iters, generator, bar)
                bar.update(max(0, bar.total - bar.n))  # isotropic won: the winner's rounds were not needed
        self.codebooks = codebooks
        self.fitted = True
        self._fit_dtype = x.dtype
        return self

    def _calibrate(self, xp, queries, start, rules, iters, generator, bar) -> Tensor:
        """Pick the rule with the best held-out recall; never end worse than isotropic.

        Successive halving (:func:`torchaq.quantizers.calibrate.successive_halving`) on a seeded subsample
        of the rows: every candidate gets one alternation from the isotropic codebooks and is
        scored on the selection queries; the better half (never those below isotropic) gets
        another, and so on. Only the winner is trained on all rows (``iters`` alternations from its
        subsample codebooks). The check slice, disjoint from
        the selection slice, then compares the winner with the isotropic fit on the same rows.
        Cost: one isotropic fit, about ``2 c`` alternations on the subsample for ``c`` candidates,
        and the winner's ``iters`` alternations on all rows.
        """
        qp = self.pad(queries)[torch.randperm(queries.shape[0], generator=generator).to(queries.device)]
        half = min(PQ_CALIBRATION_QUERIES, qp.shape[0] // 2)
        select, check = qp[:half], qp[half : 2 * half]
        sub = sample_rows(xp, CALIBRATION_ROWS, generator)
        with self._phase("calibration scoring"):
            select_truth, check_truth = exact_top(select, sub), exact_top(check, sub)

        scored: Dict[AnisotropyRule, tuple] = {}  # rule -> (codebooks, codes of sub) of its last score

        def recall(rule: AnisotropyRule, codebooks: Tensor, q: Tensor, truth: Tensor) -> float:
            with self._phase("encode"):
                codes = self._encode_padded(sub, rule, codebooks)
            scored[rule] = (codebooks, codes)
            with self._phase("calibration scoring"):
                return retrieval_recall(q, sub, codes, codebooks, exact=truth)

        isotropic = rules[0]
        iso_codebooks = self._alternate(xp, isotropic, start, iters, bar)

        def train(rule: AnisotropyRule, codebooks: Optional[Tensor], rounds: int) -> Tensor:
            codebooks = iso_codebooks if codebooks is None else codebooks
            last = scored.get(rule)
            codes = last[1] if last is not None and last[0] is codebooks else None  # reuse the scoring encode
            return self._alternate(sub, rule, codebooks, rounds, bar, codes=codes)

        best_rule, best_codebooks, _, scores = successive_halving(
            rules, train, lambda rule, cb: recall(rule, cb, select, select_truth), iso_codebooks
        )
        if best_rule is isotropic:
            final, final_rule = iso_codebooks, isotropic
        else:
            final = self._alternate(xp, best_rule, best_codebooks, iters, bar)
            final_rule = best_rule
            # the check slice was not used to choose: fall back if the winner loses there
            if recall(best_rule, final, check, check_truth) < recall(isotropic, iso_codebooks, check, check_truth):
                final, final_rule = iso_codebooks, isotropic
        self.rule = final_rule
        self.calibration = scores
        return final

    # ---------------------------------------------------------------------------------------
    # encode / decode / lut / score
    # ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        """Anisotropic codes of the rows of ``x`` (``(N, dim)``) -> ``(N, M)`` uint8."""
        self.check_fitted()
        self._check_rows(x, "x")
        xp = self.pad(x).to(self.codebooks.device)
        return self._encode_padded(xp, self.rule).to(torch.uint8)

    @torch.no_grad()
    def decode(self, codes: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
        """Reconstruction ``x~`` of ``(N, M)`` codes -> ``(N, dim)`` in ``dtype`` (default: the dtype ``fit`` saw)."""
        self.check_fitted()
        codes = self._check_codes(codes).to(self.codebooks.device)
        out = self.unpad(decode(codes.long(), self.codebooks.float()))
        return out.to(self._fit_dtype if dtype is None else dtype)

    def lut(self, q: Tensor) -> Tensor:
        """Lookup tables ``LUT[b, m, j] = <q_m, C_m[j]>``: ``(..., dim)`` -> ``(..., M, 2**bits)`` float32."""
        self.check_fitted()
        check_features(q, self.dim, "q", self.codebooks.device, "quantizer")
        lead = q.shape[:-1]
        lut = self.lut_unchecked(q.reshape(-1, self.dim))
        return lut.reshape(lead + lut.shape[1:])

    def lut_unchecked(self, q: Tensor) -> Tensor:
        """:meth:`lut` of ``(B, dim)`` queries without its argument checks (the layer's hot path has
        checked them); the op overload is called directly, as its per-call overhead counts at batch 1."""
        return torch.ops.torchaq.compute_lut.default(self.pad(q), self.codebooks)

    # ---------------------------------------------------------------------------------------
    # nn.Module plumbing
    # ---------------------------------------------------------------------------------------
    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_subspaces={self.num_subspaces}, bits={self.bits}, rule={self.rule}, "
            f"bits_per_vector={self.num_subspaces * self.bits}, fitted={self.fitted}"
        )
