"""Full-vocabulary sampling on real data: the drawn distribution against the exact softmax, and speed.

MiniLM table (V = 30,522, d = 384) with real hidden states (``examples/real_data.py``), the fitted
layer of ``benchmarks/layer.py`` (cached). Two query sets: scaled so that the mean entropy of the
exact softmax is ~3 nats (LM-like), and unscaled (near-flat, ~10 nats). For each set and each
setting (pure sampling, ``top_p=0.9``, ``temperature=0.7``), per query, ``N`` draws from:

* ``sample`` (rejection from the bounded LUT proposal with an exact head: the default);
* "head + LUT tail": the same proposal without the bound and without rejection (tail drawn from exp(s));
* the old candidate-only sampler (``method="candidates"``, its 256 re-scored candidates: top_k=256);
* exact ``torch.multinomial`` on the exact truncated softmax: the noise floor of the statistics.

Statistics against the exact target (the truncated softmax of the dense logits): TV over the exact
top-50 + one rest bin, and the fraction of draws outside the exact top-256 against the exact mass
there (mean of |difference| over queries). Also: acceptance rate of the rejection step with the
calibrated bound and with the always-true Cauchy-Schwarz bound (computed exactly from dense
logits), the measured quantiles of ``(l - s) / (|h| |r|)`` against N(0, 1/d), the error of
``return_logprobs`` against the dense log-softmax, and the speed at batch 1 and 64 (one thread).
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torchaq  # noqa: E402
from benchmarks.common import RESULTS, emit, environment, markdown_table, time_alternating, time_call, time_pair  # noqa: E402
from torchaq.layer import exact_sampling  # noqa: E402
from torchaq.layer.exact_sampling import sample_many  # noqa: E402
from torchaq.layer.sampling import draw_top_p  # noqa: E402

SETTINGS = (("pure", dict()), ("top_p=0.9", dict(top_p=0.9)), ("T=0.7", dict(temperature=0.7)))


def entropy(logits: torch.Tensor) -> torch.Tensor:
    lp = torch.log_softmax(logits, 1)
    return -(lp.exp() * lp).sum(1)


def scale_for_entropy(h, weight, target=3.0, lowest=1.0):
    """Scale ``a`` in ``[lowest, 100]`` with mean entropy of ``softmax(a h W^T)`` ~= ``target`` (bisection on log a)."""
    lo, hi = math.log(lowest), math.log(100.0)
    for _ in range(20):
        mid = 0.5 * (lo + hi)
        if entropy(math.exp(mid) * h @ weight.T).mean() > target:
            lo = mid
        else:
            hi = mid
    return math.exp(0.5 * (lo + hi))


def target_probs(logits: torch.Tensor, top_p=None, temperature=1.0) -> torch.Tensor:
    """The exact truncated distribution (Hugging Face rule, as ``draw_top_p``) of one row's dense logits."""
    z = logits / temperature
    if top_p is not None and top_p < 1:
        v, i = z.sort(descending=True)
        p = v.softmax(0)
        drop = (p.cumsum(0) - p) >= top_p
        z = z.clone()
        z[i[drop]] = -math.inf
    return z.softmax(0)


def stats(draws: torch.Tensor, probs: torch.Tensor, order: torch.Tensor):
    """(TV over exact top-50 + rest, fraction outside exact top-256 minus exact mass there)."""
    n = draws.numel()
    counts = torch.bincount(draws, minlength=probs.numel()).double() / n
    p = probs.double()
    top50 = order[:50]
    tv = 0.5 * ((counts[top50] - p[top50]).abs().sum() + ((1 - counts[top50].sum()) - (1 - p[top50].sum())).abs())
    top256 = order[:256]
    outside = 1 - counts[top256].sum()
    return float(tv), float(outside - (1 - p[top256].sum())), float(1 - p[top256].sum())


def quality(layer, queries, draws, settings):
    rows = []
    weight = layer.weight.detach()
    for name, kw in settings:
        acc = {m: [] for m in ("sample", "lut_tail", "old", "exact")}
        tail, viol = [], 0
        for qi, h in enumerate(queries):
            logits = h @ weight.T
            t = kw.get("temperature", 1.0)
            probs = target_probs(logits, kw.get("top_p"), t)
            order = probs.argsort(descending=True)
            seeds = torch.arange(draws) + 1_000_003 * qi
            d, v = sample_many(layer, h, seeds, **kw)
            viol += v
            acc["sample"].append(stats(d, probs, order))
            d, _ = sample_many(layer, h, seeds, sigmas=0.0, lut_tail=True, **kw)
            acc["lut_tail"].append(stats(d, probs, order))
            cl, cc, _ = layer.candidate_logits(h.unsqueeze(0), None, 256)
            g = torch.Generator().manual_seed(qi)
            pos = draw_top_p(cl[:, :256].expand(draws, -1), kw.get("top_p"), t, g)[:, 0]
            acc["old"].append(stats(cc[0, pos], probs, order))
            acc["exact"].append(stats(torch.multinomial(probs, draws, replacement=True, generator=g), probs, order))
            tail.append(acc["exact"][-1][2])
        mean = lambda xs, j: sum(abs(x[j]) for x in xs) / len(xs)  # noqa: E731
        rows.append([name, f"{sum(tail) / len(tail):.4f}"]
                    + [f"{mean(acc[m], 0):.4f} / {mean(acc[m], 1):.4f}" for m in ("sample", "exact", "lut_tail", "old")]
                    + [f"{viol}"])
    return rows


def acceptance(layer, queries, temperature=1.0):
    """Exact acceptance rate of the rejection step: Z / (Z_head + sum_tail exp(u)), calibrated and CS bounds."""
    out = {}
    for label, sig in (("calibrated z=%.2f" % exact_sampling.ERROR_SIGMAS, exact_sampling.ERROR_SIGMAS),
                       ("Cauchy-Schwarz", math.sqrt(layer.dim))):
        rates = []
        for h in queries:
            flat = h.unsqueeze(0)
            scores, logits, classes, step = exact_sampling.head_scores(layer, flat, exact_sampling.DEFAULT_HEAD)
            upper = exact_sampling.tail_bounds(layer, flat, scores, classes, sig, rounding=step)
            exact = (flat @ layer.weight.detach().T)[0] / temperature
            m = exact.max()
            z = (exact - m).exp().sum()
            zh = ((logits[0] / temperature - m).exp()).sum()
            zt = ((upper[0] / temperature - m).exp()).sum()
            rates.append(float(z / (zh + zt)))
        out[label] = sum(rates) / len(rates)
    return out


ERROR_COLUMNS = ["quantile", "(l - s) / (|h| rho_i): error_scales (the sampler's)",
                 "(l - s) / (|h| |r_i| / sqrt(d)): isotropic", "N(0, 1)"]


def error_quantiles(layer, queries):
    """Quantiles of the LUT error in units of its modelled scale, over (query, class) pairs outside the
    side list, vs N(0, 1): ``(l - s) / (|h| rho_i)`` (the sampler's error model, ``error_scales``) and
    ``(l - s) / (|h| |r_i| / sqrt(d))`` (the isotropic model it replaced); then the bound's failures."""
    lut = layer.quantizer.lut(queries)
    s = torchaq.ops.lut_score(lut, layer.packed_codes, layer.num_classes, layer.float_bias())
    l = queries @ layer.weight.detach().T
    keep = torch.ones(layer.num_classes, dtype=torch.bool)
    keep[layer.side_rows] = False
    pick = torch.randperm(int(keep.sum()) * queries.shape[0], generator=torch.Generator().manual_seed(0))[:2_000_000]
    hn = queries.norm(dim=1, keepdim=True)
    model = ((l - s) / (hn * layer.error_scales))[:, keep].flatten()[pick].double()
    iso = ((l - s) / (hn * layer.residual_norms / math.sqrt(layer.dim)))[:, keep].flatten()[pick].double()
    normal = torch.distributions.Normal(0.0, 1.0)
    rows = []
    for q in (0.99, 0.9999, 0.999999):
        rows.append([f"{q}", f"{torch.quantile(model, q).item():.3f}", f"{torch.quantile(iso, q).item():.3f}",
                     f"{normal.icdf(torch.tensor(q)).item():.3f}"])
    rows.append(["max", f"{model.max().item():.3f}", f"{iso.max().item():.3f}",
                 f"(z = {exact_sampling.ERROR_SIGMAS} bound)"])
    # the bound the sampler applies (uint8-LUT scores plus both allowances): how often it fails
    scores, _, classes, step = exact_sampling.head_scores(layer, queries, exact_sampling.DEFAULT_HEAD)
    upper = exact_sampling.tail_bounds(layer, queries, scores, classes, rounding=step)
    tail = upper > -math.inf
    rows.append(["l > u (sampler's bound, quantized scores)", f"{int((l > upper)[tail].sum())} of {int(tail.sum())}", "",
                 f"expected {float(tail.sum()) * (1 - float(normal.cdf(torch.tensor(exact_sampling.ERROR_SIGMAS)))):.1f}"])
    return rows


def logprob_errors(layer, queries, settings):
    rows = []
    for name, kw in settings:
        out = layer.sample(queries, seeds=torch.arange(queries.shape[0]), return_logprobs=True, **kw)
        t = kw.get("temperature", 1.0)
        exact = torch.log_softmax(queries @ layer.weight.detach().T / t, 1).gather(1, out.tokens[:, None])[:, 0]
        trunc = torch.stack([target_probs(queries[i].double() @ layer.weight.detach().double().T, kw.get("top_p"), t)
                             [out.tokens[i]] for i in range(queries.shape[0])]).log().float()
        # a token at the nucleus boundary may fall on either side of it (the sampler places the
        # boundary against an estimated partition function): counted, and left out of the max
        inside = torch.isfinite(trunc)
        errs = (out.truncated_logprobs - trunc)[inside].abs()
        err = errs.max().item() if bool(inside.any()) else float("nan")
        rows.append([name, f"{(out.logprobs - exact).abs().max().item():.2e}", f"{err:.2e}",
                     f"{int((errs > 0.01).sum())} / {int(inside.sum())}", f"{int((~inside).sum())} / {inside.numel()}"])
    return rows


def dense_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """A dense nucleus draw as Hugging Face's TopPLogitsWarper makes it: a full sort of each row's
    logits, the nucleus, a multinomial draw (``draw_top_p`` on the sorted row)."""
    values, order = logits.sort(dim=1, descending=True)
    return order.gather(1, draw_top_p(values, top_p, 1.0, None))


SPEED_COLUMNS = ["threads", "batch", "dense softmax + multinomial", "dense top_p=0.9 (sort + nucleus + multinomial)",
                 "sample", "sample, each call right after a dense call (x: dense / it, call by call)",
                 "sample top_p=0.9 (x = dense top_p / it)", "sample T=0.7", "sample + return_logprobs",
                 "old sampler top_k=50"]


def speed(layer, queries, batches, min_run, threads=(1,)):
    """Speed rows per thread count and batch (:data:`SPEED_COLUMNS`): 1 thread is the calling thread's
    CPU time (other processes cannot inflate it), more threads the wall clock. Each sampler is timed
    in alternating blocks with the dense call it replaces (:func:`benchmarks.common.time_pair`); its
    ``x`` is the median over block pairs of dense / sampler. The default sampler is also timed call
    by call right after a dense call (:func:`benchmarks.common.time_alternating`: the caches a
    decode step's head finds after the model body)."""
    weight = layer.weight.detach()
    rows = []
    for th in threads:
        torch.set_num_threads(th)
        cpu = th == 1
        for b in batches:
            h = queries[:b].contiguous()
            seeds = torch.arange(b)
            dense_call = lambda: torch.multinomial(torch.softmax(F.linear(h, weight), 1), 1)  # noqa: E731
            dense_p_call = lambda: dense_top_p(F.linear(h, weight), 0.9)  # noqa: E731
            cells = []
            for kw, base in ((dict(), dense_call), (dict(top_p=0.9), dense_p_call), (dict(temperature=0.7), dense_call)):
                base_t, tm, x = time_pair(base, lambda: layer.sample(h, seeds=seeds, **kw), min_run, cpu_time=cpu)
                cells.append((base_t, f"{tm.ms:.3f} ({x:.1f}x)"))
            _, cold, x = time_alternating(dense_call, lambda: layer.sample(h, seeds=seeds), 2 * min_run, cpu_time=cpu)
            cells.insert(1, (None, f"{cold.ms:.3f} ({x:.1f}x)"))
            row = [str(th), str(b), f"{cells[0][0].ms:.3f}", f"{cells[2][0].ms:.3f}"] + [c for _, c in cells]
            tm = time_call(lambda: layer.sample(h, seeds=seeds, return_logprobs=True), min_run, cpu_time=cpu)
            row.append(f"{tm.ms:.3f}")
            tm = time_call(lambda: layer.sample(h, top_k=50, method="candidates"), min_run, cpu_time=cpu)
            row.append(f"{tm.ms:.3f}")
            rows.append(row)
    torch.set_num_threads(1)
    return rows


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer queries and draws")
    parser.add_argument("--part", choices=("all", "speed"), default="all",
                        help="speed: the speed table only (batches 1, 64, 256), into sampling_speed.txt")
    parser.add_argument("--out", default=None, help="results file ('' to print only; default sampling[_speed].txt)")
    parser.add_argument("--threads", default=None,
                        help="thread counts of the speed table, comma-separated (default: 1; with --part speed: 1,2)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="run the speed table this many times (a run column; this VM's speed drifts between runs)")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error(f"--repeat must be >= 1, got {args.repeat}")
    if args.out is None:
        args.out = str(RESULTS / ("sampling.txt" if args.part == "all" else "sampling_speed.txt"))
    from benchmarks.layer import fitted_layer
    from examples.real_data import load_minilm, split

    start = time.perf_counter()
    torch.set_num_threads(1)
    table, queries = load_minilm(num_queries=2000, seed=0, progress=False)
    fit_q, eval_q = split(queries, 0.5)
    layer, _ = fitted_layer(table, fit_q)
    nq, draws = (8, 20_000) if args.quick else (16, 50_000)
    alpha = scale_for_entropy(eval_q[:200], table)
    sets = {"LM-like": alpha * eval_q, "near-flat": eval_q}
    text = [environment(f"torchaq kernels: {torchaq._C.cpu_isa() if torchaq.backends.CPU_EXTENSION_LOADED else 'reference'}"),
            "", f"MiniLM V = {layer.num_classes}, d = {layer.dim}, quality at 1 thread; LM-like = queries x {alpha:.2f}; "
            f"{nq} queries x {draws} draws per setting; bound z = {exact_sampling.ERROR_SIGMAS}, head "
            f"{exact_sampling.DEFAULT_HEAD} + {layer.side_rows.numel()} side rows"]
    for label, q in (sets.items() if args.part == "all" else ()):
        ent = entropy(q[:200] @ table.T)
        text += ["", f"## {label} (entropy mean {ent.mean():.2f}, min {ent.min():.2f}, max {ent.max():.2f} nats): "
                 "TV top-50+rest / mean |outside top-256 - exact mass| (targets <= 0.01 / <= 0.005)",
                 markdown_table(["setting", "exact mass outside top-256", "sample (default)",
                                 "exact multinomial (noise floor)", "head + LUT tail", "old candidate-only sampler",
                                 "detected bound violations"],
                                quality(layer, q[:nq], draws, SETTINGS))]
        acc = acceptance(layer, q[:nq])
        text += ["", "acceptance rate of the rejection step (exact, mean over queries): "
                 + ", ".join(f"{k}: {v:.3f}" for k, v in acc.items())]
        text += ["", "max |logprob error| (nats) vs dense log_softmax, 200 queries",
                 markdown_table(["setting", "full softmax", "truncated", "rows with truncated error > 0.01",
                                 "drawn outside the float64 nucleus"], logprob_errors(layer, q[:200], SETTINGS))]
    if args.part == "all":
        text += ["", "## LUT error model: quantiles of (l - s) in units of its modelled scale, LM-like queries, vs N(0, 1)",
                 markdown_table(ERROR_COLUMNS, error_quantiles(layer, sets["LM-like"][:200]))]
    threads = [int(t) for t in (args.threads or ("1" if args.part == "all" else "1,2")).split(",")]
    text += ["", "## Speed, LM-like queries (ms per call, medians; 1 thread: CPU time of the thread, 2 threads: wall "
             "clock; x = median over alternating blocks of dense / sample, timed together)",
             markdown_table(["run"] + SPEED_COLUMNS,
                            [[str(run + 1)] + row for run in range(args.repeat)
                             for row in speed(layer, sets["LM-like"], (1, 64) if args.part == "all" else (1, 64, 256),
                                              0.2 if args.quick else 0.5, threads)])]
    text += ["", f"total benchmark time {time.perf_counter() - start:.0f} s"]
    out = "\n".join(text)
    emit(out, args.out)
    return out


if __name__ == "__main__":
    main()
