"""QuantizedSoftmax.topk vs nn.Linear + torch.topk and FAISS fast-scan + exact re-rank: a batch sweep.

Real data: the MiniLM vocabulary table (30522 x 384) with real hidden states of real text
(``examples/real_data.py``); half of the hidden states calibrate the quantizer, the other half
evaluate it. The layer is the default one (d / 2 = 192 subspaces of 4 bits = 768 bits per class,
default candidates). One run prints, and writes to ``benchmarks/results/layer.txt``:

1. quality: recall@1 / recall@10 of ``topk(k=10)`` against the exact top-10, the total-variation
   distance between torchaq's and exact top-50 sampling (exact, from the logits), and the error of
   ``log Z`` from ``log_softmax_topk``;
2. the batch sweep (batch 1 / 16 / 64 / 256, 1 and 2 threads): ``nn.Linear`` + ``topk``, torchaq
   ``topk``, and FAISS ``IndexPQFastScan`` at the same bits (M = 192, 4-bit, trained by FAISS on
   the same table) searching 100 candidates, re-ranked by the same exact re-score
   (:func:`torchaq.ops.rescore_topk`), with the speed-up of torchaq over each;
3. where the time of ``topk`` goes, per batch size (1 thread): the one ``layer_topk`` op and, inside
   it, the LUT, the scan with the top-C selection (and that selection alone, estimated as
   scan(top-C) - scan(top-1)), the re-score (int8 shortlist of the candidates and the side list, then
   the exact pass over the shortlist; and the same without the shortlist), the rest (Python and
   dispatch); and, for comparison, the re-score path of earlier versions (gather of the rows,
   batched mat-vec, sort);
4. queries/s vs recall@10 (1 thread, batch 1 and 64) while the number of candidates varies, for
   torchaq, FAISS + re-rank and the dense layer, as ann-benchmarks plots it; drawn to
   ``benchmarks/results/layer.png`` when matplotlib is installed.

The fitted layer is cached under ``$TORCHAQ_CACHE`` (default ``~/.cache/torchaq``) (keyed by the data and the quantizer's
source files; ``--refit`` ignores it): the fit takes minutes on a busy machine and is not timed
here (``benchmarks/results/fit_timing.txt`` is). Times: median of blocks; 1-thread rows use the
CPU time of the calling thread (robust to other processes on a shared machine), 2-thread rows
wall clock.

    python benchmarks/layer.py              # everything above, a few minutes
    python benchmarks/layer.py --quick      # batch 1 and 64, 1 thread, no curve (smoke test)
"""
from __future__ import annotations

import argparse
import hashlib
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torchaq  # noqa: E402
from benchmarks.common import CACHE, RESULTS, emit, environment, markdown_table, time_call  # noqa: E402
from torchaq import ops  # noqa: E402
from torchaq.ops.rescore import exact_logits  # noqa: E402

try:
    import faiss
except ImportError:  # the bench extra is not installed
    faiss = None

K = 10
SAMPLE_K = 50
FAISS_CANDIDATES = 100
BATCHES = (1, 16, 64, 256)
CURVE_BATCHES = (1, 64)
CURVE_CANDIDATES = (16, 32, 64, 128, 256, 512)
EVAL_QUERIES = 2000
_FIT_SOURCES = ("quantizers/pq.py", "ops/encode.py", "quantizers/codebook_update.py", "quantizers/kmeans.py",
                "quantizers/calibrate.py", "quantizers/loss.py", "layer/softmax.py")


# ---------------------------------------------------------------------------------------------
# the layer (fitted once, cached)
# ---------------------------------------------------------------------------------------------
def _key(table: torch.Tensor, fit_q: torch.Tensor) -> str:
    h = hashlib.sha1()
    for t in (table, fit_q):
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes()[: 1 << 20])
        h.update(f"{float(t.double().sum()):.6e}".encode())
    for name in _FIT_SOURCES:
        h.update((ROOT / "torchaq" / name).read_bytes())
    return h.hexdigest()[:16]


def fitted_layer(table: torch.Tensor, fit_q: torch.Tensor, refit: bool = False, calibrate: bool = True):
    """The default layer on ``table`` (calibrated on ``fit_q`` unless ``calibrate=False``: then the
    isotropic fit of a layer built without queries); ``(layer, fit seconds or None if cached)``."""
    file = CACHE / f"layer_minilm_{_key(table, fit_q)}{'' if calibrate else '_isotropic'}.pt"
    if file.is_file() and not refit:
        layer = torchaq.QuantizedSoftmax(table, fit=False, progress=False)
        layer.load_state_dict(torch.load(file, weights_only=False))
        return layer.eval(), None
    start = time.perf_counter()
    layer = torchaq.QuantizedSoftmax(table, queries=fit_q if calibrate else None, progress=True).eval()
    fit_s = time.perf_counter() - start
    CACHE.mkdir(parents=True, exist_ok=True)
    torch.save(layer.state_dict(), file)
    return layer, fit_s


def faiss_index(table: torch.Tensor, num_subspaces: int):
    """FAISS fast-scan PQ at the layer's bits (M subspaces x 4 bits), inner product, trained on the table."""
    index = faiss.IndexPQFastScan(table.shape[1], num_subspaces, 4, faiss.METRIC_INNER_PRODUCT)
    index.train(table.numpy())
    index.add(table.numpy())
    return index


# ---------------------------------------------------------------------------------------------
# the three top-k methods
# ---------------------------------------------------------------------------------------------
def dense_topk(h, weight, k=K):
    return torch.topk(F.linear(h, weight), k, dim=-1)


def faiss_topk(index, weight, h, k=K, candidates=FAISS_CANDIDATES):
    """FAISS fast-scan for ``candidates`` classes, then the exact re-score + top-k torchaq uses."""
    _, ids = index.search(h.numpy(), candidates)
    return ops.rescore_topk(h, weight, None, torch.from_numpy(ids), k)


def recall(idx: torch.Tensor, true: torch.Tensor) -> float:
    """Mean fraction of the exact top-k (``true``) found in ``idx``."""
    return (true.unsqueeze(2) == idx.unsqueeze(1)).any(2).float().mean().item()


def batched(fn, queries, batch=256):
    return torch.cat([fn(queries[i : i + batch]) for i in range(0, queries.shape[0], batch)])


# ---------------------------------------------------------------------------------------------
# 1. quality
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def quality(layer, queries, index=None):
    weight = layer.weight.detach()
    logits = F.linear(queries, weight)
    true = logits.topk(SAMPLE_K, dim=1)
    idx = batched(lambda q: layer.topk(q, k=K)[1], queries)
    out = dict(recall1=(idx[:, 0] == true.indices[:, 0]).float().mean().item(), recall10=recall(idx, true.indices[:, :K]))
    shortlist, layer.shortlist = layer.shortlist, False  # the same layer, every candidate re-scored exactly
    out["recall10_exact"] = recall(batched(lambda q: layer.topk(q, k=K)[1], queries), true.indices[:, :K])
    layer.shortlist = shortlist
    vals50, idx50 = layer.topk(queries, k=SAMPLE_K)
    p = torch.zeros_like(logits).scatter_(1, true.indices, true.values.softmax(1))
    q = torch.zeros_like(logits).scatter_(1, idx50, vals50.softmax(1))
    tv = 0.5 * (p - q).abs().sum(1)
    logp, idx1 = layer.log_softmax_topk(queries, k=1)
    err = (logp[:, 0] - torch.log_softmax(logits, 1).gather(1, idx1)[:, 0]).abs()
    out.update(tv=tv.mean().item(), tv_max=tv.max().item(), logz_mean=err.mean().item(), logz_max=err.max().item())
    if index is not None:
        fidx = batched(lambda q: faiss_topk(index, weight, q)[1], queries)
        out["faiss_recall10"] = recall(fidx, true.indices[:, :K])
    return out, true.indices[:, :K]


# ---------------------------------------------------------------------------------------------
# 2. batch sweep
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def sweep(layer, queries, index, threads, batches, min_run_time):
    weight = layer.weight.detach()
    rows = []
    for th in threads:
        torch.set_num_threads(th)
        if faiss is not None:
            faiss.omp_set_num_threads(th)
        for b in batches:
            h = queries[:b].contiguous()
            timer = lambda fn: time_call(fn, min_run_time=min_run_time, cpu_time=th == 1).ms  # noqa: E731
            dense = timer(lambda: dense_topk(h, weight))
            ours = timer(lambda: layer.topk(h, k=K))
            fs = timer(lambda: faiss_topk(index, weight, h)) if index is not None else float("nan")
            rows.append(dict(threads=th, batch=b, dense=dense, ours=ours, faiss=fs))
            print(f"  sweep threads={th} batch={b}: dense {dense:.3f} ms, torchaq {ours:.3f} ms, faiss {fs:.3f} ms",
                  flush=True)
    return rows


def sweep_table(rows) -> str:
    body = [
        [r["threads"], r["batch"], f"{r['dense']:.3f}", f"{r['ours']:.3f}", f"{r['faiss']:.3f}",
         f"{r['batch'] / r['ours'] * 1e3:,.0f}", f"{r['dense'] / r['ours']:.1f}x", f"{r['faiss'] / r['ours']:.2f}x"]
        for r in rows
    ]
    return markdown_table(
        ["threads", "batch", "nn.Linear+topk ms", "torchaq topk ms", f"FAISS fast-scan+re-rank {FAISS_CANDIDATES} ms",
         "torchaq queries/s", "vs dense", "vs FAISS"], body)


# ---------------------------------------------------------------------------------------------
# 3. where the time goes
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def profile(layer, queries, batches, min_run_time):
    torch.set_num_threads(1)
    weight, packed, n = layer.weight.detach(), layer.packed_codes, layer.num_classes
    c = torchaq.layer.default_candidates(K, n) if layer.candidates is None else layer.candidates
    r = torchaq.layer.default_shortlist(K)
    timer = lambda fn: time_call(fn, min_run_time=min_run_time, cpu_time=True).ms  # noqa: E731
    q, side = layer.quantizer, layer.side_rows
    w8, scale = torchaq.ops.layer_topk.quantize_rows_int8(weight)
    rows = []
    for b in batches:
        h = queries[:b].contiguous()
        lut = q.lut(h)
        _, cand = ops.lut_topk(lut, packed, n, c)
        gathered = weight.index_select(0, cand.reshape(-1)).view(b, c, -1)
        logits = torch.bmm(gathered, h.unsqueeze(2)).squeeze(2)
        op = lambda shortlist=True: torchaq.ops.layer_topk.layer_topk(  # noqa: E731
            h, h, q.codebooks, packed, n, c, None, weight, None, side, w8 if shortlist else None,
            scale if shortlist else None, r, K)
        t = dict(
            total=timer(lambda: layer.topk(h, k=K)),
            op=timer(op),
            op_exact=timer(lambda: op(False)),
            lut=timer(lambda: ops.compute_lut(h, q.codebooks)),
            scan=timer(lambda: ops.lut_topk(lut, packed, n, c)),
            scan1=timer(lambda: ops.lut_topk(lut, packed, n, 1)),
            old_gather=timer(lambda: weight.index_select(0, cand.reshape(-1))),
            old_bmm=timer(lambda: torch.bmm(gathered, h.unsqueeze(2))),
            old_sort=timer(lambda: logits.sort(dim=1, descending=True)),
            old_rescore=timer(lambda: exact_logits(h, weight, None, cand).sort(dim=1, descending=True)),
        )
        t["select"] = max(0.0, t["scan"] - t["scan1"])
        t["rescore"] = max(0.0, t["op"] - t["lut"] - t["scan"])
        t["rescore_exact"] = max(0.0, t["op_exact"] - t["lut"] - t["scan"])
        t["rest"] = max(0.0, t["total"] - t["op"])
        rows.append((b, c, len(side), r, t))
        print(f"  profile batch={b}: " + ", ".join(f"{k} {v:.3f}" for k, v in t.items()), flush=True)
    return rows


def profile_table(rows) -> str:
    body = []
    for b, c, s, r, t in rows:
        pct = lambda x: f"{x:.3f} ({100 * x / t['total']:.0f}%)"  # noqa: E731
        body.append([b, f"{c} + {s}", r, f"{t['total']:.3f}", pct(t["op"]), pct(t["lut"]), pct(t["scan"]),
                     pct(t["select"]), pct(t["rescore"]), f"{t['rescore_exact']:.3f}", pct(t["rest"]),
                     f"{t['old_gather']:.3f} / {t['old_bmm']:.3f} / {t['old_sort']:.3f} = {t['old_rescore']:.3f}"])
    return markdown_table(
        ["batch", "candidates (scan + side list)", "shortlist", "topk ms", "layer_topk op", "LUT", "scan + top-C",
         "of which top-C selection", "re-score: int8 shortlist + exact", "same, all exact (ms)",
         "Python + dispatch", "replaced path: gather / bmm / sort = total ms"], body)


# ---------------------------------------------------------------------------------------------
# 4. queries/s vs recall@10
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def curve(layer, queries, true10, index, batches, min_run_time):
    torch.set_num_threads(1)
    if faiss is not None:
        faiss.omp_set_num_threads(1)
    weight = layer.weight.detach()
    points = []  # (method, batch, candidates, recall, queries/s)
    for c in CURVE_CANDIDATES:
        methods = [("torchaq", lambda q, c=c: layer.topk(q, k=K, candidates=c)[1])]
        if index is not None:
            methods.append(("FAISS fast-scan + re-rank", lambda q, c=c: faiss_topk(index, weight, q, candidates=c)[1]))
        for name, fn in methods:
            r = recall(batched(fn, queries), true10)
            for b in batches:
                h = queries[:b].contiguous()
                ms = time_call(lambda: fn(h), min_run_time=min_run_time, cpu_time=True).ms
                points.append((name, b, c, r, b / ms * 1e3))
    for b in batches:
        h = queries[:b].contiguous()
        ms = time_call(lambda: dense_topk(h, weight), min_run_time=min_run_time, cpu_time=True).ms
        points.append(("nn.Linear + topk", b, layer.num_classes, 1.0, b / ms * 1e3))
    return points


def curve_table(points) -> str:
    body = [[name, b, c, f"{r:.4f}", f"{qps:,.0f}"] for name, b, c, r, qps in points]
    return markdown_table(["method", "batch", "candidates", "recall@10", "queries/s (1 thread)"], body)


def plot(points, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install 'torchaq[bench]')")
        return False
    batches = sorted({p[1] for p in points})
    fig, axes = plt.subplots(1, len(batches), figsize=(6 * len(batches), 4.5), squeeze=False)
    styles = {"torchaq": "o-", "FAISS fast-scan + re-rank": "s--", "nn.Linear + topk": "*"}
    for ax, b in zip(axes[0], batches):
        for name, style in styles.items():
            pts = sorted((p for p in points if p[0] == name and p[1] == b), key=lambda p: p[2])
            if not pts:
                continue
            ax.plot([p[3] for p in pts], [p[4] for p in pts], style, label=name, markersize=9 if style == "*" else 5)
            if name != "nn.Linear + topk":
                for p in pts:
                    ax.annotate(str(p[2]), (p[3], p[4]), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set_yscale("log")
        ax.set_xlabel("recall@10 (exact top-10 of the dense layer)")
        ax.set_ylabel("queries / s (1 thread)")
        ax.set_title(f"MiniLM vocab 30522 x 384, 768 bits, batch {b}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(loc="lower left", fontsize=8)
    fig.text(0.5, 0.005, "labels: scan candidates (torchaq: ranked by int8 rows, the best max(32, 4k) re-scored "
             "exactly; FAISS: all re-scored exactly)", ha="center", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _shown(path: Path) -> Path:
    """``path`` relative to the repository when it lies inside it (``--out`` may point elsewhere)."""
    return path.relative_to(ROOT) if path.resolve().is_relative_to(ROOT) else path


# ---------------------------------------------------------------------------------------------
def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="batch 1 and 64, 1 thread, no curve (smoke test)")
    parser.add_argument("--refit", action="store_true", help="fit the layer again instead of loading the cache")
    parser.add_argument("--no-calibrate", action="store_true",
                        help="fit the layer without calibration queries (isotropic; a much shorter fit)")
    parser.add_argument("--queries", type=int, default=8000, help="real hidden states to load (half fit, half eval)")
    parser.add_argument("--out", default=str(RESULTS / "layer.txt"), help="results file ('' to print only)")
    args = parser.parse_args(argv)
    if faiss is None:
        print("faiss-cpu not installed: no FAISS columns (pip install 'torchaq[bench]')")
    from examples.real_data import load_minilm, split

    start = time.perf_counter()
    threads0 = torch.get_num_threads()
    table, queries = load_minilm(num_queries=args.queries, seed=0)
    fit_q, eval_q = split(queries, 0.5)
    eval_q = eval_q[:EVAL_QUERIES].contiguous()
    layer, fit_s = fitted_layer(table, fit_q, args.refit, not args.no_calibrate)
    q = layer.quantizer
    index = faiss_index(table, q.num_subspaces) if faiss is not None else None
    batches, threads, min_run = ((1, 64), (1,), 0.2) if args.quick else (BATCHES, (1, 2), 0.5)

    qual, true10 = quality(layer, eval_q, index)
    rows = sweep(layer, eval_q, index, threads, batches, min_run)
    prof = profile(layer, eval_q, batches, 0.3 if not args.quick else 0.1)
    points = [] if args.quick else curve(layer, eval_q, true10, index, CURVE_BATCHES, 0.3)
    torch.set_num_threads(threads0)

    cands = layer.candidates or torchaq.layer.default_candidates(K, layer.num_classes)
    text = [
        environment(f"torchaq kernels: {torchaq._C.cpu_isa() if torchaq.backends.CPU_EXTENSION_LOADED else 'reference'}"),
        "",
        f"MiniLM vocab (real hidden states, {eval_q.shape[0]} held-out queries): V = {layer.num_classes}, "
        f"d = {layer.dim}, {q.bits}-bit x {q.num_subspaces} subspaces = {q.bits * q.num_subspaces} bits/class, "
        f"rule {q.rule}{' (fitted without calibration queries: --no-calibrate)' if args.no_calibrate else ''}, "
        f"topk(k={K}) takes {cands} scan candidates + {layer.side_rows.numel()} side rows, ranks them by int8 "
        f"rows and re-scores the best {torchaq.layer.default_shortlist(K)} exactly; "
        + (f"fit {fit_s:.1f} s" if fit_s is not None else f"fitted layer loaded from {CACHE}"),
        "",
        "## Quality",
        markdown_table(
            ["recall@1", "recall@10", "recall@10 without the int8 shortlist", "TV top-50 (mean / max)",
             "abs log Z err (mean / max)",
             f"FAISS fast-scan {q.num_subspaces}x4 + re-rank {FAISS_CANDIDATES}: recall@10"],
            [[f"{qual['recall1']:.4f}", f"{qual['recall10']:.4f}", f"{qual['recall10_exact']:.4f}",
              f"{qual['tv']:.4f} / {qual['tv_max']:.3f}",
              f"{qual['logz_mean']:.2e} / {qual['logz_max']:.2e}", f"{qual.get('faiss_recall10', float('nan')):.4f}"]]),
        "",
        "## Batch sweep: topk(k=10) latency (median; 1 thread: CPU time of the calling thread, 2 threads: wall clock)",
        sweep_table(rows),
        "",
        "## Where the time of topk goes (1 thread, ms and share of topk)",
        profile_table(prof),
    ]
    if points:
        png = Path(args.out).with_suffix(".png") if args.out else None
        drawn = plot(points, png) if png is not None else False
        text += ["", f"## queries/s vs recall@10 (1 thread){f' -- plot: {_shown(png)}' if drawn else ''}",
                 curve_table(points)]
    text += ["", f"total benchmark time {time.perf_counter() - start:.0f} s"]
    out = "\n".join(text)
    emit(out, args.out)
    return out


if __name__ == "__main__":
    main()
