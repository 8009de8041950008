"""Part 2 and 3 of ``benchmarks/llm_heads.py``: the layer's ops on the large tables, fit / refresh, bytes.

For each table (:mod:`benchmarks.llm_tables`) and layer variant (``M = d/2`` default, ``d/4``,
``d/8`` 4-bit PQ codes: the fewer-bits-per-class lever, followed by the layer's own int8
shortlist and exact re-score), at each batch size and thread count:

* ``nn.Linear`` fp32 + ``torch.topk`` and ``nn.Linear`` bf16 + ``torch.topk`` (the dense baselines);
* ``layer.topk(k=10)``, ``layer.sample(top_k=50)``, ``layer.log_softmax_topk(k=10)``;
* recall@10 of ``topk`` against the exact fp32 top-10 on held-out queries.

Then fit time (wall, 2 threads, calibrated), ``refresh()`` after every row moved (a full
re-encode) and after 1% of rows moved (incremental), and the index's bytes per class against the
dense weight. 1-thread times are the calling thread's CPU time (robust to other processes);
2-thread times wall clock.
"""
from __future__ import annotations

import gc
import time

import torch
import torch.nn.functional as F

from benchmarks.common import markdown_table, time_call
from benchmarks.llm_tables import fitted_layer, index_bytes

K = 10


def recall(idx: torch.Tensor, true: torch.Tensor) -> float:
    """Mean fraction of the exact top-k (``true``) found in ``idx``."""
    return (true.unsqueeze(2) == idx.unsqueeze(1)).any(2).float().mean().item()


@torch.no_grad()
def exact_top(rows: torch.Tensor, queries: torch.Tensor, k: int = K, chunk: int = 256) -> torch.Tensor:
    """Exact fp32 top-k indices of ``queries @ rows.T``, in chunks of queries."""
    return torch.cat([torch.topk(queries[i:i + chunk] @ rows.T, k, dim=1).indices
                      for i in range(0, queries.shape[0], chunk)])


@torch.no_grad()
def layer_recall(layer, queries: torch.Tensor, true: torch.Tensor, candidates=None, chunk: int = 256) -> float:
    idx = torch.cat([layer.topk(queries[i:i + chunk], k=K, candidates=candidates)[1]
                     for i in range(0, queries.shape[0], chunk)])
    return recall(idx, true)


@torch.no_grad()
def time_ops(layer, rows, rows_bf16, queries, batches, threads, min_run, ops=("topk", "sample", "log_softmax_topk"),
             device="cpu", candidates=None):
    """Rows of ms per call: dense fp32 / bf16 + topk and the layer's ops, per (threads, batch)."""
    out = []
    for th in threads:
        torch.set_num_threads(th)
        for b in batches:
            h = queries[:b].contiguous().to(device)
            hb = h.bfloat16()
            timer = lambda fn: time_call(fn, min_run_time=min_run, cpu_time=th == 1 and device == "cpu").ms  # noqa: E731
            row = dict(threads=th, batch=b)
            row["dense32"] = timer(lambda: torch.topk(F.linear(h, rows), K, dim=-1))
            row["dense16"] = timer(lambda: torch.topk(F.linear(hb, rows_bf16), K, dim=-1))
            if "topk" in ops:
                row["topk"] = timer(lambda: layer.topk(h, k=K, candidates=candidates))
            if "sample" in ops:
                row["sample"] = timer(lambda: layer.sample(h, top_k=50))
            if "log_softmax_topk" in ops:
                row["log_softmax_topk"] = timer(lambda: layer.log_softmax_topk(h, k=K))
            print("   ", {k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
            out.append(row)
    return out


def ops_table(title: str, rows: list) -> str:
    body = []
    for r in rows:
        cells = [r["threads"], r["batch"], f"{r['dense32']:.3f}", f"{r['dense16']:.3f}"]
        for op in ("topk", "sample", "log_softmax_topk"):
            cells.append(f"{r[op]:.3f}" if op in r else "-")
        cells.append(f"{r['dense32'] / r['topk']:.1f}x" if "topk" in r else "-")
        cells.append(f"{r['dense16'] / r['topk']:.1f}x" if "topk" in r else "-")
        cells.append(f"{r['batch'] / r['topk'] * 1e3:,.0f}" if "topk" in r else "-")
        body.append(cells)
    return f"### {title}\n" + markdown_table(
        ["threads", "batch", "nn.Linear fp32 + topk ms", "nn.Linear bf16 + topk ms", "topk(10) ms", "sample(top_k=50) ms",
         "log_softmax_topk(10) ms", "topk vs fp32", "topk vs bf16", "topk queries/s"], body)


@torch.no_grad()
def refresh_times(layer, frac: float = 0.01, seed: int = 0) -> dict:
    """Seconds of ``refresh()`` after ``frac`` of the rows moved and after every row moved (then restored)."""
    w = layer.weight
    layer.refresh()  # a layer loaded from a state_dict has no row fingerprints yet: the first refresh re-encodes all
    gen = torch.Generator().manual_seed(seed)
    v = w.shape[0]
    idx = torch.randperm(v, generator=gen)[: max(1, int(frac * v))]
    saved = w[idx].clone()
    w[idx] += 1e-3 * w[idx].norm(dim=1, keepdim=True) / w.shape[1] ** 0.5 * torch.randn(len(idx), w.shape[1], generator=gen)
    t0 = time.perf_counter()
    layer.refresh()
    some = time.perf_counter() - t0
    w[idx] = saved
    scale = 1 + 1e-6
    w.mul_(scale)
    t0 = time.perf_counter()
    layer.refresh()
    every = time.perf_counter() - t0
    w.div_(scale)
    layer.refresh()
    return dict(some=some, every=every, frac=frac)


def run_table(name, rows, fit_q, eval_q, variants, batches, threads, min_run, ops, num_eval, device="cpu",
              refresh=True, candidates=None):
    """Everything of parts 2 and 3 for one table; returns markdown text."""
    true = exact_top(rows, eval_q[:num_eval])
    rows_bf16 = rows.bfloat16()
    text, summary = [], []
    v, d = rows.shape
    for m in variants:
        gc.collect()
        layer, fit_s, cached = fitted_layer(name, rows, fit_q, num_subspaces=m)
        if device != "cpu":
            layer = layer.to(device)
        rec = layer_recall(layer, eval_q[:num_eval].to(device), true.to(device), candidates)
        print(f"  {name} M={m}: fit {fit_s:.1f} s{' (cached)' if cached else ''}, recall@10 {rec:.4f}", flush=True)
        timed = time_ops(layer, rows.to(device), rows_bf16.to(device), eval_q, batches, threads, min_run, ops, device,
                         candidates)
        ref = refresh_times(layer) if refresh and device == "cpu" else None
        nb = index_bytes(layer)
        text.append(ops_table(f"{name}: V = {v:,}, d = {d}, 4-bit x M = {m} ({4 * m} bits/class), "
                              f"side rows {layer.side_rows.numel()}, "
                              f"topk candidates {candidates or 'default'}, recall@10 {rec:.4f}", timed))
        summary.append([name, m, f"{rec:.4f}", f"{fit_s:.1f}{' (at cache build)' if cached else ''}",
                        f"{ref['every']:.2f}" if ref else "-", f"{ref['some']:.2f}" if ref else "-",
                        f"{nb['codes']:.0f}", f"{nb['codes'] + nb['int8'] + nb['norms']:.0f}",
                        f"{nb['fp32']:.0f} / {nb['bf16']:.0f}", f"{nb['fp32'] / nb['codes']:.0f}x"])
        del layer
    text.append(f"### {name}: fit, refresh, bytes per class\n" + markdown_table(
        ["table", "M", "recall@10", "fit s (2 threads, calibrated)", "refresh s (all rows moved)",
         "refresh s (1% moved)", "code bytes/class", "+ int8 shortlist rows + norm", "dense fp32 / bf16 bytes",
         "fp32 / codes"], summary))
    return "\n\n".join(text)
