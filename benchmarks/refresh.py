"""Cost of ``QuantizedSoftmax.refresh()`` after a training step that touched a fraction of the rows.

A layer is fitted once on a synthetic low-rank head (rows in a 64-dim subspace plus noise, the
anisotropic rule ``eta`` fixed so no calibration runs); then, for each fraction, that many random
rows get a small update in place (as a sparse / sampled-softmax step would) and ``refresh()`` is
timed, against a full re-encode of all ``V`` rows (``quantizer.encode`` + ``pack``, what refresh
did before it was incremental). Also timed: ``refresh()`` when nothing changed (since writes
through ``weight.data`` move no version counter, this is the ``O(V d)`` fingerprint pass alone).

    python benchmarks/refresh.py            # V = 32768, d = 1024, M = 512 (about a minute)

Writes ``benchmarks/results/refresh.txt``.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torchaq  # noqa: E402
from benchmarks.common import RESULTS, emit, environment, markdown_table  # noqa: E402
from benchmarks.quality import low_rank_head  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--v", type=int, default=32768)
    ap.add_argument("--d", type=int, default=1024)
    ap.add_argument("--m", type=int, default=512)
    ap.add_argument("--fractions", type=float, nargs="*", default=[0.0, 0.01, 0.05, 0.25, 1.0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(RESULTS / "refresh.txt"))
    args = ap.parse_args(argv)

    weight, _ = low_rank_head(args.v, args.d, 1)
    layer = torchaq.QuantizedSoftmax(weight, num_subspaces=args.m, eta=4.0, progress=False, fit_iters=1)
    gen = torch.Generator().manual_seed(0)

    def full() -> float:
        t0 = time.perf_counter()
        layer.quantizer.pack(layer.quantizer.encode(layer.weight.detach()))
        return time.perf_counter() - t0

    t_full = min(full() for _ in range(args.repeats))
    rows = [["full re-encode of all rows (before)", "-", f"{t_full:.3f}", "100%"]]
    for frac in args.fractions:
        times = []
        for _ in range(args.repeats):
            count = int(round(frac * args.v))
            if count:
                idx = torch.randperm(args.v, generator=gen)[:count]
                with torch.no_grad():
                    layer.weight[idx] += 0.01 * torch.randn(count, args.d, generator=gen) / args.d ** 0.5
            t0 = time.perf_counter()
            layer.refresh()
            times.append(time.perf_counter() - t0)
        t = min(times)
        rows.append([f"refresh() after {frac:.0%} of rows moved", f"{int(round(frac * args.v))}",
                     f"{t:.3f}", f"{100 * t / t_full:.1f}%"])
    text = "\n".join([
        "command: python benchmarks/refresh.py " + " ".join(sys.argv[1:] if argv is None else argv),
        f"QuantizedSoftmax.refresh() at V={args.v}, d={args.d}, M={args.m}, 4-bit, eta=4 (synthetic low-rank rows); "
        f"best of {args.repeats}, seconds",
        environment(),
        "",
        markdown_table(["what", "rows moved", "s", "of a full re-encode"], rows),
    ])
    emit(text, args.out)


if __name__ == "__main__":
    main()
