"""``torchaq.AnisotropicAQ``: additive quantization trained and encoded with the score-aware loss."""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor
from tqdm.auto import tqdm

from torchaq import ops
from torchaq.checks import check_features, check_int
from torchaq.quantizers.aq_update import aq_codebook_update
from torchaq.quantizers.aq_warm import WarmStarts, lookup, row_keys, row_perturbations
from torchaq.quantizers.calibrate import RECALL_CANDIDATES, RECALL_K, AnisotropyRule
from torchaq.quantizers.loss import score_aware_loss
from torchaq.quantizers.base import (
    MAX_FIT_ROWS,
    UNSET,
    ScoreAwareQuantizer,
    check_bits,
    parse_rule,
    sample_rows,
)

# alternations of (codebook update, encode) after the isotropic fit: every calibration candidate
# gets one, the winner the rest
CALIBRATION_ROUNDS = 3
# constant-eta candidates of the calibration (besides isotropic and the constructor's rule)
AQ_ETA_GRID = (2.0, 4.0)
# held-out queries of each calibration slice (selection, check) at most
AQ_CALIBRATION_QUERIES = 2500
# LSQ++ search: ICM sweeps after each start / perturbation, perturbed codes per round
ICM_ITERS = 4
PERTURBATIONS = 4
# iterated-local-search rounds inside fit (per alternation) and in encode
FIT_ILS_ITERS = 4
ENCODE_ILS_ITERS = 8
# LSQ++'s SR-D: after the codebook update of alternation t of T, every codeword gets Gaussian noise
# of per-dimension standard deviation SRD_SCALE * (1 - (t + 1) / T) ** SRD_POWER * std(x[:, i]) / M
SRD_SCALE = 1.0
SRD_POWER = 0.5


class AnisotropicAQ(ScoreAwareQuantizer):
    """Anisotropic additive quantizer: ``x ~ sum_m C_m[c_m]`` with full-width codewords.

    Each ``dim``-vector is written as the sum of one codeword from each of ``num_codebooks``
    (``M``) codebooks of ``K = 2**bits`` full-width codewords (additive quantization, Babenko &
    Lempitsky, CVPR 2014; LSQ / LSQ++, Martinez et al., ECCV 2016 / 2018). For inner products
    ``<q, x~> = sum_m <q, C_m[c_m]>``, so a query's lookup table ``LUT[m, j] = <q, C_m[j]>`` is one
    ``(M K, d)`` matrix product and the scan over the codes is exactly the PQ scan
    (:func:`torchaq.ops.lut_topk` / :func:`torchaq.ops.lut_score` over :func:`torchaq.ops.pack_codes`);
    only computing the LUT costs ``M K d`` instead of ``M K d / M``.

    Codes and codebooks minimise the score-aware loss ``eta |r_par|^2 + |r_perp|^2`` (Guo et al.,
    ICML 2020; :func:`torchaq.score_aware_loss`) instead of the reconstruction error:

    * encoding is LSQ++'s iterated local search over iterated conditional modes, with the
      parallel-residual term ``(eta - 1) <r, x>^2 / |x|^2`` in every move's cost
      (:func:`torchaq.ops.aq_encode`; greedy residual start, ``ICM_ITERS`` sweeps, then
      ``encode_ils_iters`` rounds of ``PERTURBATIONS`` random codes + ICM, keeping improvements);
    * the codebook update is the exact minimiser of the total loss over all codebooks at once
      (:func:`torchaq.quantizers.aq_update.aq_codebook_update`: least squares, conjugate gradients when
      anisotropic).

    ``fit`` starts as LSQ does (random codes, their least-squares codebooks, a search from those
    codes; a greedy residual start gets stuck in a far worse optimum), then alternates ``iters``
    rounds of (codebook update, encoding warm-started from the previous codes). The anisotropy
    is set as in :class:`torchaq.AnisotropicPQ` (``threshold=T``, ``eta=e`` or ``threshold=None``
    for isotropic). ``fit(x, queries=...)`` calibrates it as the PQ does: after the isotropic
    fit, each candidate (the constructor's rule and a grid of constant ``eta``) gets one round of
    its own (update, encoding) and is scored by held-out recall; the best one gets
    ``CALIBRATION_ROUNDS - 1`` more, and the fit falls back to isotropic if the result loses on a
    second held-out query slice.

    Training follows LSQ++ (Martinez et al., ECCV 2018): SR-D noise on the codebooks after each
    update (annealed to zero), ``FIT_ILS_ITERS`` local-search rounds per encoding, and ``encode``
    starts the rows ``fit`` trained on from the codes ``fit`` found (:mod:`torchaq.quantizers.aq_warm`).

    Cost: ``fit`` is ``O(rows * M K d)`` for inner products plus ``O(rows * M K)`` per ICM sweep
    and ``O(M K)`` per code change, ``O((M K)^3)`` per codebook update; ``encode`` of ``N`` rows
    is ``O(N M K d + N (1 + R) ICM_ITERS M K M)`` at most. The Gram matrix of all codewords is
    ``(M K)^2`` floats (8-bit codes: ``K = 256``, so keep ``M`` small).

    Args:
        dim: input dimension ``d``.
        num_codebooks: ``M`` (each code costs ``bits`` bits; ``M * bits`` bits per vector).
        bits: 4 (16 codewords per codebook) or 8 (256).
        threshold: the paper's ``T`` (> 0), or ``None`` for isotropic (default 0.2, as the PQ).
        eta: a constant ``h_par / h_perp`` (>= 1) instead of ``threshold``.
        seed: seeds the initialisation and the search's perturbations.
        encode_ils_iters: perturbation rounds of ``encode`` (more: lower loss, slower).
    """

    def __init__(
        self,
        dim: int,
        num_codebooks: int,
        bits: int = 4,
        threshold: Optional[float] = UNSET,  # type: ignore[assignment]
        eta: Optional[float] = None,
        seed: int = 0,
        encode_ils_iters: int = ENCODE_ILS_ITERS,
    ):
        super().__init__()
        dim = check_int(dim, "dim", low=1)
        num_codebooks = check_int(num_codebooks, "num_codebooks", low=1)
        bits = check_bits(bits)
        seed = check_int(seed, "seed", what="(it seeds the initialisation and the search)")
        self.encode_ils_iters = check_int(encode_ils_iters, "encode_ils_iters", low=0)
        self._init_quantizer(dim, num_codebooks, bits, seed, parse_rule(threshold, eta), (num_codebooks, 2**bits, dim))
        self._warm: Optional[WarmStarts] = None  # codes fit found for its rows (encode's warm starts)
        self._warm_key: Optional[tuple] = None

    codes_name = "num_codebooks"

    @property
    def num_codebooks(self) -> int:
        """``M``: codebooks, i.e. codes per vector (``num_subspaces``, the name the scan and the layer use)."""
        return self.num_subspaces

    # ---------------------------------------------------------------------------------------
    # argument checks
    # ---------------------------------------------------------------------------------------

    # ---------------------------------------------------------------------------------------
    # anisotropy and the two steps
    # ---------------------------------------------------------------------------------------
    def _perturbations(self, rounds: int, rows: int, generator: torch.Generator, device) -> Tensor:
        mk = self.num_codebooks * self.num_codewords
        return torch.randint(0, mk, (rounds, rows, PERTURBATIONS), generator=generator).to(device)

    def _search(self, x: Tensor, codebooks: Tensor, eta_rows: Tensor, codes: Optional[Tensor], rounds: int,
                generator: torch.Generator) -> Tensor:
        """LSQ++ codes (int64) of float32 rows; greedy start when ``codes`` is None."""
        greedy = codes is None
        start = torch.zeros((x.shape[0], self.num_codebooks), dtype=torch.int64, device=x.device) if greedy else codes
        perturb = self._perturbations(rounds, x.shape[0], generator, x.device)
        return ops.aq_encode(x.contiguous(), codebooks.contiguous(), start, eta_rows.contiguous(), perturb,
                             ICM_ITERS, greedy)

    def loss(self, x: Tensor, codes: Optional[Tensor] = None) -> Tensor:
        """Per-row score-aware loss of ``x`` under the current rule (encoding ``x`` if no codes)."""
        self.check_fitted()
        self._check_rows(x, "x")
        codes = self.encode(x) if codes is None else self._check_codes(codes)
        xf = x.float().to(self.codebooks.device)
        return score_aware_loss(xf, self._decode(codes.long().to(xf.device), self.codebooks.float()),
                                self.row_eta(xf))

    def _decode(self, codes: Tensor, codebooks: Tensor) -> Tensor:
        m = codebooks.shape[0]
        out = codebooks[0, codes[:, 0]].clone()
        for sub in range(1, m):
            out += codebooks[sub, codes[:, sub]]
        return out

    # ---------------------------------------------------------------------------------------
    # fit
    # ---------------------------------------------------------------------------------------
    def _init(self, x: Tensor, generator: torch.Generator):
        """LSQ's start: random codes, the least-squares codebooks for them, then ICM from those codes."""
        codes = torch.randint(0, self.num_codewords, (x.shape[0], self.num_codebooks), generator=generator)
        codes = codes.to(x.device)
        eta_rows = torch.ones(x.shape[0], dtype=torch.float32, device=x.device)
        books = x.new_zeros(self.num_codebooks, self.num_codewords, self.dim)
        books = aq_codebook_update(x, codes, eta_rows, books)
        return books, self._search(x, books, eta_rows, codes, FIT_ILS_ITERS, generator)

    def _alternate(self, x, rule, codebooks, codes, rounds, generator, bar, schedule=None):
        """``rounds`` of (joint codebook update, SR-D noise, warm-started LSQ++ encoding) for ``rule``,
        then a last codebook update for the final codes. Returns ``(codebooks, codes)``.

        ``schedule = (first, total)``: these are rounds ``first .. first + rounds - 1`` of an
        annealing over ``total`` rounds (default: ``(0, rounds)``); the noise of round ``t`` is
        LSQ++'s SR-D (Martinez et al., ECCV 2018), ``SRD_SCALE (1 - (t+1)/total)^SRD_POWER std(x) / M``
        per dimension, so the last round of the schedule adds none.
        """
        eta_rows = self.row_eta(x, rule)
        first, total = (0, rounds) if schedule is None else schedule
        std = x.std(0) if x.shape[0] > 1 else torch.zeros_like(x[0])
        for t in range(first, first + rounds):
            codebooks = aq_codebook_update(x, codes, eta_rows, codebooks)
            temperature = max(0.0, 1.0 - (t + 1) / total) ** SRD_POWER if total > 0 else 0.0
            if SRD_SCALE > 0 and temperature > 0:
                noise = torch.randn(codebooks.shape, generator=generator).to(x.device)
                codebooks = codebooks + (SRD_SCALE * temperature / self.num_codebooks) * noise * std
            codes = self._search(x, codebooks, eta_rows, codes, FIT_ILS_ITERS, generator)
            bar.update(1)
            bar.set_postfix_str(f"{rule}", refresh=False)
        return aq_codebook_update(x, codes, eta_rows, codebooks), codes

    @torch.no_grad()  # x may be an nn.Parameter: fitting builds no autograd state
    def fit(
        self,
        x: Tensor,
        queries: Optional[Tensor] = None,
        iters: int = 4,
        progress: bool = True,
        max_rows: Optional[int] = MAX_FIT_ROWS,
        sampled_from: Optional[int] = None,
    ) -> "AnisotropicAQ":
        """Learn the codebooks from the rows ``x`` (``(N, dim)``, ``N >= 2**bits``); returns ``self``.

        Args:
            x: the vectors to quantize (e.g. the rows of an output layer's weight).
            queries: optional ``(B, dim)`` sample queries (e.g. hidden states); enables query
                calibration of the anisotropy (at least 20 rows; up to 1000 select, up to 1000
                others check, scoring the training rows).
            iters: alternations of joint codebook update and encoding after the initialisation.
            progress: show a tqdm progress bar.
            max_rows: learn from a seeded random sample of this many rows when ``x`` has more
                (``None``: all rows). Encoding all rows is ``encode``'s job.
            sampled_from: with ``max_rows=None``: ``x`` is the seeded sample of ``len(x)`` rows a
                ``max_rows`` fit would have drawn from this many rows (the row ids
                ``torch.randperm(sampled_from, generator=torch.Generator().manual_seed(seed))[:len(x)]``,
                in that order); the fit then equals that one. ``torchaq.distributed`` uses it.
        """
        self._check_fit_args(x, queries, iters, max_rows, progress)
        xf = x.float()
        generator = torch.Generator().manual_seed(self.seed)
        if max_rows is not None:
            xf = sample_rows(xf, int(max_rows), generator)
        elif sampled_from is not None and sampled_from > xf.shape[0]:
            # x already is the seeded sample of len(x) rows out of `sampled_from` (drawn by a caller that
            # holds the rows elsewhere, e.g. torchaq.distributed): advance the generator as sampling would
            torch.randperm(int(sampled_from), generator=generator)
        xf = xf.contiguous()
        rules = self._candidate_rules() if queries is not None else [self.rule]
        calib_rounds = min(CALIBRATION_ROUNDS, iters)
        total = 1 + iters
        if queries is not None:
            total += len(rules) - 1 + max(0, calib_rounds - 1)
        with tqdm(total=total, desc="AnisotropicAQ.fit", disable=not progress, leave=False) as bar:
            bar.set_postfix_str("init", refresh=False)
            start, start_codes = self._init(xf, generator)
            bar.update(1)
            if queries is None:
                eta_rows = self.row_eta(xf)
                if self.rule.kind != "isotropic":
                    start_codes = self._search(xf, start, eta_rows, start_codes, 0, generator)
                codebooks, codes = self._alternate(xf, self.rule, start, start_codes, iters, generator, bar)
            else:
                codebooks, codes = self._calibrate(xf, queries, start, start_codes, rules, iters, calib_rounds,
                                                   generator, bar)
                bar.update(bar.total - bar.n)
        self.codebooks = codebooks.contiguous()
        self.fitted = True
        self._fit_dtype = x.dtype
        # encode() starts the rows fit saw from the codes fit found for them (torchaq.quantizers.aq_warm)
        self._warm = WarmStarts(xf, codes)
        self._warm_key = self._codebooks_key()
        return self

    def _codebooks_key(self) -> tuple:
        return (self.codebooks.data_ptr(), self.codebooks._version, str(self.rule))

    def warm_state(self) -> Optional[dict]:
        """The warm starts of :meth:`encode` for the current codebooks (row keys and codes, CPU), or None.

        Not part of ``state_dict``; :class:`torchaq.distributed.VocabParallelQuantizedSoftmax` sends
        it with the fitted state so that every rank encodes its rows as the fitting rank would.
        """
        if self._warm is None or self._warm_key != self._codebooks_key():
            return None
        return {"keys": self._warm.keys.cpu(), "codes": self._warm.codes.cpu()}

    def load_warm_state(self, state: Optional[dict]) -> None:
        """Install :meth:`warm_state` of a quantizer with the same codebooks (after ``load_state_dict``)."""
        if state is None:
            self._warm = self._warm_key = None
            return
        keys, codes = state["keys"], state["codes"]
        if keys.dim() != 1 or codes.dim() != 2 or codes.shape != (keys.shape[0], self.num_codebooks):
            raise ValueError(f"warm state must hold (T,) keys and (T, {self.num_codebooks}) codes, "
                             f"got {tuple(keys.shape)} and {tuple(codes.shape)}")
        warm = WarmStarts.__new__(WarmStarts)
        warm.keys, warm.codes = keys.to(self.codebooks.device), codes.to(self.codebooks.device, torch.uint8)
        self._warm, self._warm_key = warm, self._codebooks_key()

    def _candidate_rules(self) -> List[AnisotropyRule]:
        rules = [AnisotropyRule("isotropic"), self.rule] + [AnisotropyRule("eta", v) for v in AQ_ETA_GRID]
        return list(dict.fromkeys(rules))

    def _recall(self, q: Tensor, x: Tensor, codes: Tensor, codebooks: Tensor) -> float:
        """``0.5 (recall 10@10 + recall 10@100)`` of the exact inner-product top-10 (as the PQ calibration)."""
        n = x.shape[0]
        k, cand = min(RECALL_K, n), min(RECALL_CANDIDATES, n)
        exact = (q @ x.T).topk(k, dim=1).indices
        lut = self._lut(q, codebooks)
        approx = ops.lut_score(lut, ops.pack_codes(codes.to(torch.uint8), self.bits), n)
        top = approx.topk(cand, dim=1).indices
        hit_k = (exact.unsqueeze(2) == top[:, :k].unsqueeze(1)).any(2).float().mean()
        hit_c = (exact.unsqueeze(2) == top.unsqueeze(1)).any(2).float().mean()
        return 0.5 * float(hit_k + hit_c)

    def _calibrate(self, x, queries, start, start_codes, rules, iters, calib_rounds, generator, bar):
        """Pick the rule with the best held-out recall; never end worse than isotropic on the check slice.

        The isotropic fit runs first, exactly as without queries (the query split has its own
        generator). Every other rule re-encodes the isotropic codes under its loss and gets
        one round of (its codebook update, its encoding) from there, without SR-D noise, and is
        scored by recall on the selection slice; the best one gets ``calib_rounds - 1`` more rounds
        and replaces the isotropic result only if it also wins on the check slice, which took no
        part in the choice. Cost: ``iters + (candidates - 1) + calib_rounds - 1`` rounds, the
        anisotropic ones dearer (conjugate gradients in the codebook update).
        Returns ``(codebooks, codes)``.
        """
        qgen = torch.Generator().manual_seed(self.seed + 2)
        qf = queries.float()[torch.randperm(queries.shape[0], generator=qgen).to(queries.device)]
        half = min(AQ_CALIBRATION_QUERIES, qf.shape[0] // 2)
        select, check = qf[:half], qf[half: 2 * half]
        isotropic = rules[0]
        iso = self._alternate(x, isotropic, start, start_codes, iters, generator, bar)
        scores = {str(isotropic): self._recall(select, x, iso[1], iso[0])}
        best_rule, best = isotropic, iso
        for rule in rules[1:]:
            codes = self._search(x, iso[0], self.row_eta(x, rule), iso[1], 0, generator)
            books, codes = self._alternate(x, rule, iso[0], codes, min(1, calib_rounds), generator, bar, schedule=(0, 0))
            scores[str(rule)] = self._recall(select, x, codes, books)
            if scores[str(rule)] > scores[str(best_rule)]:
                best_rule, best = rule, (books, codes)
        final, final_rule = iso, isotropic
        if best_rule is not isotropic:
            best = self._alternate(x, best_rule, best[0], best[1], calib_rounds - 1, generator, bar, schedule=(0, 0))
            # the check slice was not used to choose: keep isotropic unless the winner also wins there
            if self._recall(check, x, best[1], best[0]) >= self._recall(check, x, iso[1], iso[0]):
                final, final_rule = best, best_rule
        self.rule = final_rule
        self.calibration = scores
        return final

    # ---------------------------------------------------------------------------------------
    # encode / decode / lut / score
    # ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        """Score-aware LSQ++ codes of the rows of ``x`` (``(N, dim)``) -> ``(N, M)`` uint8.

        A row that the last ``fit`` trained on (matched exactly, :mod:`torchaq.quantizers.aq_warm`) starts its
        search from the codes ``fit`` ended with; any other row from the greedy residual encoding.
        Either way ``encode_ils_iters`` rounds of iterated local search follow, which never raise
        a row's loss above its start's. The warm starts live only in the fitted object (not in
        ``state_dict``): a loaded quantizer encodes every row from the greedy start.
        Deterministic per row: a row's perturbations are drawn from its exact key and ``seed``
        (:func:`torchaq.quantizers.aq_warm.row_perturbations`), so its codes do not depend on the batch.
        """
        self.check_fitted()
        self._check_rows(x, "x")
        xf = x.float().to(self.codebooks.device).contiguous()
        books, eta_rows = self.codebooks.float().contiguous(), self.row_eta(xf).contiguous()
        warm = lookup(self._warm, xf) if self._warm_key == self._codebooks_key() else None
        found, start = warm if warm is not None else (None, torch.zeros((xf.shape[0], self.num_codebooks),
                                                                       dtype=torch.int64, device=xf.device))
        perturb = row_perturbations(row_keys(xf), self.encode_ils_iters, PERTURBATIONS,
                                    self.num_codebooks * self.num_codewords, self.seed + 1)
        if found is None:
            return ops.aq_encode(xf, books, start, eta_rows, perturb, ICM_ITERS, True).to(torch.uint8)
        codes = start.clone()
        for rows, greedy in ((found.nonzero().squeeze(1), False), ((~found).nonzero().squeeze(1), True)):
            if rows.numel():
                codes[rows] = ops.aq_encode(xf[rows], books, start[rows], eta_rows[rows].contiguous(),
                                            perturb[:, rows].contiguous(), ICM_ITERS, greedy)
        return codes.to(torch.uint8)

    @torch.no_grad()
    def decode(self, codes: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
        """``x~ = sum_m C_m[codes[:, m]]``: ``(N, M)`` codes -> ``(N, dim)`` in ``dtype`` (default: the dtype ``fit`` saw)."""
        self.check_fitted()
        codes = self._check_codes(codes).to(self.codebooks.device)
        out = self._decode(codes.long(), self.codebooks.float())
        return out.to(self._fit_dtype if dtype is None else dtype)

    def _lut(self, q: Tensor, codebooks: Tensor) -> Tensor:
        m, k, d = codebooks.shape
        return (q.float() @ codebooks.reshape(m * k, d).T).reshape(q.shape[0], m, k).contiguous()

    def lut(self, q: Tensor) -> Tensor:
        """Lookup tables ``LUT[b, m, j] = <q, C_m[j]>``: ``(..., dim)`` -> ``(..., M, 2**bits)`` float32 (one ``h @ C^T``)."""
        self.check_fitted()
        check_features(q, self.dim, "q", self.codebooks.device, "quantizer")
        lead = q.shape[:-1]
        lut = self.lut_unchecked(q.reshape(-1, self.dim))
        return lut.reshape(lead + lut.shape[1:])

    def lut_unchecked(self, q: Tensor) -> Tensor:
        """:meth:`lut` of ``(B, dim)`` queries without its argument checks (the layer's hot path has checked them)."""
        return self._lut(q, self.codebooks)

    # ---------------------------------------------------------------------------------------
    # nn.Module plumbing
    # ---------------------------------------------------------------------------------------
    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_codebooks={self.num_codebooks}, bits={self.bits}, rule={self.rule}, "
            f"bits_per_vector={self.num_codebooks * self.bits}, fitted={self.fitted}"
        )
