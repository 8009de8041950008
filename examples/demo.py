"""`make demo`: torchaq's drop-in output layer on a real model's vocabulary and real hidden states.

Loads the MiniLM (BERT, d = 384) vocabulary table and real hidden states of real English text
(shipped in a PyPI wheel; nothing is downloaded), fits a ``torchaq.QuantizedSoftmax`` on the table
with half of the hidden states as calibration queries, and prints one table against the exact
``nn.Linear`` + ``torch.topk`` on the other half: top-10 latency at batch 1 and 64 (one thread),
recall@1 / recall@10, and the error of ``log_softmax_topk``'s log-partition.

    python examples/demo.py            # about a minute on 2 cores (most of it the fit)
    python examples/demo.py --quick    # fewer queries and shorter timings
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch.utils import benchmark

import torchaq
from real_data import load_minilm, split  # examples/real_data.py
from reporting import environment, markdown_table  # examples/reporting.py

K = 10


def latency_ms(fn, min_run_time: float) -> float:
    """Median milliseconds per call (torch.utils.benchmark, one thread)."""
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=1)
    return timer.blocked_autorange(min_run_time=min_run_time).median * 1e3


def recall(found: torch.Tensor, true: torch.Tensor) -> float:
    """Mean share of each row's exact top-k found in ``found``."""
    return (true.unsqueeze(2) == found.unsqueeze(1)).any(2).float().mean().item()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2,000 queries and short timings (a smoke test)")
    parser.add_argument("--queries", type=int, default=None,
                        help="real hidden states to load, half to calibrate and half to evaluate (default 8000)")
    args = parser.parse_args(argv)
    num_queries = args.queries or (2000 if args.quick else 8000)
    min_run_time = 0.1 if args.quick else 0.5

    table, queries = load_minilm(num_queries=num_queries, seed=0)
    fit_q, eval_q = split(queries, 0.5)
    start = time.perf_counter()
    layer = torchaq.QuantizedSoftmax(table, queries=fit_q).eval()
    fit_s = time.perf_counter() - start

    with torch.no_grad():
        logits = F.linear(eval_q, table)
        true = logits.topk(K, dim=1).indices
        _, found = layer.topk(eval_q, k=K)
        logp, ids = layer.log_softmax_topk(eval_q, k=1)
        exact_log_z = torch.logsumexp(logits, dim=1)
        log_z_err = (logits.gather(1, ids) - logp - exact_log_z.unsqueeze(1)).abs()

    rows = []
    torch.set_num_threads(1)
    for batch in (1, 64):
        h = eval_q[:batch].contiguous()
        dense = latency_ms(lambda: F.linear(h, table).topk(K, dim=1), min_run_time)
        fast = latency_ms(lambda: layer.topk(h, k=K), min_run_time)
        rows.append([f"top-{K} latency, batch {batch} (ms)", f"{dense:.3f}", f"{fast:.3f}", f"{dense / fast:.1f}x"])
    rows += [
        ["recall@1 / recall@10", "1 / 1", f"{recall(found[:, :1], true[:, :1]):.3f} / {recall(found, true):.3f}", ""],
        ["abs. error of log Z in log_softmax_topk (mean / max)", "0", f"{log_z_err.mean():.1e} / {log_z_err.max():.1e}", ""],
    ]
    q = layer.quantizer
    print(environment())
    print(f"\nMiniLM vocabulary V = {layer.num_classes}, d = {layer.dim}; {eval_q.shape[0]} held-out real hidden "
          f"states; {q.num_subspaces} x {q.bits}-bit codes ({q.num_subspaces * q.bits} bits/class), rule {q.rule}; "
          f"fit {fit_s:.0f} s\n")
    print(markdown_table(["", "nn.Linear + topk", "torchaq", "speed-up"], rows))


if __name__ == "__main__":
    main()
