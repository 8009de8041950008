"""Vocabulary-parallel layer: time and bytes per call of each mode at P = 1, 2, 4 ranks, against gathering full logits.

    python benchmarks/distributed.py                  # V = 65536, d = 512, P = 1 2 4, batch 1 and 64
    python benchmarks/distributed.py --quick          # V = 16384, d = 256, fewer blocks
    python benchmarks/distributed.py --vocab 32768 --dim 2048 --out ''   # print only

Each world size is a set of processes started with ``torch.multiprocessing.spawn`` (gloo on
CPU, one torch thread per rank); each rank holds a contiguous slice of a synthetic ``(V, d)``
weight (clustered Gaussian rows). Rows of the table, per world size P and batch:

* ``topk (invariant)``: :meth:`VocabParallelQuantizedSoftmax.topk` in the default mode (bitwise
  the single-device answer: all-gather of the scan scores, all-gather of the shortlist);
* ``topk (per-rank)``: ``invariant=False`` (one all-gather of ``B k`` pairs per rank);
* ``log_softmax_topk`` in both modes (the invariant one adds the fixed-point ``log Z`` rounds);
* ``header only``: the per-call agreement sent alone (:mod:`torchaq.distributed.agreement`: the
  local argument checks, the checksum of ``h`` and one fixed-size all-gather of the header and
  its payload slot); inside a call the header rides with the call's first payload when it fits;
* ``..., no header`` rows time each mode with the agreement switched off
  (``layer.agreement = False``). Those blocks alternate with the blocks of the same call with the
  header, and the last column is the median over pairs of adjacent blocks of (with - without):
  what the header adds to the call, in wall time and in rank 0's CPU time. Pairing cancels most of
  the drift of a shared 2-core machine, which separate runs of each do not;
* ``dense + gather logits``: each rank's exact ``h @ W_r.T``, one all-gather of the ``(B, V_r)``
  logits, ``torch.topk`` of the ``(B, V)`` result (what inference engines do by default).

Bytes: ``sent per rank`` is what the rank contributes to every collective of one call, counted
by wrapping ``torch.distributed``'s collectives (all-gathers, all-reduces, broadcasts) during one
call on rank 0; with gloo's all-gather every rank receives the other ``P - 1`` contributions.
Timing: the same fixed number of calls on every rank (collectives forbid per-rank adaptive repeat
counts), blocks of calls after a warm-up, median and 90th percentile of rank 0's per-call block
times; and rank 0's own CPU time per call. With P = 4 on a 2-core machine the ranks share cores:
the wall times then include waiting for a core. The machine is shared: the load average is in
the header.
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


def _block(fn, per_block: int):
    """``(wall, cpu)`` seconds per call of ``per_block`` calls of ``fn``; cpu is the calling thread's
    (``time.thread_time``: the rank's own work, which other processes on a shared machine cannot
    inflate; gloo's transfers run on other threads and are not in it)."""
    t0, c0 = time.perf_counter(), time.thread_time()
    for _ in range(per_block):
        fn()
    return (time.perf_counter() - t0) / per_block, (time.thread_time() - c0) / per_block


def _median(xs):
    return sorted(xs)[len(xs) // 2]


def _summary(runs):
    """``(Timing of the wall times, median CPU time)`` of :func:`_block` results."""
    times = sorted(w for w, _ in runs)
    q = lambda p: times[min(len(times) - 1, int(p * len(times)))]  # noqa: E731
    return Timing(best=times[0], median=q(0.5), p90=q(0.9)), _median([c for _, c in runs])


def _timed(fn, blocks: int, per_block: int, warmup: int = 3):
    """``(Timing, cpu)``: wall seconds per call over ``blocks`` blocks of ``per_block`` calls (the
    same call counts on every rank), and the median CPU seconds per call (:func:`_block`)."""
    for _ in range(warmup):
        fn()
    dist.barrier()
    return _summary([_block(fn, per_block) for _ in range(blocks)])


def _timed_pair(with_header, without, blocks: int, per_block: int, warmup: int = 3):
    """:func:`_timed` of two calls in alternating blocks: ``(timing, cpu)`` of each, and the medians over
    block pairs of the wall and CPU differences (with - without), seconds per call."""
    for _ in range(warmup):
        with_header()
        without()
    dist.barrier()
    on, off = [], []
    for _ in range(blocks):
        on.append(_block(with_header, per_block))
        off.append(_block(without, per_block))
    wall_diff = _median([a[0] - b[0] for a, b in zip(on, off)])
    cpu_diff = _median([a[1] - b[1] for a, b in zip(on, off)])
    return _summary(on), _summary(off), (wall_diff, cpu_diff)


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


class _ByteCounter:
    """Counts the bytes this rank contributes to torch.distributed collectives while active."""

    NAMES = ("all_gather_single", "all_gather_into_tensor", "all_reduce", "broadcast", "all_gather")

    def __init__(self):
        self.total, self.saved = 0, {}

    def __enter__(self):
        for name in self.NAMES:
            fn = getattr(dist, name, None)
            if fn is None:
                continue
            self.saved[name] = fn
            tensor_pos = 1 if name in ("all_gather_single", "all_gather_into_tensor", "all_gather") else 0

            def wrapped(*args, _fn=fn, _pos=tensor_pos, **kwargs):
                t = args[_pos] if len(args) > _pos else kwargs.get("tensor", kwargs.get("input_tensor"))
                if isinstance(t, torch.Tensor):
                    self.total += t.numel() * t.element_size()
                return _fn(*args, **kwargs)

            setattr(dist, name, wrapped)
        return self

    def __exit__(self, *exc):
        for name, fn in self.saved.items():
            setattr(dist, name, fn)


def _worker(rank: int, world: int, store: str, out: str, vocab: int, dim: int, batches, blocks: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world, timeout=timedelta(minutes=20))
    try:
        from torchaq.distributed import VocabParallelQuantizedSoftmax

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

            def mode(invariant, fn):
                def call():
                    layer.invariant = invariant
                    return fn()
                return call

            def unchecked(fn):
                def call():
                    layer.agreement = False
                    try:
                        return fn()
                    finally:
                        layer.agreement = True
                return call

            calls = {
                "topk (invariant)": mode(True, lambda: layer.topk(h, k=K)),
                "topk (per-rank)": mode(False, lambda: layer.topk(h, k=K)),
                "log_softmax_topk (invariant)": mode(True, lambda: layer.log_softmax_topk(h, k=K)),
                "log_softmax_topk (per-rank)": mode(False, lambda: layer.log_softmax_topk(h, k=K)),
                "header only": lambda: layer.begin("topk", h, K, None),
                "dense + gather logits": gather_logits,
            }
            (top, full) = gather_logits()
            logp = full.log_softmax(1)
            result = {"entropy": float(-(logp.exp() * logp).sum(1).mean())}
            per_block = 20 if batch <= 4 else 4
            for name, fn in calls.items():
                with _ByteCounter() as counter:
                    got = fn()
                bare_bytes = 0
                if name in ("header only", "dense + gather logits"):
                    timing, cpu = _timed(fn, blocks, per_block if "dense" not in name else max(1, per_block // 4))
                    bare = added = None
                else:
                    with _ByteCounter() as bare_counter:
                        unchecked(fn)()
                    bare_bytes = bare_counter.total
                    n = per_block if "log_softmax" not in name else max(1, per_block // 4)
                    (timing, cpu), bare, added = _timed_pair(fn, unchecked(fn), 2 * blocks + 1, n)
                recall = ""
                if name.startswith("topk"):
                    recall = f"{float((top.indices.unsqueeze(2) == got[1].unsqueeze(1)).any(2).float().mean()):.3f}"
                elif name.startswith("dense"):
                    recall = "1.000"
                result[name] = [timing.median, timing.p90, cpu, counter.total, recall, added]
                if bare is not None:
                    result[name + ", no header"] = [bare[0].median, bare[0].p90, bare[1], bare_bytes, recall, None]
            layer.invariant = True
            rows[batch] = result
        if rank == 0:
            Path(out).write_text(json.dumps({"build_s": build_s, "rows": rows}))
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocab", type=int, default=65536)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--blocks", type=int, default=15, help="timed blocks (pairs with and without the header: 2 x blocks + 1)")
    parser.add_argument("--quick", action="store_true", help="V = 16384, d = 256, 3 blocks")
    parser.add_argument("--out", default=str(RESULTS / "distributed.txt"))
    args = parser.parse_args()
    if args.quick:
        args.vocab, args.dim, args.blocks = 16384, 256, 3

    header = ["P", "batch", "method", "ms/call (median)", "p90 ms", "rank 0 CPU ms/call", "sent per rank (bytes)",
              "received per rank (bytes)", "what the header adds: wall ms (% of the call), CPU ms", "recall@10 vs dense",
              "softmax entropy (nats)"]
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
            names = [n for mode in ("topk (invariant)", "topk (per-rank)", "log_softmax_topk (invariant)", "log_softmax_topk (per-rank)")
                     for n in (mode, mode + ", no header")] + ["header only", "dense + gather logits"]
            for name in names:
                med, p90, cpu, sent, recall, added = r[name]
                share = ""
                if added is not None:
                    wall, cpu_added = added
                    share = f"{wall * 1e3:+.3f} ({100 * wall / med:+.1f}%), {cpu_added * 1e3:+.3f}"
                table.append([world, batch, name, f"{med * 1e3:.3f}", f"{p90 * 1e3:.3f}", f"{cpu * 1e3:.3f}", f"{sent:,}",
                              f"{(world - 1) * sent:,}", share, recall, f"{r['entropy']:.2f}"])
    text = "\n".join(
        [
            "# Vocabulary-parallel layer: time and bytes per call (benchmarks/distributed.py)",
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
