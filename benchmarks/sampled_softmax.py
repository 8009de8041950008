"""Output-layer training step: full softmax, chunked exact cross-entropy and sampled softmax; gradient quality.

Two parts, one results file each:

* ``--part time`` (``benchmarks/results/sampled_softmax.txt``): one forward + backward of the
  output layer alone (``h`` requires grad, weight and bias are parameters) for ``B`` rows, on
  synthetic weights, at ``V = 30522, d = 128, B = 1024`` (``examples/train_lm.py``'s shape) and
  ``V = 131072, d = 256, B = 512``. Rows: the full softmax, ``torchaq.chunked_cross_entropy``
  (exact, ``O(B chunk)`` memory), and the uniform / unigram / quantized samplers at each
  ``--num-sampled`` (quantized: both proposals, ``candidates`` and ``lut`` with its LUT pass on
  128 rows, 64 rows or every row: ``lut/128``, ``lut/64`` (the default: a hard set of 96 of 192
  candidates), ``lut/all``; ``lut/64+hard32``: the earlier default, a hard set of 32 of 128). The quantized sampler's time includes the index refresh amortised over
  ``--reencode-every`` steps (the time of one ``layer.refresh()`` divided by it). CPU time of
  the thread (one torch thread), so other processes on a shared machine do not inflate it.
  Memory: what autograd saves for backward (unique storages seen by ``saved_tensors_hooks``,
  parameters excluded) and the step's peak allocation (the profiler's "Total Allocated").
* ``--part quality`` (``benchmarks/results/sampled_softmax_quality.txt``): the gradient of the
  summed loss of held-out real hidden states (MiniLM table, ``examples/real_data.py``; logits
  scaled to a mean softmax entropy of ``--entropy`` nats; targets drawn from that softmax)
  against the full softmax's: mean per-row cosine of the ``h`` gradient (all rows, and the rows
  below the median ``|grad|``), the batch relative squared error ``sum |g_s - g|^2 / sum |g|^2``,
  the weight-gradient cosine, the spread of ``log Z_hat - log Z`` (the control variate's effect),
  and the time of the step. The reference is the full softmax's gradient in float64 in a form
  exact on confident rows (``reference_gradients``) and cosines are taken between normalised
  rows; the float32 full softmax (``F.cross_entropy``) is a row of the table: it rounds ``1 -
  p_t`` away on confident rows, so measured against it (or with ``F.cosine_similarity``, whose
  eps zeroes the cosine of rows of norm ~1e-12) every method's cosine on the small-gradient
  rows stalls near 0.9 whatever the number of draws.

    python benchmarks/sampled_softmax.py --part time
    python benchmarks/sampled_softmax.py --part quality
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torchaq  # noqa: E402
from benchmarks.common import emit, environment, markdown_table, time_call  # noqa: E402

SHAPES = ((30522, 128, 1024), (131072, 256, 512))


def make_layer(vocab: int, dim: int, fit: bool) -> torchaq.QuantizedSoftmax:
    weight = torch.randn(vocab, dim, generator=torch.Generator().manual_seed(0)) / dim**0.5
    layer = torchaq.QuantizedSoftmax(weight, torch.zeros(vocab), num_subspaces=dim // 2, fit=False, progress=False)
    if fit:  # codebooks from a subsample of rows (fast), then every row encoded
        layer.quantizer.fit(weight[torch.randperm(vocab, generator=torch.Generator().manual_seed(1))[:16384]],
                            iters=1, progress=False)
        layer.refresh()
    return layer


def loss_fn(method, layer, h, target, num_sampled, gen, counts):
    if method == "full":
        return F.cross_entropy(layer(h), target)
    if method == "chunked":
        return torchaq.chunked_cross_entropy(h, layer.weight, layer.bias, target)
    sampler, _, proposal = method.partition(" ")  # "quantized lut" / "quantized lut/128" / "quantized lut/64+hard32"
    proposal, _, hard = proposal.partition("+hard")
    proposal, _, rows = proposal.partition("/")
    extra = {"proposal": proposal} if proposal else {}
    if rows:
        extra["lut_rows"] = None if rows == "all" else int(rows)
    if hard:  # a larger hard set: num_hard = H, num_candidates = 2 H
        extra.update(num_hard=int(hard), num_candidates=2 * int(hard))
    return layer.sampled_softmax_loss(h, target, num_sampled=num_sampled, sampler=sampler, generator=gen,
                                      class_counts=counts, **extra)


def one_method(method, vocab, dim, batch, num_sampled, min_time, state, reencode_every) -> dict:
    torch.set_num_threads(1)
    layer = make_layer(vocab, dim, fit=False)
    layer.load_state_dict(torch.load(state))
    gen = torch.Generator().manual_seed(1)
    h = torch.randn(batch, dim, generator=gen).mul_(4.0).requires_grad_()  # peaked softmax, like a trained LM
    target = torch.randint(0, vocab, (batch,), generator=gen)
    counts = 1.0 / torch.arange(1, vocab + 1).float()  # Zipf-like unigram counts

    saved = {}

    def pack(t):
        if t.device.type == "cpu" and t.untyped_storage().data_ptr() not in saved:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    def step():
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = loss_fn(method, layer, h, target, num_sampled, gen, counts)
        loss.backward()
        layer.zero_grad(set_to_none=False)  # keep the gradient buffers: a training loop does
        h.grad = None

    timing = time_call(step, min_run_time=min_time, cpu_time=True)
    refresh_ms = 0.0
    if method.startswith("quantized"):
        noise = 1e-3 * torch.randn(layer.weight.shape, generator=torch.Generator().manual_seed(2))

        def refresh_after_a_step():  # an optimiser step moves every row (AdamW decays them all): re-encode
            with torch.no_grad():
                layer.weight.add_(noise)
            layer.refresh()

        refresh_ms = time_call(refresh_after_a_step, min_run_time=min_time, warmup=0, cpu_time=True).ms / reencode_every
    params = {p.untyped_storage().data_ptr() for p in layer.parameters()} | {h.untyped_storage().data_ptr()}
    saved.clear()
    step()
    saved_mb = sum(v for k, v in saved.items() if k not in params) / 2**20
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    with tempfile.TemporaryDirectory() as tmp:
        prof.export_chrome_trace(os.path.join(tmp, "trace.json"))
        with open(os.path.join(tmp, "trace.json")) as f:
            events = json.load(f)["traceEvents"]
    peak_mb = max((e["args"].get("Total Allocated", 0) for e in events if e.get("name") == "[memory]"), default=0) / 2**20
    return dict(method=method, ms=timing.ms, refresh_ms=refresh_ms, saved_mb=saved_mb, peak_mb=peak_mb)


def part_time(args) -> None:
    counts = [int(n) for n in args.num_sampled.split(",")]
    tables = []
    for vocab, dim, batch in SHAPES:
        rows = []
        with tempfile.TemporaryDirectory() as tmp:
            state = os.path.join(tmp, "layer.pt")
            torch.save(make_layer(vocab, dim, fit=True).state_dict(), state)
            samplers = ("uniform", "unigram", "quantized candidates", "quantized lut/128", "quantized lut/64",
                        "quantized lut/all", "quantized lut/64+hard32")
            runs = [("full", 0), ("chunked", 0)] + [(m, n) for n in counts for m in samplers]
            for method, n in runs:
                cmd = [sys.executable, __file__, "--child", method, "--shape", f"{vocab},{dim},{batch}",
                       "--num-sampled", str(n), "--min-time", str(args.min_time), "--state", state,
                       "--reencode-every", str(args.reencode_every)]
                out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=os.environ.copy())
                rows.append({**json.loads(out.stdout.strip().splitlines()[-1]), "num_sampled": n or "-"})
        full = rows[0]["ms"]
        table = markdown_table(
            ["method", "num_sampled", "fwd+bwd ms (CPU time, 1 thread)", "+ refresh ms (amortised)", "total ms",
             "speed-up vs full", "saved for backward MB", "peak MB of the step"],
            [[r["method"], r["num_sampled"], f"{r['ms']:.1f}", f"{r['refresh_ms']:.1f}", f"{r['ms'] + r['refresh_ms']:.1f}",
              f"{full / (r['ms'] + r['refresh_ms']):.1f}x", f"{r['saved_mb']:.1f}", f"{r['peak_mb']:.0f}"] for r in rows])
        tables.append(f"V = {vocab}, d = {dim}, B = {batch}; refresh = one re-encode of every row (all moved by a step) / "
                      f"{args.reencode_every} steps\n\n{table}")
    emit("\n\n".join([environment(), "python benchmarks/sampled_softmax.py --part time"] + tables), args.out)


def part_quality(args) -> None:
    from examples.real_data import load_minilm

    torch.set_num_threads(max(1, torch.get_num_threads()))
    table, queries = load_minilm(num_queries=8000, seed=0, progress=False)
    vocab, dim = table.shape
    eval_q = queries[-args.rows:]
    layer = torchaq.QuantizedSoftmax(table, None, num_subspaces=dim // 2, fit=False, progress=False)
    pick = torch.randperm(vocab, generator=torch.Generator().manual_seed(1))[:8192]
    layer.quantizer.fit(table[pick], iters=1, progress=False)  # isotropic codebooks from a subsample of rows
    layer.refresh()  # every row encoded

    def entropy(scale):
        logp = (eval_q * scale @ table.T).log_softmax(1)
        return float(-(logp.exp() * logp).sum(1).mean())

    lo, hi = 1e-2, 1e3
    for _ in range(50):
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if entropy(mid) > args.entropy else (lo, mid)
    scale = math.sqrt(lo * hi)
    h = eval_q * scale
    full_logits = h @ table.T
    target = torch.multinomial(full_logits.softmax(1), 1, generator=torch.Generator().manual_seed(0)).squeeze(1)

    def grads(fn):
        x = h.clone().requires_grad_()
        layer.weight.grad = None
        loss = fn(x)
        loss.sum().backward()
        return x.grad.clone(), layer.weight.grad.clone(), loss.detach()

    g, big_g, full_loss = reference_gradients(h, table, target)
    norms = g.norm(dim=1)
    small = norms < norms.median()
    rows = [quality_row("full softmax, float32 (F.cross_entropy)", "-", None, layer, target, g, big_g, small,
                        full_loss, grads, 1)]
    configs = [
        ("uniform", dict(sampler="uniform")),
        ("quantized, candidates proposal (default 96 hard / 192), no control variate", dict(sampler="quantized", proposal="candidates",
                                                                   control_variate=False)),
        ("quantized, candidates proposal + their control variate", dict(sampler="quantized", proposal="candidates")),
        ("quantized, whole-LUT mixture + LUT-sum control variate, LUT pass on every row",
         dict(sampler="quantized", proposal="lut", lut_rows=None)),
        ("quantized, whole-LUT mixture, every row, no control variate (plain Horvitz-Thompson)",
         dict(sampler="quantized", proposal="lut", lut_rows=None, control_variate=False)),
        ("quantized, whole-LUT mixture, LUT pass on 128 rows", dict(sampler="quantized", proposal="lut",
                                                                     lut_rows=128)),
        ("quantized (default: whole-LUT mixture, LUT pass on 64 rows, 96 hard / 192 candidates, tail weight gradient "
         "from 64 rows)", dict(sampler="quantized")),
        ("quantized, the default with the draws' weight gradient (tail_grad_rows=0)",
         dict(sampler="quantized", tail_grad_rows=0)),
        ("quantized, whole-LUT mixture, every row, no floor (lut_share 1)",
         dict(sampler="quantized", proposal="lut", lut_rows=None, lut_share=1.0)),
        ("quantized, whole-LUT mixture, every row, 64 hard / 192 candidates",
         dict(sampler="quantized", proposal="lut", lut_rows=None, num_hard=64)),
        ("quantized, whole-LUT mixture, every row, 128 hard / 256 candidates",
         dict(sampler="quantized", proposal="lut", lut_rows=None, num_hard=128, num_candidates=256)),
        ("quantized, the earlier default: 32 hard / 128 candidates", dict(sampler="quantized", num_hard=32,
                                                                            num_candidates=128)),
        ("quantized, top candidates, 64 hard / 512 candidates", dict(sampler="quantized", proposal="candidates",
                                                                      num_hard=64, num_candidates=512)),
    ]
    for m in (512, 2048):
        for name, kw in configs:
            rows.append(quality_row(name, m, kw, layer, target, g, big_g, small, full_loss, grads, args.reps))
    for m in (4, 16):  # each row its own m draws: (B, m, d) gathers
        rows.append(quality_row("quantized, candidates proposal, per-row draws (no sharing)", m,
                                dict(sampler="quantized", proposal="candidates", share_draws=False),
                                layer, target, g, big_g, small, full_loss, grads, args.reps))
    table_md = markdown_table(
        ["sampler", "num_sampled", "mean cos(h grad)", "cos, rows below median |grad|", "batch rel. sq. error",
         "weight-grad cos", "sd of log Z_hat - log Z", "mean log Z_hat - log Z", "ms / step"], rows)
    head = (f"held-out MiniLM hidden states: {args.rows} rows, V = {vocab}, d = {dim}, logits scaled x{scale:.2f} to mean "
            f"entropy {entropy(scale):.2f} nats, targets drawn from that softmax; PQ {dim // 2} subspaces x 4 bits "
            f"(isotropic codebooks fitted on 8192 rows); summed loss; mean over {args.reps} draws; reference: the full "
            f"softmax's gradient in float64 with 1 - p_t = sum of the other p (reference_gradients); cosines of "
            f"normalised rows")
    emit("\n".join([environment(), "python benchmarks/sampled_softmax.py --part quality", head, "", table_md]), args.out_quality)


def reference_gradients(h, weight, target):
    """The full softmax's summed-loss gradients in float64, in the form that keeps confident rows exact.

    ``dL/dh_b = sum_{c != t} p_bc (w_c - w_t)`` and ``dL/dw_c = sum_b (p_bc - 1[c = t_b]) h_b`` with
    ``1 - p_bt`` taken as ``sum_{c != t} p_bc``: ``p_t - 1`` itself rounds to 0 (float32) or to
    a multiple of 1e-16 (float64) on a row whose target is near-certain, so autograd of the
    cross-entropy gets those rows' direction wrong in either precision. Returns float64 ``(g_h,
    g_W, loss)``.
    """
    h64, w64 = h.double(), weight.double()
    logits = h64 @ w64.T
    logp = logits.log_softmax(1)
    p_other = logp.exp().scatter(1, target.unsqueeze(1), 0.0)
    rest = p_other.sum(1, keepdim=True)
    g = p_other @ w64 - rest * w64[target]
    big_g = p_other.T @ h64
    big_g.index_add_(0, target, -rest * h64)
    return g, big_g, -logp.gather(1, target.unsqueeze(1)).squeeze(1)


def row_cosine(a, b):
    """Per-row cosine in float64 after normalising each row (``F.cosine_similarity``'s eps turns the
    cosine of two rows of norm ~1e-12 into 0)."""
    a, b = a.double(), b.double()
    a = a / a.norm(dim=1, keepdim=True).clamp_min(1e-300)
    b = b / b.norm(dim=1, keepdim=True).clamp_min(1e-300)
    return (a * b).sum(1)


def quality_row(name, m, kw, layer, target, g, big_g, small, full_loss, grads, reps):
    import time

    cos, cos_small, rel, wcos, dz, secs = [], [], [], [], [], []
    for r in range(reps):
        t0 = time.perf_counter()
        if kw is None:
            gs, big_gs, loss = grads(lambda x: F.cross_entropy(layer(x), target, reduction="none"))
        else:
            gs, big_gs, loss = grads(lambda x: layer.sampled_softmax_loss(
                x, target, num_sampled=m, reduction="none", generator=torch.Generator().manual_seed(r), **kw))
        secs.append(time.perf_counter() - t0)
        c = row_cosine(gs, g)
        cos.append(float(c.mean()))
        cos_small.append(float(c[small].mean()))
        rel.append(float(((gs.double() - g) ** 2).sum() / (g**2).sum()))
        wcos.append(float(row_cosine(big_gs.reshape(1, -1), big_g.reshape(1, -1))))
        dz.append(loss.double() - full_loss)  # log Z_hat - log Z per row
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    diffs = torch.stack(dz)
    spread = float(diffs.std(0).mean()) if reps > 1 else float("nan")
    return [name, m, f"{mean(cos):.3f}", f"{mean(cos_small):.3f}", f"{mean(rel):.4f}", f"{mean(wcos):.3f}",
            f"{spread:.3f}", f"{float(diffs.mean()):+.3f}", f"{1e3 * min(secs):.0f}"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("time", "quality"), default="time")
    parser.add_argument("--num-sampled", default="1024,4096", help="comma-separated; one row per value and sampler")
    parser.add_argument("--min-time", type=float, default=1.0, help="seconds of CPU time per timed row")
    parser.add_argument("--reencode-every", type=int, default=25)
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--entropy", type=float, default=3.0)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--shape", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--state", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "sampled_softmax.txt"))
    parser.add_argument("--out-quality", default=str(ROOT / "benchmarks" / "results" / "sampled_softmax_quality.txt"))
    args = parser.parse_args(argv)
    if args.child:
        vocab, dim, batch = (int(x) for x in args.shape.split(","))
        print(json.dumps(one_method(args.child, vocab, dim, batch, int(args.num_sampled), args.min_time, args.state,
                                    args.reencode_every)))
        return
    if args.part == "time":
        part_time(args)
    else:
        part_quality(args)


if __name__ == "__main__":
    main()
