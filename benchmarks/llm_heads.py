"""Where the head is the bottleneck: LLM-sized vocabularies, end to end (issue 23).

Five parts, each selectable with ``--part`` (each full part can take longer than one sitting on
a busy 2-core machine: run them one model / table at a time with ``--models`` / ``--tables``):

1. ``generate`` -- Hugging Face ``generate()`` on a Gemma-3-270M-shaped and a Llama-3-shaped
   (2-layer) model with random weights, fp32 and bf16, batch 1 / 8 / 32, 1 and 2 threads: decode
   tokens/s with the dense head, ``torchaq.hf.quantize_lm_head`` and a head that returns zeros
   (the limit), identical greedy tokens, the head's share of the step (:mod:`benchmarks.llm_generate`);
2. ``layer`` -- ``topk`` / ``sample`` / ``log_softmax_topk`` of the layer on the Gemma- and
   Llama-shaped heads and on a 262k kNN-LM datastore of real MiniLM states, batch 1 / 8 / 64 / 256,
   against ``nn.Linear`` fp32 and bf16 + ``topk``, recall@10; with the fewer-bits lever (4-bit
   codes at M = d/2, d/4, d/8, then the layer's int8 shortlist and exact re-score);
3. (inside ``layer``) fit and refresh seconds and the index's bytes per class against the dense weight
   (:mod:`benchmarks.llm_layer_ops`, tables from :mod:`benchmarks.llm_tables`, whose docstring
   justifies the synthetic heads' spectrum and norm spread);
   ``scan`` -- the 4-bit scan alone on random codes: cost per look-up against V, M and batch
   (does the scan read each code block once for many queries? :mod:`benchmarks.llm_scan`);
4. ``ann`` -- recall@10 vs queries/s at batch 1 and 64, one thread, against ScaNN's full pipeline
   and FAISS IVF-PQ fast-scan + refine, on the MiniLM table and the datastore, plotted to
   ``<out>.png`` (:mod:`benchmarks.ann_curves`);
5. ``headroom`` -- for a ``generate`` model: the softmax its decode states give, the time the head
   may take for ``generate`` to stay within 5% of the zero-head limit, the fast step and scan at
   each code size, and what the fewer-bits and partition levers would need to keep every greedy
   token (:mod:`benchmarks.llm_headroom`).

    python benchmarks/llm_heads.py --quick                              # a subset of everything
    python benchmarks/llm_heads.py --part generate --models gemma --dtypes fp32
    python benchmarks/llm_heads.py --part layer --tables llama
    python benchmarks/llm_heads.py --part ann --tables datastore
    python benchmarks/llm_heads.py --part headroom --models gemma --dtypes fp32
    python benchmarks/llm_heads.py --device cuda --part layer            # on a GPU (not run here)

Every run writes its table to ``--out`` (default ``benchmarks/results/llm_heads_<part>[_<what>][_quick].txt``).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torchaq  # noqa: E402
from benchmarks import ann_curves, llm_generate, llm_headroom, llm_layer_ops, llm_scan, llm_tables  # noqa: E402
from benchmarks.common import RESULTS, emit, environment  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _ints(s: str):
    return tuple(int(x) for x in s.split(",") if x)


def _names(s: str):
    return tuple(x for x in s.split(",") if x)


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=("generate", "layer", "scan", "ann", "headroom", "all"), default="all")
    ap.add_argument("--quick", action="store_true", help="small subsets of every sweep (smoke test, a few minutes)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--out", default=None, help="results file ('' to print only)")
    ap.add_argument("--models", default=None, help="generate: gemma,llama")
    ap.add_argument("--dtypes", default=None, help="generate: fp32,bf16")
    ap.add_argument("--tables", default=None, help="layer: gemma,llama,datastore; ann: minilm,datastore")
    ap.add_argument("--batches", default=None, help="comma-separated batch sizes")
    ap.add_argument("--threads", default=None, help="comma-separated thread counts")
    ap.add_argument("--variants", default=None,
                    help="d / M ratios of the 4-bit codes, e.g. 2,4,8 (generate: the quantized head's, default 2)")
    ap.add_argument("--new-tokens", type=int, default=None, help="generate: tokens per sequence")
    ap.add_argument("--reps", type=int, default=2, help="generate: interleaved repeats (the median step over all of them is kept)")
    ap.add_argument("--candidates", type=int, default=None, help="layer: topk's candidates (default: the layer's)")
    ap.add_argument("--no-refresh", action="store_true", help="layer: skip the refresh timings")
    ap.add_argument("--eval", type=int, default=None, help="held-out queries for recall; headroom: decode states")
    ap.add_argument("--nlist", type=int, default=1024, help="headroom: k-means lists of the partition lever")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device visible")
    return args


def part_generate(args) -> str:
    q = args.quick
    models = _names(args.models or ("gemma" if q else "gemma,llama"))
    dtypes = _names(args.dtypes or ("fp32" if q else "fp32,bf16"))
    batches = _ints(args.batches or ("1,8" if q else "1,8,32"))
    threads = _ints(args.threads or ("2" if q else "1,2"))
    new_tokens = args.new_tokens or (8 if q else 16)
    ratios = _ints(args.variants or "2")
    rows = []
    for m in models:
        for dt in dtypes:
            for r in ratios:
                rows += llm_generate.run_model(m, DTYPES[dt], batches, threads, new_tokens, args.reps,
                                               device=args.device, ratio=r)
    return (f"## generate(): greedy, prompts of 16 random tokens, {new_tokens} new tokens, decode tokens/s "
            f"(B / median step time over {new_tokens - 1} steps x {args.reps} interleaved repeats; 1 thread: process CPU "
            f"time, 2 threads: wall clock); device {args.device}\n" + llm_generate.generate_table(rows))


def part_headroom(args) -> str:
    if args.device != "cpu":  # the budget and the levers' timings are the CPU decoding path's
        return f"## Headroom: CPU only, skipped on {args.device}"
    q = args.quick
    out = [llm_headroom.run(m, DTYPES[dt], _ints(args.batches or ("1,8" if q else "1,8,32")),
                            _ints(args.variants or ("2,4" if q else "2,4,8")), args.eval or (64 if q else 256),
                            args.nlist, 3 if q else 8, new_tokens=args.new_tokens or (8 if q else 16), reps=args.reps)
           for m in _names(args.models or "gemma") for dt in _names(args.dtypes or "fp32")]
    return "## Headroom of the head in generate(): budget, time, and what the levers would need\n" + "\n\n".join(out)


def part_layer(args) -> str:
    q = args.quick
    tables = _names(args.tables or ("datastore,gemma" if q else "datastore,gemma,llama"))
    batches = _ints(args.batches or ("1,64" if q else "1,8,64,256"))
    threads = _ints(args.threads or "1")
    ratios = _ints(args.variants or ("2" if q else "2,4,8"))
    num_eval = args.eval or (256 if q else 1024)
    out = []
    for name in tables:
        rows, fit_q, eval_q = llm_tables.table(name)
        variants = [rows.shape[1] // r for r in ratios]
        min_run = 0.2 if q else 0.4
        out.append(llm_layer_ops.run_table(name, rows, fit_q, eval_q, variants, batches, threads, min_run,
                                           ("topk", "sample", "log_softmax_topk"), num_eval, args.device,
                                           refresh=not args.no_refresh, candidates=args.candidates))
        del rows, fit_q, eval_q
    return ("## The layer's ops (1 thread: CPU time of the thread; median ms), recall@10 on held-out queries\n"
            + "\n\n".join(out))


ANN = {  # table -> (leaves of ScaNN / lists of FAISS, searched leaves, ScaNN reorder R, FAISS k_factor)
    "minilm": (256, (8, 16, 32, 64, 128, 256), (30, 100, 300), (2, 8, 32)),
    "datastore": (1024, (16, 32, 64, 128, 256, 512, 1024), (30, 100, 300), (2, 8, 32)),
}
ANN_QUICK = {"minilm": (256, (16, 64, 256), (100,), (8,)), "datastore": (1024, (32, 128, 1024), (100,), (8,))}
CANDIDATES = (16, 32, 64, 128, 256, 512, 1024)


def part_ann(args, out_file) -> str:
    q = args.quick
    tables = _names(args.tables or ("minilm" if q else "minilm,datastore"))
    batches = _ints(args.batches or "1,64")
    num_eval = args.eval or (256 if q else 1000)
    ratios = _ints(args.variants or ("2" if q else "2,4"))
    min_run = 0.15 if q else 0.3
    torch.set_num_threads(1)
    text = []
    for name in tables:
        rows, fit_q, eval_q = llm_tables.table(name)
        eval_q = eval_q[:num_eval].contiguous()
        true = llm_layer_ops.exact_top(rows, eval_q)
        leaves, searched, reorders, kfs = (ANN_QUICK if q else ANN)[name]
        points = []
        for r in ratios:
            layer, fit_s, _ = llm_tables.fitted_layer(name, rows, fit_q, num_subspaces=rows.shape[1] // r)
            points += ann_curves.torchaq_points(f"torchaq M={rows.shape[1] // r}", layer, eval_q, true, batches,
                                                CANDIDATES[1:6:2] if q else CANDIDATES, min_run)
            del layer
        points += ann_curves.dense_points(rows, eval_q, true, batches, min_run)
        sp, s_build = ann_curves.scann_points(rows, eval_q, true, batches, leaves, searched, reorders, min_run)
        fp, f_build = ann_curves.faiss_points(rows, eval_q, true, batches, leaves, searched, kfs, min_run)
        points += sp + fp
        png = Path(out_file).with_name(Path(out_file).stem + f"_{name}.png") if out_file else None
        drawn = png is not None and ann_curves.plot(points, png, f"{name} {rows.shape[0]:,} x {rows.shape[1]}")
        text.append(
            f"### {name}: V = {rows.shape[0]:,}, d = {rows.shape[1]}, {eval_q.shape[0]} held-out queries; ScaNN build "
            f"{s_build if s_build is None else round(s_build, 1)} s, FAISS build {f_build if f_build is None else round(f_build, 1)} s "
            f"(2 threads){f'; plot {png.name}' if drawn else ''}\n"
            f"Best queries/s reaching each recall@10 (torchaq / baseline: > 1 means torchaq is ahead)\n"
            + ann_curves.verdict_table(points, batches) + "\n\nAll points\n" + ann_curves.curve_table(points))
        del rows, fit_q, eval_q
    return "## recall@10 vs queries/s, one thread\n" + "\n\n".join(text)


def main(argv=None) -> str:
    args = parse(argv)
    start = time.perf_counter()
    threads0 = torch.get_num_threads()
    parts = ("generate", "layer", "scan", "ann", "headroom") if args.part == "all" else (args.part,)
    what = "_".join(_names(args.models or args.tables or "")) if args.part != "all" else ""
    out_file = args.out if args.out is not None else str(
        RESULTS / f"llm_heads_{args.part}{'_' + what if what else ''}{'_quick' if args.quick else ''}.txt")
    isa = torchaq._C.cpu_isa() if torchaq.backends.CPU_EXTENSION_LOADED else "reference"
    text = [environment(f"torchaq kernels: {isa}; device {args.device}"), "",
            "command: python benchmarks/llm_heads.py " + " ".join(sys.argv[1:] if argv is None else argv)]
    for p in parts:
        print(f"== part {p}", flush=True)
        if p == "generate":
            text += ["", part_generate(args)]
        elif p == "layer":
            text += ["", part_layer(args)]
        elif p == "headroom":
            text += ["", part_headroom(args)]
        elif p == "scan":
            text += ["", llm_scan.run((65_536, 262_144), (160, 320) if args.quick else (96, 160, 320, 2048),
                                      _ints(args.batches or ("1,64" if args.quick else "1,4,16,64")))]
        else:
            text += ["", part_ann(args, out_file)]
        torch.set_num_threads(threads0)
    text += ["", f"total benchmark time {time.perf_counter() - start:.0f} s"]
    out = "\n".join(text)
    emit(out, out_file or None)
    return out


if __name__ == "__main__":
    main()
