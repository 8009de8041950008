"""Output-layer training step: full softmax vs torchaq's sampled softmax, time and activation memory.

One forward + backward of the output layer alone (``h`` requires grad, weight and bias are
parameters) for ``B`` rows, at a large vocabulary (synthetic weights, V = 131072, d = 256 by
default). Each method runs in its own subprocess. Memory is what autograd saves for the
backward pass of one step (unique storages seen by ``saved_tensors_hooks``, parameters
excluded): the part that scales with ``B * V`` for the full softmax. The ``(V, d)`` weight
gradient is the same for every method and not counted.

    python benchmarks/sampled_softmax.py [--vocab 131072 --dim 256 --batch 512 --num-sampled 1024,4096]

(``examples/train_lm.py`` reaches the full softmax's perplexity with ``num_sampled = 4096``.)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torchaq  # noqa: E402
from benchmarks.report import emit  # noqa: E402

METHODS = ("full", "uniform", "quantized")


def make_layer(vocab: int, dim: int, fit: bool) -> torchaq.QuantizedSoftmax:
    weight = torch.randn(vocab, dim, generator=torch.Generator().manual_seed(0)) / dim**0.5
    return torchaq.QuantizedSoftmax(weight, torch.zeros(vocab), num_subspaces=dim // 4, fit=fit, fit_iters=1, progress=fit)


def one_method(method: str, vocab: int, dim: int, batch: int, num_sampled: int, repeats: int, state: str) -> dict:
    # the index was fitted by the parent process: fitting here would raise the high-water mark
    layer = make_layer(vocab, dim, fit=False)
    layer.load_state_dict(torch.load(state))
    gen = torch.Generator().manual_seed(1)
    h = torch.randn(batch, dim, generator=gen).requires_grad_()
    target = torch.randint(0, vocab, (batch,), generator=gen)

    saved = {}

    def pack(t):  # record every tensor autograd keeps for the backward pass (unique storages)
        if t.device.type == "cpu" and t.untyped_storage().data_ptr() not in saved:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    def step():
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            if method == "full":
                loss = F.cross_entropy(layer(h), target)
            else:
                loss = layer.sampled_softmax_loss(h, target, num_sampled=num_sampled, sampler=method, generator=gen)
        loss.backward()
        layer.zero_grad(set_to_none=False)  # keep the gradient buffers: a training loop does
        h.grad = None

    step()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    times.sort()
    # saved-for-backward memory of one step, minus the parameters themselves (held anyway)
    params = {p.untyped_storage().data_ptr() for p in layer.parameters()} | {h.untyped_storage().data_ptr()}
    saved.clear()
    step()
    saved_mb = sum(v for k, v in saved.items() if k not in params) / 2**20
    return dict(method=method, ms=1e3 * times[len(times) // 2], saved_mb=saved_mb)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=131_072)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--num-sampled", default="1024,4096", help="comma-separated; one row per value and sampler")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--state", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "sampled_softmax.txt"))
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(one_method(args.child, args.vocab, args.dim, args.batch, int(args.num_sampled), args.repeats,
                                    args.state)))
        return
    counts = [int(n) for n in args.num_sampled.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        state = os.path.join(tmp, "layer.pt")
        torch.save(make_layer(args.vocab, args.dim, fit=True).state_dict(), state)
        runs = [("full", counts[0])] + [(m, n) for n in counts for m in METHODS[1:]]
        for method, n in runs:
            cmd = [sys.executable, __file__, "--child", method, "--vocab", str(args.vocab), "--dim", str(args.dim),
                   "--batch", str(args.batch), "--num-sampled", str(n), "--repeats", str(args.repeats),
                   "--state", state]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=os.environ.copy())
            rows.append({**json.loads(out.stdout.strip().splitlines()[-1]), "num_sampled": n if method != "full" else "-"})
    full = rows[0]
    lines = [
        f"output layer fwd+bwd, V = {args.vocab}, d = {args.dim}, B = {args.batch}; "
        f"CPU, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "",
        "| method | num_sampled | ms / step (median) | speed-up vs full | saved for backward MB |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['method']} | {r['num_sampled']} | {r['ms']:.1f} | {full['ms'] / r['ms']:.1f}x "
                     f"| {r['saved_mb']:.1f} |")
    text = "\n".join(lines)
    emit(text, args.out)


if __name__ == "__main__":
    main()
