"""Full-vocabulary sampling at an LLM head's shape: Gemma 3 270M (V = 262,144, d = 640).

The synthetic trained-LM-like head and hidden states of :mod:`benchmarks.llm_tables` (``gemma``;
``--table llama`` for V = 128,256, d = 4096), the default layer (fitted once, cached), queries
scaled so that the exact softmax's mean entropy is ~3 nats (LM-like). The same measurements as
``benchmarks/sampling.py`` on fewer queries: TV over the exact top-50 + rest and the fraction outside
the exact top-256 against the noise floor of exact draws (pure, ``top_p=0.9``, ``T=0.7``), detected
bound violations, the error of ``return_logprobs`` (full and truncated), and the speed at batch 1
and 64 on one thread against a dense ``softmax`` + ``multinomial`` and a dense nucleus draw.

    python benchmarks/sampling_llm.py [--table gemma|llama] [--quick] [--part speed]

Writes ``benchmarks/results/sampling_llm_<table>.txt`` (``--out``); ``--part speed``: the speed
table alone, into ``sampling_llm_<table>_speed.txt``.
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
from benchmarks.llm_tables import fitted_layer, table  # noqa: E402
from benchmarks.sampling import (ERROR_COLUMNS, SETTINGS, SPEED_COLUMNS, entropy, error_quantiles,  # noqa: E402
                                 logprob_errors, quality, scale_for_entropy, speed)


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", choices=("gemma", "llama"), default="gemma")
    parser.add_argument("--quick", action="store_true", help="fewer queries and draws")
    parser.add_argument("--part", choices=("all", "speed"), default="all", help="speed: the speed table only")
    parser.add_argument("--out", default=None, help="results file ('' to print only)")
    args = parser.parse_args(argv)
    if args.out is None:
        args.out = str(RESULTS / f"sampling_llm_{args.table}{'' if args.part == 'all' else '_speed'}.txt")
    start = time.perf_counter()
    rows, fit_q, eval_q = table(args.table, num_queries=1024)
    layer, fit_s, cached = fitted_layer(args.table, rows, fit_q)
    torch.set_num_threads(1)
    alpha = scale_for_entropy(eval_q[:64], rows, lowest=0.01)
    q = (alpha * eval_q).contiguous()
    nq, draws, nlp = (2, 10_000, 16) if args.quick else (4, 20_000, 64)
    ent = entropy(q[:64] @ rows.T)
    text = [environment(f"torchaq kernels: {torchaq._C.cpu_isa() if torchaq.backends.CPU_EXTENSION_LOADED else 'reference'}"),
            "", f"{args.table}-shaped head V = {layer.num_classes}, d = {layer.dim} (synthetic, benchmarks/llm_tables.py), "
            f"default layer ({layer.quantizer.num_subspaces} subspaces, fit {fit_s:.0f} s{' cached' if cached else ''}); "
            f"queries x {alpha:.2f}: entropy mean {ent.mean():.2f}, min {ent.min():.2f}, max {ent.max():.2f} nats; 1 thread"]
    if args.part == "all":
        text += ["", f"## Quality: {nq} queries x {draws} draws, TV top-50+rest / mean |outside top-256 - exact mass| "
                 "(targets <= 0.01 / <= 0.005)",
                 markdown_table(["setting", "exact mass outside top-256", "sample (default)",
                                 "exact multinomial (noise floor)", "head + LUT tail", "old candidate-only sampler",
                                 "detected bound violations"], quality(layer, q[:nq], draws, SETTINGS)),
                 "", f"## max |logprob error| (nats) vs dense log_softmax, {nlp} queries",
                 markdown_table(["setting", "full softmax", "truncated", "rows with truncated error > 0.01",
                                 "drawn outside the float64 nucleus"], logprob_errors(layer, q[:nlp], SETTINGS)),
                 "", "## LUT error model: quantiles of (l - s) in units of its modelled scale, 32 queries, vs N(0, 1); "
                 "the bound's failures per (query, class) (the quality table's violations count proposals: one failing "
                 "class a draw proposes often counts many times)",
                 markdown_table(ERROR_COLUMNS, error_quantiles(layer, q[:32]))]
    text += ["", "## Speed (ms per call, medians, CPU time of one thread; x = median over alternating blocks of "
             "dense / sample, timed together)",
             markdown_table(SPEED_COLUMNS, speed(layer, q, (1, 64), 0.2 if args.quick else 0.5)),
             "", f"total benchmark time {time.perf_counter() - start:.0f} s"]
    out = "\n".join(text)
    emit(out, args.out)
    return out


if __name__ == "__main__":
    main()
