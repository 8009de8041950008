"""Search quality of anisotropic PQ: torchaq against FAISS fast scan and ScaNN at equal bits.

For every setting and method the benchmark takes the 100 best candidates by approximate inner
product and reports, over held-out queries (``gt`` = the exact top-10 by ``q @ x.T``):

* ``R@10``    -- recall@10: ``|gt ∩ first 10 candidates| / 10``;
* ``RR@10``   -- recall@10 after exact re-rank of the 100 candidates:
  ``|gt ∩ top-10 of the 100 by exact score| / 10``;
* ``R1@10``   -- (synthetic only) the paper's Recall1@10: the exact top-1 is among the first 10;
* ``fit s``   -- seconds to build the index: ``fit`` + ``encode`` (torchaq), ``train`` + ``add``
  (FAISS), ``build`` (ScaNN).

Settings:

1. **real** (d = 384): the database is the vocabulary table of all-MiniLM-L6-v2 (30522 rows),
   the queries its contextual hidden states on real English text (``examples/real_data.py``);
   4-bit codes with M = 96 (384 bits/class) and M = 192 (768 bits/class). Calibration queries
   (``queries=``) and evaluation queries come from disjoint text passages.
2. **synthetic** -- the paper's setting (Guo et al. 2020, section 5): unit-norm data
   (normalised Gaussian rows, N = 100000 by default, d = 100), queries uniform on the unit sphere,
   4-bit codes with M = 50 (200 bits/class).

Methods: torchaq isotropic (``threshold=None``), torchaq with a fixed threshold ``T``,
torchaq query-calibrated (``fit(x, queries=calibration)``), FAISS ``IndexPQFastScan``
(same M, 4-bit, inner product) and ScaNN brute-force ``score_ah`` (LUT16, same blocks;
isotropic and each ``T``) when the ``scann`` wheel is installed.

    python benchmarks/quality.py                 # the table (a few minutes on 2 cores)
    python benchmarks/quality.py --fit-timing    # time AnisotropicPQ.fit at V=256k, d=1024, M=256

Results are printed and written to ``benchmarks/results/quality.txt``
(``benchmarks/results/fit_timing.txt`` for ``--fit-timing``).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import RESULTS, emit, environment  # noqa: E402  (header, writer)

NUM_CANDIDATES = 100
K = 10


# ----------------------------------------------------------------------------- optional deps
def _try_import(name: str):
    try:
        return __import__(name), None
    except Exception as e:  # noqa: BLE001 - any import failure means "not available"
        return None, f"{type(e).__name__}: {e}"


def _torchaq_pq():
    """``torchaq.AnisotropicPQ`` or None (with the reason) when it cannot be imported."""
    try:
        import torchaq

        return torchaq.AnisotropicPQ, None
    except Exception as e:  # noqa: BLE001
        return None, f"{type(e).__name__}: {e}"


def _scann_builder():
    """``scann.scann_ops_pybind.builder`` or None (with the reason)."""
    try:
        from scann.scann_ops.py import scann_ops_pybind

        return scann_ops_pybind.builder, None
    except Exception as e:  # noqa: BLE001
        return None, f"{type(e).__name__}: {e}"


# ----------------------------------------------------------------------------- evaluation
@dataclass
class Setting:
    """One database/query set and one code size."""
    key: str
    title: str
    table: torch.Tensor          # (N, d) float32 database
    calib: torch.Tensor          # (Bc, d) calibration queries (for queries=)
    queries: torch.Tensor        # (B, d) evaluation queries
    num_subspaces: int
    synthetic: bool = False
    exact: torch.Tensor = field(init=False)   # (B, N) exact scores
    gt: torch.Tensor = field(init=False)      # (B, K) exact top-K ids

    def __post_init__(self):
        self.exact = self.queries @ self.table.T
        self.gt = self.exact.topk(K, dim=1).indices

    @property
    def bits(self) -> int:
        return 4 * self.num_subspaces


@dataclass
class Result:
    r10: float = math.nan
    rr10: float = math.nan
    r1_10: float = math.nan
    fit_s: float = math.nan
    note: str = ""


def score_candidates(s: Setting, cands: torch.Tensor, fit_s: float, note: str = "") -> Result:
    """Recall numbers of a (B, >=100) candidate-id matrix ordered by approximate score."""
    cands = cands[:, :NUM_CANDIDATES].long()
    first = cands[:, :K]
    hit = (first[:, :, None] == s.gt[:, None, :]).any(1)           # (B, K) gt found in first 10
    exact_c = s.exact.gather(1, cands.clamp_min(0))
    exact_c[cands < 0] = -math.inf                                  # FAISS pads with -1
    rer = cands.gather(1, exact_c.topk(K, dim=1).indices)
    hit_rr = (rer[:, :, None] == s.gt[:, None, :]).any(1)
    r1 = (first == s.gt[:, :1]).any(1)
    return Result(hit.float().mean().item(), hit_rr.float().mean().item(),
                  r1.float().mean().item(), fit_s, note)


def _topk_chunked(score_fn: Callable[[torch.Tensor], torch.Tensor], q: torch.Tensor,
                  chunk: int = 256) -> torch.Tensor:
    return torch.cat([score_fn(q[i:i + chunk]).topk(NUM_CANDIDATES, dim=1).indices
                      for i in range(0, q.shape[0], chunk)])


# ----------------------------------------------------------------------------- methods
def _describe_pq(pq) -> str:
    """The anisotropy a fitted quantizer ended with (calibration records it on the object)."""
    rule = getattr(pq, "rule", None)
    if rule is not None:
        return f"chosen rule: {rule}"
    for name in ("threshold", "eta"):
        v = getattr(pq, name, None)
        if isinstance(v, (int, float)):
            return f"chosen {name}={v:g}"
    return ""


def _fit_and_score(quantizer_cls, s: Setting, threshold: Optional[float], calibrate: bool, iters: Optional[int],
                   args, split_times: bool) -> Result:
    """Fit a torchaq quantizer (+ calibration queries), encode the table, LUT scores, top-100."""
    kwargs = {"progress": args.progress}
    if iters is not None:
        kwargs["iters"] = iters
    if calibrate:
        kwargs["queries"] = s.calib
    torch.manual_seed(0)
    t0 = time.perf_counter()
    quantizer = quantizer_cls(s.table.shape[1], s.num_subspaces, bits=4, threshold=threshold, seed=0)
    quantizer.fit(s.table, **kwargs)
    t1 = time.perf_counter()
    codes = quantizer.encode(s.table)
    t2 = time.perf_counter()
    cands = _topk_chunked(lambda q: quantizer.score(q, codes), s.queries)
    notes = [f"fit {t1 - t0:.1f} s + encode {t2 - t1:.1f} s"] if split_times else []
    if calibrate:
        notes.append(_describe_pq(quantizer))
    return score_candidates(s, cands, t2 - t0, "; ".join(notes))


def run_torchaq(s: Setting, threshold: Optional[float], calibrate: bool, args) -> Result:
    """torchaq.AnisotropicPQ: fit (+ calibration queries) + encode, LUT scores, top-100."""
    AnisotropicPQ, why = _torchaq_pq()
    if AnisotropicPQ is None:
        return Result(note=f"torchaq.AnisotropicPQ unavailable ({why})")
    return _fit_and_score(AnisotropicPQ, s, threshold, calibrate, args.iters, args, split_times=False)


def run_faiss(s: Setting, args) -> Result:
    """FAISS IndexPQFastScan(d, M, 4 bits, inner product): train + add, search k=100."""
    faiss, why = _try_import("faiss")
    if faiss is None:
        return Result(note=f"faiss unavailable ({why})")
    d = s.table.shape[1]
    xb = s.table.numpy()
    t0 = time.perf_counter()
    index = faiss.IndexPQFastScan(d, s.num_subspaces, 4, faiss.METRIC_INNER_PRODUCT)
    index.train(xb)
    index.add(xb)
    fit_s = time.perf_counter() - t0
    _, ids = index.search(s.queries.numpy(), NUM_CANDIDATES)
    return score_candidates(s, torch.from_numpy(ids.astype("int64")), fit_s)


def run_scann(s: Setting, threshold: Optional[float], args) -> Result:
    """ScaNN brute-force asymmetric hashing (LUT16, d/M dims per block), no reorder, top-100."""
    builder, why = _scann_builder()
    if builder is None:
        return Result(note=f"scann unavailable ({why})")
    d = s.table.shape[1]
    if d % s.num_subspaces:
        return Result(note="ScaNN run only with equal blocks")
    xb = s.table.numpy()
    t0 = time.perf_counter()
    searcher = (builder(xb, NUM_CANDIDATES, "dot_product")
                .score_ah(d // s.num_subspaces,
                          anisotropic_quantization_threshold=(
                              float("nan") if threshold is None else threshold),
                          training_sample_size=xb.shape[0])
                .build())
    fit_s = time.perf_counter() - t0
    ids, _ = searcher.search_batched(s.queries.numpy(), final_num_neighbors=NUM_CANDIDATES)
    return score_candidates(s, torch.from_numpy(ids.astype("int64")), fit_s)


def run_torchaq_aq(s: Setting, threshold: Optional[float], calibrate: bool, args) -> Result:
    """torchaq.AnisotropicAQ (additive codes, M codebooks x 4 bits): fit (+ calibration) + encode, LUT scores."""
    try:
        from torchaq import AnisotropicAQ
    except Exception as e:  # noqa: BLE001
        return Result(note=f"torchaq.AnisotropicAQ unavailable ({type(e).__name__}: {e})")
    return _fit_and_score(AnisotropicAQ, s, threshold, calibrate, args.aq_iters, args, split_times=True)


def aq_method_list(args) -> list[tuple[str, Callable[[Setting], Result]]]:
    """Rows of the additive-codes comparison (``--aq``): torchaq AQ against FAISS LSQ fast-scan."""
    return [
        ("torchaq AQ isotropic", lambda s: run_torchaq_aq(s, None, False, args)),
        ("torchaq AQ calibrated (queries=)", lambda s: run_torchaq_aq(s, args.calib_threshold, True, args)),
        ("FAISS LSQ fast-scan 4-bit", lambda s: run_faiss_lsq(s, args)),
    ]


def run_faiss_lsq(s: Setting, args) -> Result:
    """FAISS IndexLocalSearchQuantizerFastScan (LSQ++ additive codes, 4-bit, inner-product LUT).

    Trained on the first ``args.lsq_train_rows`` rows (``lsq.train_iters`` = ``args.lsq_train_iters``,
    ``lsq.encode_ils_iters`` = ``args.lsq_encode_ils_iters``), all rows added, search k=100.
    """
    faiss, why = _try_import("faiss")
    if faiss is None:
        return Result(note=f"faiss unavailable ({why})")
    d = s.table.shape[1]
    xb = s.table.numpy()
    t0 = time.perf_counter()
    index = faiss.IndexLocalSearchQuantizerFastScan(
        d, s.num_subspaces, 4, faiss.METRIC_INNER_PRODUCT, faiss.AdditiveQuantizer.ST_LUT_nonorm)
    index.lsq.train_iters = args.lsq_train_iters
    index.lsq.encode_ils_iters = args.lsq_encode_ils_iters
    index.train(xb[:args.lsq_train_rows])
    t1 = time.perf_counter()
    index.add(xb)
    t2 = time.perf_counter()
    _, ids = index.search(s.queries.numpy(), NUM_CANDIDATES)
    return score_candidates(s, torch.from_numpy(ids.astype("int64")), t2 - t0,
                            f"train {t1 - t0:.1f} s (on {min(args.lsq_train_rows, xb.shape[0])} rows) "
                            f"+ add {t2 - t1:.1f} s")


# ----------------------------------------------------------------------------- settings
def unit_sphere(n: int, d: int, gen: torch.Generator) -> torch.Tensor:
    """``n`` points uniform on the unit sphere in R^d (normalised Gaussians)."""
    x = torch.randn(n, d, generator=gen)
    return x / x.norm(dim=1, keepdim=True)


def build_settings(args) -> list[Setting]:
    settings = []
    if not args.skip_real:
        from examples.real_data import load_minilm, split

        need = args.calib_queries + args.eval_queries
        # 20k is the size other benchmarks load too: one cache file serves them all
        table, queries = load_minilm(num_queries=max(20_000, need), seed=args.seed,
                                     progress=args.progress)
        calib, evalq = split(queries[:need], args.calib_queries / need)
        for m in args.real_m:
            settings.append(Setting(f"real{4 * m}", f"real d=384 {4 * m}b (M={m})",
                                    table, calib, evalq, m))
    if not args.skip_synthetic:
        gen = torch.Generator().manual_seed(args.seed)
        n, d = args.synthetic_n, 100
        data = unit_sphere(n, d, gen)
        calib = unit_sphere(args.calib_queries, d, gen)
        evalq = unit_sphere(args.eval_queries, d, gen)
        settings.append(Setting("synth200", f"paper setting d=100 200b (M=50)", data, calib,
                                evalq, 50, synthetic=True))
    return settings


def method_list(args) -> list[tuple[str, Callable[[Setting], Result]]]:
    """(row label, runner) for every method in the table, in print order."""
    rows = [("torchaq isotropic", lambda s: run_torchaq(s, None, False, args))]
    for t in args.thresholds:
        rows.append((f"torchaq T={t:g}", lambda s, t=t: run_torchaq(s, t, False, args)))
    rows.append(("torchaq calibrated (queries=)",
                 lambda s: run_torchaq(s, args.calib_threshold, True, args)))
    rows.append(("FAISS PQFastScan 4-bit", lambda s: run_faiss(s, args)))
    rows.append(("ScaNN AH isotropic", lambda s: run_scann(s, None, args)))
    for t in args.thresholds:
        rows.append((f"ScaNN AH T={t:g}", lambda s, t=t: run_scann(s, t, args)))
    return rows


# ----------------------------------------------------------------------------- output
def format_table(settings: list[Setting], labels: list[str],
                 results: dict[tuple[str, str], Result]) -> str:
    cols: list[tuple[str, str, str]] = []  # (setting key, metric attr, header)
    for s in settings:
        cols += [(s.key, "r10", "R@10"), (s.key, "rr10", "RR@10")]
        if s.synthetic:
            cols.append((s.key, "r1_10", "R1@10"))
        cols.append((s.key, "fit_s", "fit s"))
    lw = max(len(l) for l in labels) + 1
    cw = 7
    group = " " * lw
    for s in settings:
        n = 4 if s.synthetic else 3
        width = n * (cw + 1) - 1
        group += "|" + s.title[:width].center(width)
    head = " " * lw + "".join("|" + h.rjust(cw) for _, _, h in cols)
    lines = [group, head, "-" * len(head)]
    notes = []
    for label in labels:
        cells = []
        for key, attr, _ in cols:
            r = results.get((label, key), Result())
            v = getattr(r, attr)
            cells.append("-".rjust(cw) if math.isnan(v)
                         else (f"{v:.1f}" if attr == "fit_s" else f"{v:.3f}").rjust(cw))
        lines.append(label.ljust(lw) + "".join("|" + c for c in cells))
        for s in settings:
            r = results.get((label, s.key))
            if r is not None and r.note:
                notes.append(f"  {label} @ {s.key}: {r.note}")
    if notes:
        lines += ["", "notes:"] + list(dict.fromkeys(notes))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- fit timing
FIT_PHASES = ("k-means", "encode", "codebook update", "calibration scoring")


def low_rank_head(v: int, d: int, num_queries: int, rank: int = 64, seed: int = 0):
    """Synthetic output layer and hidden states: rows and queries in one ``rank``-dim subspace (+ noise).

    Rows have norm ~1; queries are scaled so that the softmax over the rows has an entropy of a
    few nats, like a trained LM head.
    """
    gen = torch.Generator().manual_seed(seed)
    rank = min(rank, d)
    basis = torch.linalg.qr(torch.randn(d, rank, generator=gen))[0].T  # (rank, d) orthonormal
    rows = torch.randn(v, rank, generator=gen) @ basis / math.sqrt(rank) + 0.05 * torch.randn(v, d, generator=gen) / math.sqrt(d)
    queries = torch.randn(num_queries, rank, generator=gen) @ basis * 3.0
    return rows, queries


def _time(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def fit_timing_row(label: str, x: torch.Tensor, queries: Optional[torch.Tensor], m: int, args) -> list:
    """One table row: calibrated (or fixed-rule) fit with its phases, then encodes of all rows."""
    AnisotropicPQ, _ = _torchaq_pq()
    from torchaq.ops.encode import l2_encode

    v, d = x.shape
    kwargs = {"progress": args.progress}
    if args.iters is not None:
        kwargs["iters"] = args.iters
    pq = AnisotropicPQ(d, m, bits=4, threshold=args.timing_threshold, seed=0)
    _, t_fit = _time(lambda: pq.fit(x, queries=queries, **kwargs))
    phases = [pq.fit_seconds.get(p, 0.0) for p in FIT_PHASES]
    _, t_enc = _time(lambda: pq.encode(x))
    xp = pq.pad(x)
    _, t_l2 = _time(lambda: l2_encode(xp, pq.codebooks))
    return [label, f"{v} x {d}", m, "yes" if queries is not None else "no", f"{t_fit:.1f}"] + \
        [f"{t:.1f}" for t in phases] + [f"{t_fit - sum(phases):.1f}", f"{t_enc:.1f}", f"{t_l2:.1f}", str(pq.rule)]


def encode_timing(v: int, d: int, m: int) -> list:
    """Rows of the encoder table: the C++ ops on ``v`` synthetic rows, codebooks from the rows."""
    from torchaq import ops
    from torchaq.quantizers.loss import eta as sphere_eta

    x, _ = low_rank_head(v, d, 1)
    dsub = d // m
    gen = torch.Generator().manual_seed(1)
    cb = x[torch.randperm(v, generator=gen)[:16]].reshape(16, m, dsub).transpose(0, 1).contiguous()
    rows = []
    cases = [("L2 (pq_encode)", None), ("anisotropic, eta = 4", torch.full((v,), 4.0)),
             ("anisotropic, threshold = 0.2", sphere_eta(0.2, d, x.norm(dim=1)).float())]
    for label, eta in cases:
        c0 = time.process_time()
        if eta is None:
            _, wall = _time(lambda: ops.pq_encode(x, cb))
        else:
            _, wall = _time(lambda: ops.anisotropic_encode(x, cb, eta, 10))
        rows.append([label, f"{v} x {d}", m, f"{wall:.1f}", f"{time.process_time() - c0:.1f}"])
    return rows


def fit_timing(args) -> str:
    """Time AnisotropicPQ.fit per phase and the encoders, at LLM-head sizes (and the MiniLM head)."""
    from benchmarks.common import markdown_table

    header = ["setting", "V x d", "M", "queries", "fit s", *[f"{p} s" for p in FIT_PHASES], "other s",
              "aniso encode all V s", "L2 encode all V s", "rule"]
    enc_header = ["encoder (C++ op)", "rows x d", "M", "wall s", "CPU s (all threads)"]
    enc_rows = []
    for spec in args.timing_rows:
        v, d, m = (int(t) for t in spec.split("x"))
        enc_rows += encode_timing(v, d, m)
    print(markdown_table(enc_header, enc_rows), flush=True)
    rows = []
    for spec in args.timing_rows:
        v, d, m = (int(t) for t in spec.split("x"))
        x, q = low_rank_head(v, d, args.calib_queries)
        rows.append(fit_timing_row(f"synthetic low-rank", x, q, m, args))
        print(markdown_table(header, rows[-1:]), flush=True)
        del x, q
    if args.timing_minilm:
        from examples.real_data import load_minilm, split

        need = args.calib_queries + args.eval_queries
        table, queries = load_minilm(num_queries=max(20_000, need), seed=args.seed, progress=args.progress)
        calib, _ = split(queries[:need], args.calib_queries / need)
        for m in args.real_m:
            rows.append(fit_timing_row("MiniLM head (real)", table, calib, m, args))
            print(markdown_table(header, rows[-1:]), flush=True)
    lines = [
        "command: python benchmarks/quality.py " + " ".join(sys.argv[1:]),
        f"AnisotropicPQ.fit (4-bit, threshold={args.timing_threshold}, iters="
        f"{args.iters if args.iters is not None else 'default'}, {args.calib_queries} calibration queries) "
        "with the seconds of each phase (AnisotropicPQ.fit_seconds, wall clock), then a full anisotropic "
        "encode and a plain L2 encode of all V rows with the fitted codebooks.",
        "targets (issue 12): aniso encode of 32768 rows at d=4096, M=2048 <= 8 s; calibrated fit of "
        "32768 x 4096 <= 120 s; calibrated fit of the MiniLM head at M=192 <= 30 s.",
        environment(),
        "",
        markdown_table(enc_header, enc_rows),
        "",
        markdown_table(header, rows),
    ]
    if args.timing_faiss and args.timing_rows:
        faiss, why = _try_import("faiss")
        if faiss is not None:
            v, d, m = (int(t) for t in args.timing_rows[0].split("x"))
            x, _ = low_rank_head(v, d, 1)
            t0 = time.perf_counter()
            index = faiss.IndexPQFastScan(d, m, 4, faiss.METRIC_INNER_PRODUCT)
            index.train(x.numpy())
            index.add(x.numpy())
            lines.append(f"reference, FAISS IndexPQFastScan train+add at {v} x {d}, M={m}: "
                         f"{time.perf_counter() - t0:.1f} s")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--fit-timing", action="store_true",
                    help="only time AnisotropicPQ.fit per phase at LLM-head sizes (minutes)")
    ap.add_argument("--timing-rows", nargs="*", default=["32768x4096x2048"],
                    help="synthetic low-rank heads VxDxM for --fit-timing")
    ap.add_argument("--timing-minilm", action="store_true",
                    help="--fit-timing also fits the real MiniLM head (M from --real-m)")
    ap.add_argument("--timing-threshold", type=float, default=0.2)
    ap.add_argument("--timing-faiss", action="store_true",
                    help="also time FAISS fast-scan training at the timing size")
    ap.add_argument("--eval-queries", type=int, default=2000)
    ap.add_argument("--calib-queries", type=int, default=5000)
    ap.add_argument("--thresholds", type=float, nargs="*", default=[0.2],
                    help="fixed thresholds T for torchaq and ScaNN rows")
    ap.add_argument("--calib-threshold", type=float, default=0.2,
                    help="threshold given to the constructor of the calibrated quantizer")
    ap.add_argument("--iters", type=int, default=None,
                    help="fit iterations for torchaq (default: the library's default)")
    ap.add_argument("--real-m", type=int, nargs="*", default=[96, 192])
    ap.add_argument("--synthetic-n", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-real", action="store_true")
    ap.add_argument("--skip-synthetic", action="store_true")
    ap.add_argument("--only", nargs="*", default=None,
                    help="run only rows whose label contains one of these words")
    ap.add_argument("--progress", action="store_true", help="tqdm bars inside fit")
    ap.add_argument("--lsq-train-rows", type=int, default=8000,
                    help="rows FAISS LSQ fast-scan is trained on (AQ comparison)")
    ap.add_argument("--lsq-train-iters", type=int, default=6)
    ap.add_argument("--aq", action="store_true",
                    help="only the additive-codes table (torchaq AQ vs FAISS LSQ fast-scan, real data) "
                         "-> results/aq.txt")
    ap.add_argument("--aq-iters", type=int, default=None,
                    help="fit iterations for torchaq AQ (default: the library's default)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch and FAISS threads (default: torch's default)")
    ap.add_argument("--lsq-encode-ils-iters", type=int, default=8)
    ap.add_argument("--out", type=Path, default=None, help="output file (default results/)")
    return ap.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.fit_timing:
        emit(fit_timing(args), args.out or RESULTS / "fit_timing.txt")
        return

    if args.threads is not None:
        torch.set_num_threads(args.threads)
        faiss, _ = _try_import("faiss")
        if faiss is not None:
            faiss.omp_set_num_threads(args.threads)
    if args.aq:
        args.skip_synthetic = True
    settings = build_settings(args)
    methods = aq_method_list(args) if args.aq else method_list(args)
    if args.only:
        methods = [(l, f) for l, f in methods if any(w.lower() in l.lower() for w in args.only)]
    print(environment())
    results: dict[tuple[str, str], Result] = {}
    for s in settings:
        for label, run in methods:
            t0 = time.perf_counter()
            try:
                r = run(s)
            except Exception as e:  # noqa: BLE001 - one failing row must not lose the table
                r = Result(note=f"failed: {type(e).__name__}: {e}")
            results[(label, s.key)] = r
            print(f"[{time.perf_counter() - t0:6.1f}s] {s.key:9s} {label:30s} "
                  f"R@10 {r.r10:.3f} RR@10 {r.rr10:.3f} R1@10 {r.r1_10:.3f} {r.note}",
                  flush=True)

    header = [
        "command: python benchmarks/quality.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "recall@10 (R@10), recall@10 after exact re-rank of the top 100 (RR@10), the paper's",
        "Recall1@10 (R1@10, synthetic), index build time (fit s: fit+encode / train+add / build).",
        f"real: all-MiniLM-L6-v2 vocabulary table (30522 x 384) vs hidden states of real text; "
        f"{args.calib_queries} calibration, {args.eval_queries} evaluation queries "
        f"(disjoint passages).",
        f"synthetic: {args.synthetic_n} unit-norm rows, d=100, queries uniform on the sphere.",
        f"all 4-bit codes; torchaq iters={args.iters if args.iters is not None else 'default'}; "
        f"calibrated row built with threshold={args.calib_threshold}.",
        environment(),
        "",
    ]
    if args.aq:
        header = [
            header[0],
            "additive codes (96 / 192 codebooks x 4 bits = 384 / 768 bits per class): recall@10 (R@10),",
            "recall@10 after exact re-rank of the top 100 (RR@10), build time (fit s: fit+encode / train+add).",
            f"FAISS IndexLocalSearchQuantizerFastScan (inner product, ST_LUT_nonorm): trained on the first "
            f"{args.lsq_train_rows} rows, train_iters={args.lsq_train_iters}, "
            f"encode_ils_iters={args.lsq_encode_ils_iters}; torchaq AQ fits on all rows "
            f"(iters={args.aq_iters if args.aq_iters is not None else 'default'}) and its encode starts each "
            f"row from the codes fit found for it (torchaq.aq_warm); calibrated row built "
            f"with threshold={args.calib_threshold}.",
            header[3],
            f"threads: {torch.get_num_threads()} (torch and FAISS); the machine is shared with other jobs: "
            f"load average {os.getloadavg()[0]:.1f} at the end of the run.",
            environment(),
            "",
        ]
    text = "\n".join(header) + format_table(settings, [l for l, _ in methods], results)
    if _scann_builder()[0] is None:
        text += "\n(ScaNN rows skipped: `pip install scann` not available here.)"
    print()
    emit(text, args.out or RESULTS / ("aq.txt" if args.aq else "quality.txt"))


if __name__ == "__main__":
    main()
