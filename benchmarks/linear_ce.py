"""Output-layer loss at LLM vocabularies: exact fused loss vs Cut Cross-Entropy vs the full softmax vs the sampled loss.

One forward + backward of ``loss(e, c, targets)`` with ``e`` ``(N, d)`` and ``c`` ``(V, d)``
requiring grad, fp32, ``--threads`` torch threads (2 by default), per method in a fresh
subprocess. Rows:

* ``torchaq.linear_cross_entropy`` (exact, C++ op on CPU);
* Cut Cross-Entropy, ``impl="torch_compile"`` (``pip install cut-cross-entropy``; the compile is
  warmed up before timing);
* ``F.cross_entropy(e @ c.T, targets)`` (the full softmax);
* the sampled loss, ``QuantizedSoftmax(c).sampled_softmax_loss`` at default settings, at each
  ``--num-sampled`` (``sampled:DRAWS``) and, with ``--tail-grad-rows``, each number of rows
  whose full softmax gives the tail's weight gradient (``sampled:DRAWS:ROWS``). The index is
  fitted once in the parent on 16k rows and re-encoded; its refresh is not in the time.

Columns: median wall time of ``--reps`` calls after one warm-up call; peak extra resident memory
of the step (``VmHWM`` reset through ``/proc/self/clear_refs`` after the warm-up, minus the
resident memory before the step; gradients are freed before it, so every row pays for its
``(V, d)`` weight gradient); the loss's relative error against a float64 reference
(``torchaq.ops.linear_ce_reference`` in float64); the cosine and the relative squared error
``|g - g_ref|^2 / |g_ref|^2`` of the ``e`` and ``c`` gradients. Data: ``c ~ N(0, 1/d)``, ``e ~
N(0, 16)`` (a peaked softmax), uniform targets; seeded, regenerated in each subprocess.

    python benchmarks/linear_ce.py                       # (2048, 512, 131072)
    python benchmarks/linear_ce.py --shapes 2048x512x131072,4096x640x262144 --methods torchaq,sampled
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
from benchmarks.common import emit, environment, markdown_table  # noqa: E402

METHODS = ("torchaq", "cce", "full", "sampled")


def make_data(n: int, d: int, v: int):
    g = torch.Generator().manual_seed(0)
    c = torch.randn(v, d, generator=g) / d**0.5
    e = torch.randn(n, d, generator=g) * 4.0
    t = torch.randint(0, v, (n,), generator=g)
    return e, c, t


def rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def child(args) -> None:
    torch.set_num_threads(args.threads)
    n, d, v = (int(x) for x in args.shape.split("x"))
    e, c, t = make_data(n, d, v)
    method, _, sampled = args.child.partition(":")
    draws, _, tail_rows = sampled.partition(":")  # sampled:DRAWS[:TAIL_GRAD_ROWS]
    tail = {} if not tail_rows else dict(tail_grad_rows=int(tail_rows))
    e.requires_grad_()
    if method == "sampled":
        layer = torchaq.QuantizedSoftmax(c.clone(), torch.zeros(v), num_subspaces=d // 2, fit=False, progress=False)
        layer.load_state_dict(torch.load(args.state))
        gen = torch.Generator().manual_seed(1)
        params = [layer.weight]

        def loss_fn():
            return layer.sampled_softmax_loss(e, t, num_sampled=int(draws), generator=gen, **tail)
    else:
        c.requires_grad_()
        params = [c]
        if method == "torchaq":
            def loss_fn():
                return torchaq.linear_cross_entropy(e, c, t)
        elif method == "cce":
            from cut_cross_entropy import linear_cross_entropy as cce

            def loss_fn():
                return cce(e, c, t, impl="torch_compile")
        else:
            def loss_fn():
                return F.cross_entropy(e @ c.T, t)

    def step():
        loss = loss_fn()
        loss.backward()
        return loss

    def clear():
        e.grad = None
        for p in params:
            p.grad = None

    step()
    clear()
    times = []
    base = rss_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak resident set (VmHWM) to the current one
    for _ in range(args.reps):
        clear()
        t0 = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - t0)
    peak = rss_kb("VmHWM")
    torch.save({"loss": float(loss), "ge": e.grad, "gc": params[0].grad}, args.grads)
    times.sort()
    print(json.dumps(dict(s=times[len(times) // 2], best=times[0], peak_mb=(peak - base) / 1024)))


def reference(n: int, d: int, v: int):
    e, c, t = make_data(n, d, v)
    torch.set_num_threads(2)
    loss, _, ge, gc, _ = torchaq.ops.linear_ce_reference(e.double(), c.double(), None, t,
                                                         torch.full((n,), 1.0 / n, dtype=torch.float64),
                                                         -100, 0.0, 0.0, 0.0, 8192, 0)
    return float(loss.mean()), ge, gc


def quality(got: dict, ref) -> dict:
    loss, ge, gc = ref
    out = {"loss_rel": abs(got["loss"] - loss) / abs(loss)}
    for name, g, r in (("e", got["ge"], ge), ("c", got["gc"], gc)):
        g = g.double()
        out[f"cos_{name}"] = float((g * r).sum() / (g.norm() * r.norm()))
        out[f"err_{name}"] = float((g - r).pow(2).sum() / r.pow(2).sum())
    return out


def fit_state(n: int, d: int, v: int, path: str) -> None:
    _, c, _ = make_data(n, d, v)
    layer = torchaq.QuantizedSoftmax(c, torch.zeros(v), num_subspaces=d // 2, fit=False, progress=False)
    layer.quantizer.fit(c[torch.randperm(v, generator=torch.Generator().manual_seed(1))[:16384]], iters=1, progress=False)
    layer.refresh()
    torch.save(layer.state_dict(), path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="2048x512x131072", help="comma-separated NxdxV")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--num-sampled", default="4096,512")
    parser.add_argument("--tail-grad-rows", default="", help="comma-separated tail_grad_rows of the sampled rows "
                        "(one row per value and --num-sampled; default: the library's)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--shape", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--state", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--grads", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "linear_ce.txt"))
    args = parser.parse_args(argv)
    if args.child:
        return child(args)
    methods = args.methods.split(",")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for shape in args.shapes.split(","):
            n, d, v = (int(x) for x in shape.split("x"))
            state = os.path.join(tmp, "state.pt")
            runs = []
            for m in methods:
                if m == "sampled":
                    fit_state(n, d, v, state)
                    tails = [f":{r}" for r in args.tail_grad_rows.split(",")] if args.tail_grad_rows else [""]
                    runs += [f"sampled:{k}{r}" for k in args.num_sampled.split(",") for r in tails]
                else:
                    runs.append(m)
            ref = reference(n, d, v)
            for run in runs:
                grads = os.path.join(tmp, "grads.pt")
                cmd = [sys.executable, __file__, "--child", run, "--shape", shape, "--state", state, "--grads", grads,
                       "--threads", str(args.threads), "--reps", str(args.reps)]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode:
                    print(proc.stderr[-2000:], file=sys.stderr)
                    rows.append([shape, run, "failed", "", "", "", "", "", ""])
                    continue
                res = json.loads(proc.stdout.strip().splitlines()[-1])
                q = quality(torch.load(grads), ref)
                rows.append([shape, run, f"{res['s']:.2f}", f"{res['best']:.2f}", f"{res['peak_mb']:.0f}",
                             f"{q['loss_rel']:.1e}", f"{q['cos_e']:.7f}", f"{q['cos_c']:.7f}",
                             f"{q['err_e']:.1e} / {q['err_c']:.1e}"])
                print(rows[-1], flush=True)
    table = markdown_table(["N x d x V", "method", "median s", "best s", "peak extra MB", "loss rel err",
                            "cos grad e", "cos grad c", "rel sq err e / c"], rows)
    torch.set_num_threads(args.threads)
    emit(environment("fp32, forward + backward, one subprocess per row") + "\n\n" + table, args.out)


if __name__ == "__main__":
    main()
