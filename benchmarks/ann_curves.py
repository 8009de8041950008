"""Part 4 of ``benchmarks/llm_heads.py``: recall@10 vs queries/s against ScaNN and FAISS, one thread.

Methods (all maximum inner product, k = 10, recall against the exact fp32 top-10):

* ``torchaq M=...`` -- ``QuantizedSoftmax.topk(k=10, candidates=C)``, C swept; one curve per layer
  variant (4-bit PQ codes at ``M`` subspaces, calibrated);
* ``ScaNN`` -- the full pipeline: ``builder(db, 10, "dot_product").tree(L leaves)
  .score_ah(2, anisotropic_quantization_threshold=0.2).reorder(R)``, ``leaves_to_search`` and
  ``R`` (``pre_reorder_num_neighbors``) swept;
* ``FAISS IVF-PQ fs + refine`` -- ``index_factory(d, "IVF{L},PQ{d/2}x4fs,RFlat", METRIC_INNER_PRODUCT)``,
  ``nprobe`` and ``k_factor`` swept;
* ``nn.Linear + topk`` (recall 1).

Batch 1 is timed as a loop over single queries (each method's one-query call), batch 64 as one
call; times are the CPU time of the calling thread (one thread everywhere: torch, FAISS's
OpenMP, ScaNN's ``search_batched``, which does not spawn threads).
"""
from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.common import markdown_table, time_call
from benchmarks.llm_layer_ops import K, recall

try:
    import faiss
except ImportError:
    faiss = None
try:
    import scann
except ImportError:
    scann = None

SINGLE = 32  # single queries per timed batch-1 loop


def _qps(search, queries: torch.Tensor, batch: int, min_run: float) -> float:
    if batch == 1:
        qs = [queries[i:i + 1].contiguous() for i in range(SINGLE)]
        t = time_call(lambda: [search(q) for q in qs], min_run_time=min_run, cpu_time=True).median
        return SINGLE / t
    q = queries[:batch].contiguous()
    return batch / time_call(lambda: search(q), min_run_time=min_run, cpu_time=True).median


def _points(name, setting, search, eval_q, true, batches, min_run):
    r = recall(torch.cat([torch.as_tensor(search(eval_q[i:i + 256])) for i in range(0, eval_q.shape[0], 256)]).long(),
               true)
    out = [(name, b, setting, r, _qps(search, eval_q, b, min_run)) for b in batches]
    print(f"    {name} {setting}: recall@10 {r:.4f}, " + ", ".join(f"b{p[1]} {p[4]:,.0f} q/s" for p in out), flush=True)
    return out


@torch.no_grad()
def torchaq_points(name, layer, eval_q, true, batches, candidates, min_run):
    pts = []
    for c in candidates:
        pts += _points(name, f"C={c}", lambda q, c=c: layer.topk(q, k=K, candidates=c)[1], eval_q, true, batches, min_run)
    return pts


@torch.no_grad()
def dense_points(rows, eval_q, true, batches, min_run):
    return _points("nn.Linear + topk", "fp32", lambda q: torch.topk(F.linear(q, rows), K, dim=-1).indices,
                   eval_q, true, batches, min_run)


def scann_points(rows, eval_q, true, batches, leaves, searched, reorders, min_run, train_threads=2):
    if scann is None:
        print("    scann not installed: no ScaNN curve")
        return [], None
    db = rows.numpy()
    t0 = time.perf_counter()
    searcher = (scann.scann_ops_pybind.builder(db, K, "dot_product")
                .tree(num_leaves=leaves, num_leaves_to_search=searched[0], training_sample_size=min(len(db), 100_000))
                .score_ah(2, anisotropic_quantization_threshold=0.2).reorder(max(reorders))
                .set_n_training_threads(train_threads).build())
    build_s = time.perf_counter() - t0
    pts = []
    for s in searched:
        for r in reorders:
            def search(q, s=s, r=r):
                x = q.numpy()
                if x.shape[0] == 1:
                    return searcher.search(x[0], final_num_neighbors=K, pre_reorder_num_neighbors=r,
                                           leaves_to_search=s)[0][None].astype(np.int64)
                return searcher.search_batched(x, final_num_neighbors=K, pre_reorder_num_neighbors=r,
                                               leaves_to_search=s)[0].astype(np.int64)
            pts += _points("ScaNN tree+AH+reorder", f"leaves {s}/{leaves}, R={r}", search, eval_q, true, batches, min_run)
    return pts, build_s


def faiss_points(rows, eval_q, true, batches, nlist, nprobes, kfactors, min_run, train_threads=2):
    if faiss is None:
        print("    faiss not installed: no FAISS curve")
        return [], None
    d = rows.shape[1]
    faiss.omp_set_num_threads(train_threads)
    t0 = time.perf_counter()
    index = faiss.index_factory(d, f"IVF{nlist},PQ{d // 2}x4fs,RFlat", faiss.METRIC_INNER_PRODUCT)
    index.train(rows.numpy())
    index.add(rows.numpy())
    build_s = time.perf_counter() - t0
    faiss.omp_set_num_threads(1)
    ivf = faiss.extract_index_ivf(index)
    pts = []
    for p in nprobes:
        for kf in kfactors:
            def search(q, p=p, kf=kf):
                ivf.nprobe = p
                index.k_factor = kf
                return index.search(q.numpy(), K)[1]
            pts += _points("FAISS IVF-PQfs+RFlat", f"nprobe {p}/{nlist}, k_factor {kf}", search, eval_q, true,
                           batches, min_run)
    return pts, build_s


def curve_table(points) -> str:
    body = [[n, b, s, f"{r:.4f}", f"{q:,.0f}"] for n, b, s, r, q in sorted(points, key=lambda p: (p[1], p[0], -p[3]))]
    return markdown_table(["method", "batch", "setting", "recall@10", "queries/s (1 thread)"], body)


def best_at(points, name_prefix, batch, min_recall):
    qs = [p[4] for p in points if p[0].startswith(name_prefix) and p[1] == batch and p[3] >= min_recall]
    return max(qs) if qs else None


def verdict_table(points, batches, levels=(0.9, 0.95, 0.99)) -> str:
    """Best queries/s reaching each recall level, per method and batch; torchaq's lead over each baseline."""
    names = sorted({p[0] for p in points})
    ours = [n for n in names if n.startswith("torchaq")]
    body = []
    for b in batches:
        for lv in levels:
            best_ours = max([q for q in (best_at(points, n, b, lv) for n in ours) if q is not None], default=None)
            cells = [b, lv]
            for n in names:
                q = best_at(points, n, b, lv)
                cells.append("-" if q is None else f"{q:,.0f}")
            for n in ("ScaNN", "FAISS"):
                q = best_at(points, n, b, lv)
                cells.append("-" if q is None or best_ours is None else f"{best_ours / q:.2f}x")
            body.append(cells)
    return markdown_table(["batch", "recall@10 >=", *[f"{n} q/s" for n in names], "torchaq / ScaNN", "torchaq / FAISS"],
                          body)


def plot(points, path, title) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return False
    batches = sorted({p[1] for p in points})
    names = sorted({p[0] for p in points})
    fig, axes = plt.subplots(1, len(batches), figsize=(6.5 * len(batches), 4.8), squeeze=False)
    for ax, b in zip(axes[0], batches):
        for i, n in enumerate(names):
            pts = [p for p in points if p[0] == n and p[1] == b]
            if not pts:
                continue
            # the Pareto frontier (best queries/s at each recall) as a line, every point as a marker
            pts.sort(key=lambda p: -p[3])
            front, best = [], 0.0
            for p in pts:
                if p[4] > best:
                    front.append(p)
                    best = p[4]
            marker = "*" if n.startswith("nn.Linear") else "os^dv<>"[i % 7]
            line = ax.plot([p[3] for p in front], [p[4] for p in front], "-" + marker, label=n, markersize=6)[0]
            ax.plot([p[3] for p in pts], [p[4] for p in pts], marker, color=line.get_color(), alpha=0.3, markersize=4)
        ax.set_yscale("log")
        ax.set_xlim(left=max(0.5, min(p[3] for p in points) - 0.02), right=1.005)
        ax.set_xlabel("recall@10")
        ax.set_ylabel("queries / s (1 thread)")
        ax.set_title(f"{title}, batch {b}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(loc="lower left", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
