"""QuantizedSoftmax vs the exact nn.Linear + torch.topk: latency, recall, sampling, log-partition.

Real data: the MiniLM vocabulary table (30522 x 384) with real hidden states of real text
(``benchmarks/real_data.py``); half of the hidden states calibrate the quantizer, the other
half evaluate it. ``--large`` adds a synthetic V = 256k, d = 1024 layer (timing; its recall on
random Gaussian rows is a worst case, not a target).

    python benchmarks/layer.py            # the real-data table (also what `make demo` prints)
    python benchmarks/layer.py --large    # plus V = 256k, d = 1024

Columns: latency of ``topk(k=10)`` at batch 1 and 64 (median, torch.utils.benchmark), recall@1
(top-1 agreement) and recall@10 against the exact top-10, the total-variation distance between
torchaq's and exact top-50 sampling distributions (computed exactly from the logits, mean over
queries), and the mean / max absolute error of ``log Z`` from ``log_softmax_topk``.
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils import benchmark

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torchaq  # noqa: E402
from benchmarks.report import emit  # noqa: E402
from torchaq import _backends  # noqa: E402

SAMPLE_K = 50


def median_ms(fn) -> float:
    return benchmark.Timer("fn()", globals={"fn": fn}).blocked_autorange(min_run_time=0.5).median * 1e3


def exact_topk(h, weight, bias, k):
    return torch.topk(F.linear(h, weight, bias), k, dim=-1)


@torch.no_grad()
def measure(layer: torchaq.QuantizedSoftmax, queries: torch.Tensor, k: int = 10) -> dict:
    """Quality and speed of ``layer`` against the dense layer on ``queries`` (``(B, d)``)."""
    weight, bias = layer.weight.detach(), None if layer.bias is None else layer.bias.detach()
    logits = F.linear(queries, weight, bias)
    true = logits.topk(SAMPLE_K, dim=1)
    _, idx = layer.topk(queries, k=k)
    recall1 = (idx[:, 0] == true.indices[:, 0]).float().mean().item()
    recall10 = (true.indices[:, :k].unsqueeze(2) == idx.unsqueeze(1)).any(2).float().mean().item()

    # top-50 sampling distributions, exactly: p over the true top-50, q over torchaq's top-50
    vals50, idx50 = layer.topk(queries, k=SAMPLE_K)
    p = torch.zeros_like(logits).scatter_(1, true.indices, true.values.softmax(1))
    q = torch.zeros_like(logits).scatter_(1, idx50, vals50.softmax(1))
    tv = 0.5 * (p - q).abs().sum(1)

    logp, idx1 = layer.log_softmax_topk(queries, k=1)
    log_z_err = (logp[:, 0] - torch.log_softmax(logits, 1).gather(1, idx1)[:, 0]).abs()

    out = dict(recall1=recall1, recall10=recall10, tv=tv.mean().item(), tv_max=tv.max().item(),
               logz_mean=log_z_err.mean().item(), logz_max=log_z_err.max().item())
    for batch in (1, 64):
        h = queries[:batch].contiguous()
        out[f"exact_ms_{batch}"] = median_ms(lambda: exact_topk(h, weight, bias, k))
        out[f"torchaq_ms_{batch}"] = median_ms(lambda: layer.topk(h, k=k))
    return out


def header() -> str:
    return (
        f"device: CPU ({platform.processor() or platform.machine()}), threads={torch.get_num_threads()}, "
        f"torch {torch.__version__}, C++ scan: {'yes' if _backends.CPU_EXTENSION_LOADED else 'NO (reference)'}"
    )


def table(rows) -> str:
    lines = [
        "| data | V | d | bits | M | fit s | exact ms b=1 | torchaq ms b=1 | speed-up b=1 | exact ms b=64 "
        "| torchaq ms b=64 | speed-up b=64 | recall@1 | recall@10 | TV top-50 (mean/max) | abs logZ err (mean/max) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, layer, fit_s, r in rows:
        q = layer.quantizer
        lines.append(
            f"| {name} | {layer.num_classes} | {layer.dim} | {q.bits} | {q.num_subspaces} | {fit_s:.1f} "
            f"| {r['exact_ms_1']:.3f} | {r['torchaq_ms_1']:.3f} | {r['exact_ms_1'] / r['torchaq_ms_1']:.1f}x "
            f"| {r['exact_ms_64']:.3f} | {r['torchaq_ms_64']:.3f} | {r['exact_ms_64'] / r['torchaq_ms_64']:.1f}x "
            f"| {r['recall1']:.4f} | {r['recall10']:.4f} | {r['tv']:.4f} / {r['tv_max']:.3f} "
            f"| {r['logz_mean']:.2e} / {r['logz_max']:.2e} |"
        )
    return "\n".join(lines)


def real_rows(num_queries: int = 8000, progress: bool = True):
    from benchmarks.real_data import load_minilm, split

    table_w, queries = load_minilm(num_queries=num_queries, seed=0)
    fit_q, eval_q = split(queries, 0.5)
    start = time.perf_counter()
    layer = torchaq.QuantizedSoftmax(table_w, queries=fit_q, progress=progress).eval()
    fit_s = time.perf_counter() - start
    return [("MiniLM vocab, real hidden states", layer, fit_s, measure(layer, eval_q[:2000]))]


def large_rows(progress: bool = True):
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(262_144, 1024, generator=gen) / 32
    queries = torch.randn(256, 1024, generator=gen)
    start = time.perf_counter()
    layer = torchaq.QuantizedSoftmax(weight, num_subspaces=256, fit_iters=1, progress=progress).eval()
    fit_s = time.perf_counter() - start
    return [("synthetic Gaussian (timing)", layer, fit_s, measure(layer, queries))]


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--large", action="store_true", help="add V = 256k, d = 1024 (several minutes)")
    parser.add_argument("--queries", type=int, default=8000, help="real hidden states to load (half fit, half eval)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "layer.txt"))
    args = parser.parse_args(argv)
    rows = real_rows(args.queries)
    if args.large:
        rows += large_rows()
    text = header() + "\n\n" + table(rows)
    emit(text, args.out)
    return text


if __name__ == "__main__":
    main()
