"""Vocabulary-parallel top-k: time per call at P = 1, 2 ranks and bytes on the wire, against gathering full logits.

    python benchmarks/distributed.py                    # V = 131072, d = 2048, batch 1 and 16
    python benchmarks/distributed.py --vocab 32768 --dim 2048 --out ''   # print only

Each world size is a set of processes started with ``torch.multiprocessing.spawn`` (gloo on
CPU, one torch thread per rank, so P = 2 uses two cores); each rank holds a contiguous slice of
a synthetic ``(V, d)`` weight (clustered Gaussian rows). Rows of the table, per world size P:

* ``torchaq topk``: :meth:`torchaq.distributed.VocabParallelQuantizedSoftmax.topk` -- LUT scan
  of the rank's slice, exact re-score of its candidates, one all-gather of ``B k`` (value, id)
  pairs per rank, merge;
* ``torchaq topk, consistent_candidates``: the same, with the extra all-gather of each rank's
  ``candidates`` LUT-best scores that makes the answer independent of the world size;
* ``dense + gather logits``: what inference engines do by default -- each rank computes its
  exact logits ``h @ W_r.T`` (``(B, V_r)``), one all-gather of them, ``torch.topk`` of the
  ``(B, V)`` result.

Bytes: ``sent per rank`` is the all-gather payload each rank contributes (its ``B k`` int32
pairs, or its ``(B, V_r)`` float32 logits); with gloo's all-gather every rank receives the other
``P - 1`` payloads. Timing: the same fixed number of calls on every rank (collectives forbid
per-rank adaptive repeat counts), blocks of calls after a warm-up, median and 90th percentile of
rank 0's per-call block times, reported with :mod:`benchmarks.common`; and rank 0's own CPU time
per call (its share of the work, which a loaded machine does not inflate the way it inflates
wall time). The machine is shared: the load average is in the header.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import RESULTS, Timing, emit, environment, markdown_table  # noqa: E402

K = 10


def _timed(fn, blocks: int, per_block: int, warmup: int = 3):
    """``(Timing, cpu)``: wall seconds per call over ``blocks`` blocks of ``per_block`` calls (the
    same call counts on every rank), and the median CPU seconds per call of the calling thread
    (``time.thread_time``: the rank's own work, which other processes on a shared machine cannot
    inflate; gloo's transfers run on other threads and are not in it)."""
    for _ in range(warmup):
        fn()
    dist.barrier()
    times, cpu = [], []
    for _ in range(blocks):
        t0, c0 = time.perf_counter(), time.thread_time()
        for _ in range(per_block):
            fn()
        times.append((time.perf_counter() - t0) / per_block)
        cpu.append((time.thread_time() - c0) / per_block)
    times.sort()
    cpu.sort()
    q = lambda p: times[min(len(times) - 1, int(p * len(times)))]  # noqa: E731
    return Timing(best=times[0], median=q(0.5), p90=q(0.9)), cpu[len(cpu) // 2]


def _shard(rank: int, world: int, vocab: int, dim: int):
    """This rank's rows of the synthetic weight (generated per 4096-row block, so any split gives the same rows)."""
    sizes = [vocab // world + (r < vocab % world) for r in range(world)]
    start = sum(sizes[:rank])
    gen = torch.Generator().manual_seed(0)
    centres = torch.randn(256, dim, generator=gen)
    rows = []
    block = 4096
    for b0 in range(start // block * block, start + sizes[rank], block):
        g = torch.Generator().manual_seed(1000 + b0 // block)
        n = min(block, vocab - b0)
        blk = centres[torch.randint(0, 256, (n,), generator=g)] + 0.5 * torch.randn(n, dim, generator=g)
        lo, hi = max(start, b0) - b0, min(start + sizes[rank], b0 + n) - b0
        rows.append(blk[lo:hi])
    return torch.cat(rows), sizes, centres


def _worker(rank: int, world: int, store: str, out: str, vocab: int, dim: int, batches, blocks: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world, timeout=timedelta(minutes=20))
    try:
        from torchaq.distributed import VocabParallelQuantizedSoftmax
        from torchaq.layer import default_candidates

        weight, sizes, centres = _shard(rank, world, vocab, dim)
        t0 = time.perf_counter()
        # fit_iters=0: k-means codebooks only (the scan's cost does not depend on their quality)
        layer = VocabParallelQuantizedSoftmax(weight, fit_iters=0, progress=False).eval()
        build_s = time.perf_counter() - t0
        gen = torch.Generator().manual_seed(7)
        rows = {}
        for batch in batches:
            # hidden states near random classes, scaled to a softmax entropy of a few nats
            h = 0.1 * (centres[torch.randint(0, 256, (batch,), generator=gen)] + 0.5 * torch.randn(batch, dim, generator=gen))
            width = max(sizes)

            def gather_logits():
                local = F.linear(h, weight)
                if local.shape[1] < width:
                    local = torch.cat([local, local.new_full((batch, width - local.shape[1]), -float("inf"))], 1)
                parts = [torch.empty_like(local) for _ in range(world)]
                dist.all_gather(parts, local.contiguous())
                full = torch.cat([p[:, :s] for p, s in zip(parts, sizes)], 1)
                return full.topk(K, dim=1), full

            per_block = 20 if batch <= 4 else 5
            ours, ours_cpu = _timed(lambda: layer.topk(h, k=K), blocks, per_block)
            dense, dense_cpu = _timed(gather_logits, blocks, max(1, per_block // 4))
            (top, full) = gather_logits()
            recall = float((top.indices.unsqueeze(2) == layer.topk(h, k=K)[1].unsqueeze(1)).any(2).float().mean())
            logp = full.log_softmax(1)
            entropy = float(-(logp.exp() * logp).sum(1).mean())
            layer.consistent_candidates = True
            same, same_cpu = _timed(lambda: layer.topk(h, k=K), blocks, per_block)
            recall_same = float((top.indices.unsqueeze(2) == layer.topk(h, k=K)[1].unsqueeze(1)).any(2).float().mean())
            layer.consistent_candidates = False
            cands = default_candidates(K, vocab)
            rows[batch] = {
                "same": [same.median, same.p90, same_cpu],
                "same_bytes": batch * cands * 4 + batch * 2 * K * 4,
                "recall_same": recall_same,
                "ours": [ours.median, ours.p90, ours_cpu],
                "dense": [dense.median, dense.p90, dense_cpu],
                "ours_bytes": batch * 2 * K * 4,
                "dense_bytes": batch * width * 4,
                "recall": recall,
                "entropy": entropy,
            }
        if rank == 0:
            Path(out).write_text(json.dumps({"build_s": build_s, "rows": rows}))
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocab", type=int, default=131072)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--blocks", type=int, default=7)
    parser.add_argument("--out", default=str(RESULTS / "distributed.txt"))
    args = parser.parse_args()

    header = ["P", "batch", "method", "ms/call (median)", "p90 ms", "rank 0 CPU ms/call", "sent per rank (bytes)", "received per rank (bytes)", "recall@10 vs dense", "softmax entropy (nats)"]
    table, builds = [], []
    for world in args.worlds:
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "rank0.json")
            mp.spawn(
                _worker,
                args=(world, os.path.join(tmp, "store"), out, args.vocab, args.dim, args.batches, args.blocks),
                nprocs=world,
                join=True,
            )
            res = json.loads(Path(out).read_text())
        builds.append(f"P={world}: {res['build_s']:.1f} s")
        for batch in args.batches:
            r = res["rows"][str(batch)]
            table.append([world, batch, "torchaq topk", f"{r['ours'][0] * 1e3:.3f}", f"{r['ours'][1] * 1e3:.3f}", f"{r['ours'][2] * 1e3:.3f}",
                          f"{r['ours_bytes']:,}", f"{(world - 1) * r['ours_bytes']:,}", f"{r['recall']:.3f}", f"{r['entropy']:.2f}"])
            table.append([world, batch, "torchaq topk, consistent_candidates", f"{r['same'][0] * 1e3:.3f}", f"{r['same'][1] * 1e3:.3f}", f"{r['same'][2] * 1e3:.3f}",
                          f"{r['same_bytes']:,}", f"{(world - 1) * r['same_bytes']:,}", f"{r['recall_same']:.3f}", f"{r['entropy']:.2f}"])
            table.append([world, batch, "dense + gather logits", f"{r['dense'][0] * 1e3:.3f}", f"{r['dense'][1] * 1e3:.3f}", f"{r['dense'][2] * 1e3:.3f}",
                          f"{r['dense_bytes']:,}", f"{(world - 1) * r['dense_bytes']:,}", "1.000", f"{r['entropy']:.2f}"])
    text = "\n".join(
        [
            "# Vocabulary-parallel top-k (benchmarks/distributed.py)",
            "",
            environment(f"gloo, 1 torch thread per rank, V = {args.vocab}, d = {args.dim}, k = {K}, 4-bit codes, M = d/2, default candidates"),
            "",
            markdown_table(header, table),
            "",
            "Layer construction (shared k-means codebooks fitted on rank 0 from gathered rows, then every rank encodes its slice): " + ", ".join(builds),
        ]
    )
    emit(text, args.out)


if __name__ == "__main__":
    main()
