"""GPU benchmark of the Triton LUT top-k path against cuBLAS and the torch reference.

    python benchmarks/gpu_bench.py            # one H100/H200, < 7 min; writes benchmarks/results/gpu_bench_<device>.txt
    python benchmarks/gpu_bench.py --out-dir "$OUT"   # on the lent device machine (only $OUT comes back)
    python benchmarks/gpu_bench.py --dry      # whole script on CPU under TRITON_INTERPRET=1, tiny sizes
    python benchmarks/gpu_bench.py --compile-check   # no GPU needed: compile every kernel config for sm_90

What is timed (``triton.testing.do_bench``, median, one query batch ``(B, d)`` in bf16, k = 100):
* ``torchaq``  = ``compute_lut`` (bf16 queries -> float32 LUT) + ``lut_topk`` (Triton scan, fused top-k)
* ``scan``     = ``lut_topk`` alone; ``GB/s`` = code bytes / scan time (every code byte is read once
  per query tile; at B <= 16 there is one tile, so this is the HBM traffic)
* ``cublas``   = ``torch.topk(q @ W.T, k)`` with W ``(V, d)`` bf16
* ``ref``      = the pure-torch reference ops (``compute_lut_reference`` + ``lut_topk_reference``), only where
  it gathers <= 2e9 LUT entries (slower sizes are skipped)

Quantizers (bytes per class = code bytes; bf16 row = 2 d bytes):
* ``4b/2d``: 4-bit codes, 2 dims per subspace, M = d / 2, d / 4 bytes per class (8x fewer than bf16)
* ``4b/8d``: 4-bit codes, 8 dims per subspace, M = d / 8, d / 16 bytes per class (32x fewer)
* ``8b/8d``: 8-bit codes, 8 dims per subspace, M = d / 8, d / 8 bytes per class (16x fewer)
Codes and codebooks are random (timing does not depend on their values).

Runs from a bare checkout (no install needed: ``triton_kernels/`` is mapped to
``torchaq.triton_kernels`` by hand). Rows stop at 70% of ``--budget`` seconds; a sweep of tile
settings (scan only, V = 256k, d = 4096, B = 1 and 8) fills the rest, to retune ``scan_config``.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _parse():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry", action="store_true", help="tiny sizes on CPU under TRITON_INTERPRET=1")
    ap.add_argument("--compile-check", action="store_true", help="compile the kernels for sm_90 (no GPU needed)")
    ap.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--budget", type=float, default=400.0,
                    help="seconds in all: table rows stop at 70%% of it, the tile sweep at 100%%")
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--no-tune", action="store_true", help="skip the tile-size sweep at the end")
    return ap.parse_args()


ARGS = _parse()
if ARGS.dry:
    ARGS.k = min(ARGS.k, 16)  # small tiles keep the interpreter quick
    ARGS.budget = float("inf")  # the dry run must reach every line of the script
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import torch  # noqa: E402
import triton  # noqa: E402

sys.path.insert(0, str(ROOT))


def _load_triton_kernels():
    """``torchaq.triton_kernels`` lives in ``triton_kernels/`` and is mapped by the package install;
    on a bare checkout (the GPU machine) map it by hand."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the C++ CPU extension is irrelevant here
        import torchaq
    try:
        import torchaq.triton_kernels as tk
    except ImportError:
        import importlib.util

        where = ROOT / "triton_kernels"
        spec = importlib.util.spec_from_file_location(
            "torchaq.triton_kernels", where / "__init__.py", submodule_search_locations=[str(where)]
        )
        tk = importlib.util.module_from_spec(spec)
        sys.modules["torchaq.triton_kernels"] = tk
        spec.loader.exec_module(tk)
        torchaq.triton_kernels = tk
    if torch.cuda.is_available():
        import torchaq.triton_kernels.register  # noqa: F401  (CUDA kernels of torch.ops.torchaq.*)
    return tk


TK = _load_triton_kernels()
from benchmarks.common import emit  # noqa: E402
from torchaq import ops  # noqa: E402
from torchaq.triton_kernels.scan import scan_config  # noqa: E402

QUANT = {"4b/2d": (4, 2), "4b/8d": (4, 8), "8b/8d": (8, 8)}
# (V, d): the headline sizes, then the LLM heads of benchmarks/llm_heads.py (Gemma 3 270M,
# Llama 3, the 262k MiniLM datastore)
SHAPES = [(262_144, 4096), (32_768, 1024), (262_144, 640), (128_256, 4096), (262_144, 384)]
LINES: list = []


def say(line: str = "") -> None:
    print(line, flush=True)
    LINES.append(line)


def bench(fn) -> float:
    """Median milliseconds: ``triton.testing.do_bench`` (CUDA events, cache flushed between runs) on a
    GPU -- the one timer here that :func:`benchmarks.common.time_call` (CPU clocks) does not replace."""
    if ARGS.dry:  # the interpreter has no GPU events (and compiles nothing): one wall-clock run
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")


def compile_check() -> None:
    """Compile each kernel for sm_90 from its AST (catches GPU-only errors the interpreter misses)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from torchaq.triton_kernels.lut import _compute_lut_kernel
    from torchaq.triton_kernels.scan import _scan_topk_kernel
    from torchaq.triton_kernels.score import _lut_score_kernel

    def comp(kern, sig, consts, warps=4):
        src = ASTSource(fn=kern, signature={**sig, **{k: "constexpr" for k in consts}}, constexprs=dict(consts))
        ck = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
        print(f"ok  {kern.fn.__name__:20s} {consts}  shared={ck.metadata.shared}")

    scan_sig = dict(lut_ptr="*fp32", packed_ptr="*u8", bias_ptr="*fp32", keys_ptr="*i64", B="i32", N="i32",
                    MR="i32", P="i32", NBLK="i32", num_tiles="i32", num_splits="i32", KOUT="i32")
    score_sig = dict(lut_ptr="*fp32", packed_ptr="*u8", bias_ptr="*fp32", out_ptr="*fp32", B="i32", N="i32",
                     MR="i32", P="i32", NBLK="i32")
    for bits in (4, 8):
        kc = 16 if bits == 4 else 256
        for batch in (1, 8, 64):
            cfg = scan_config(batch, ARGS.k, bits)
            for gather in (False, True):
                c = dict(K=kc, BITS=bits, BLOCK_B=cfg["block_b"], BLOCK_N=cfg["block_n"], P_CHUNK=cfg["p_chunk"],
                         HAS_BIAS=True, USE_GATHER=gather)
                comp(_scan_topk_kernel, scan_sig, c, cfg["num_warps"])
        comp(_lut_score_kernel, score_sig, dict(K=kc, BITS=bits, BLOCK_B=16, BLOCK_N=128, P_CHUNK=4,
                                                HAS_BIAS=False, USE_GATHER=False))
    comp(_compute_lut_kernel, dict(q_ptr="*bf16", cb_ptr="*fp32", out_ptr="*fp32", B="i32", DSUB="i32",
                                   stride_qb="i32", stride_qd="i32"), dict(M=512, K=256, BLOCK_B=2, BLOCK_D=8))


def copy_bandwidth(dev) -> float:
    """GB/s of a large device-to-device copy, counting read + write bytes."""
    n = (1 << 30) if not ARGS.dry else (1 << 20)
    x = torch.empty(n, dtype=torch.uint8, device=dev)
    y = torch.empty_like(x)
    ms = bench(lambda: y.copy_(x))
    del x, y
    return 2 * n / ms / 1e6


def make_problem(vocab, d, quant, dev, seed=0):
    bits, dsub = QUANT[quant]
    m, kc = d // dsub, (16 if bits == 4 else 256)
    g = torch.Generator(device=dev).manual_seed(seed)
    width = ops.packed_width(m, bits)
    packed = torch.randint(0, 256, (vocab // 32, width, 32), generator=g, device=dev, dtype=torch.uint8)
    codebooks = torch.randn(m, kc, dsub, generator=g, device=dev)
    bias = torch.randn(vocab, generator=g, device=dev)
    return packed, codebooks, bias


def correctness(dev) -> bool:
    say("correctness against the torch reference:")
    ok_all = True
    for bits, m, n, batch, k, dsub in [(4, 33, 32_011, 3, 100, 2), (8, 17, 20_007, 5, 100, 4), (4, 64, 50_000, 1, 1000, 8),
                                      (8, 8, 3_001, 64, 7, 8), (4, 7, 100_003, 17, 2500, 2)]:
        if ARGS.dry:
            n, k = min(n, 300), min(k, 40)
        kc = 16 if bits == 4 else 256
        g = torch.Generator(device=dev).manual_seed(n)
        q = torch.randn(batch, m * dsub, generator=g, device=dev).to(torch.bfloat16)
        cb = torch.randn(m, kc, dsub, generator=g, device=dev)
        codes = torch.randint(0, kc, (n, m), generator=g, device=dev, dtype=torch.uint8)
        packed = ops.pack_codes_reference(codes, bits)
        bias = torch.randn(n, generator=g, device=dev)
        lut = TK.triton_compute_lut(q, cb)
        lut_ref = ops.compute_lut_reference(q, cb)
        e_lut = (lut - lut_ref).abs().max().item()
        v, i = TK.triton_lut_topk(lut_ref, packed, n, k, bias)
        rv, _ = ops.lut_topk_reference(lut_ref, packed, n, k, bias)
        full = ops.lut_score_reference(lut_ref, packed, n, bias)
        e_v = (v - rv).abs().max().item()
        e_i = (full.gather(1, i) - v).abs().max().item()
        uniq = all(row.unique().numel() == row.numel() for row in i)
        e_s = (TK.triton_lut_score(lut_ref, packed, n, bias) - full).abs().max().item()
        ok = e_lut < 1e-3 and e_v < 1e-3 and e_i < 1e-3 and e_s < 1e-3 and uniq
        if not ARGS.dry:  # the registered CUDA kernels answer through the op dispatcher too
            dv, di = torch.ops.torchaq.lut_topk(lut_ref, packed, n, k, bias)
            ok = ok and torch.equal(dv, v) and torch.equal(di, i)
        ok_all &= ok
        say(f"  {'PASS' if ok else 'FAIL'} bits={bits} M={m} N={n} B={batch} k={k}: max|dLUT|={e_lut:.1e} "
            f"max|dtopk|={e_v:.1e} max|score[idx]-val|={e_i:.1e} max|dscore|={e_s:.1e} unique={uniq}")
    return ok_all


def main() -> None:
    if ARGS.compile_check:
        compile_check()
        return
    t_start = time.time()
    dev = "cpu" if ARGS.dry else "cuda"
    if not ARGS.dry and not torch.cuda.is_available():
        sys.exit("no CUDA device: use --dry (CPU interpreter) or --compile-check")
    name = "dry-cpu-interpreter" if ARGS.dry else torch.cuda.get_device_name()
    say(f"device: {name}; torch {torch.__version__}, triton {triton.__version__}, cuda {torch.version.cuda}")
    ok = correctness(dev)
    copy_gbs = copy_bandwidth(dev)
    say(f"copy bandwidth (read + write bytes of a {'1 MiB' if ARGS.dry else '1 GiB'} copy): {copy_gbs:,.0f} GB/s")
    k = ARGS.k
    if ARGS.dry:
        shapes, batches = [(320, 16)], [1, 3]
    else:
        shapes, batches = SHAPES, [1, 8, 64, 512]
    say()
    say(f"top-{k}, times in ms (median); GB/s = code bytes / scan time; copy = {copy_gbs:,.0f} GB/s")
    head = (f"{'V':>7} {'d':>5} {'quant':>6} {'B':>4} | {'code MB':>8} {'torchaq':>8} {'scan':>8} {'GB/s':>7} "
            f"{'%copy':>6} | {'cublas':>8} {'ref':>9} | {'x cublas':>8}")
    say(head)
    say("-" * len(head))
    rows = []
    skipped = 0
    for vocab, d in shapes:
        w = torch.randn(vocab, d, device=dev, dtype=torch.bfloat16) / d ** 0.5
        for quant in QUANT:
            packed, cb, bias = make_problem(vocab, d, quant, dev)
            code_mb = packed.numel() / 1e6
            for batch in batches:
                if time.time() - t_start > 0.7 * ARGS.budget:
                    skipped += 1
                    continue
                q = torch.randn(batch, d, device=dev, dtype=torch.bfloat16)
                lut = TK.triton_compute_lut(q, cb)
                t_all = bench(lambda: TK.triton_lut_topk(TK.triton_compute_lut(q, cb), packed, vocab, k, bias))
                t_scan = bench(lambda: TK.triton_lut_topk(lut, packed, vocab, k, bias))
                t_cub = bench(lambda: torch.topk(q @ w.T + bias.to(torch.bfloat16), k))
                m = cb.shape[0]
                if batch * vocab * m <= (2e9 if not ARGS.dry else 1e9):
                    t_ref = bench(lambda: ops.lut_topk_reference(ops.compute_lut_reference(q, cb), packed, vocab, k, bias))
                    ref_s = f"{t_ref:9.3f}"
                else:
                    ref_s = f"{'-':>9}"
                gbs = packed.numel() / t_scan / 1e6
                rows.append((vocab, d, quant, batch, t_all, t_cub))
                say(f"{vocab:>7} {d:>5} {quant:>6} {batch:>4} | {code_mb:8.1f} {t_all:8.3f} {t_scan:8.3f} {gbs:7.0f} "
                    f"{100 * gbs / copy_gbs:5.0f}% | {t_cub:8.3f} {ref_s} | {t_cub / t_all:8.2f}")
        del w
    if skipped:
        say(f"({skipped} rows skipped: past 70% of the --budget of {ARGS.budget:.0f} s)")
    say()
    say("crossover (largest measured batch where torchaq beats cuBLAS bf16 matmul + topk):")
    for vocab, d in shapes:
        for quant in QUANT:
            r = [x for x in rows if x[:3] == (vocab, d, quant)]
            if not r:
                continue
            wins = [x[3] for x in r if x[4] < x[5]]
            say(f"  V={vocab} d={d} {quant}: " + (f"wins up to B={max(wins)}" if wins else "never wins")
                + "  (" + ", ".join(f"B={x[3]}: {x[5] / x[4]:.2f}x" for x in r) + ")")
    out_dir = Path(ARGS.out_dir) if not ARGS.dry else Path(os.environ.get("TMPDIR", "/tmp"))
    out_dir.mkdir(parents=True, exist_ok=True)
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    path = out_dir / f"gpu_bench_{safe}.txt"
    emit("\n".join(LINES) + "\n(tile sweep not reached)", path, echo=False)  # in case the sweep is cut off
    if not ARGS.no_tune and time.time() - t_start < ARGS.budget:
        tune(dev, t_start)
    say()
    say(f"correctness: {'PASS' if ok else 'FAIL'}; total {time.time() - t_start:.0f} s")
    emit("\n".join(LINES), path, echo=False)
    print(f"wrote {path}")


def _sms(dev) -> int:
    return torch.cuda.get_device_properties(0).multi_processor_count if dev == "cuda" else 2


def tune(dev, t_start) -> None:
    """Scan-only times of a few tile settings at the headline size (V = 256k, d = 4096)."""
    vocab, d = (262_144, 4096) if not ARGS.dry else (320, 16)
    say()
    say(f"tile sweep, scan only (ms), V={vocab} d={d} k={ARGS.k}; default = scan_config()")
    variants = [
        ("default", {}),
        ("gather", dict(use_gather=True)),
        ("p_chunk=2", dict(p_chunk=2)),
        ("p_chunk=8", dict(p_chunk=8)),
        ("p_chunk=16", dict(p_chunk=16)),
        ("block_n=256", dict(block_n=256)),
        ("block_n=512", dict(block_n=512)),
        ("block_b/2", "half_b"),
        ("warps=4", dict(num_warps=4)),
        ("warps=8", dict(num_warps=8)),
        ("splits/2", "half_splits"),
        ("fp16 LUT", "fp16"),
    ]
    for quant in ("4b/2d", "4b/8d", "8b/8d") if not ARGS.dry else ("4b/2d",):
        packed, cb, bias = make_problem(vocab, d, quant, dev)
        for batch in (1, 8) if not ARGS.dry else (1,):
            q = torch.randn(batch, d, device=dev, dtype=torch.bfloat16)
            lut = TK.triton_compute_lut(q, cb)
            lut16 = TK.triton_compute_lut(q, cb, out_dtype=torch.float16)
            cells = []
            for label, kw in variants:
                if time.time() - t_start > ARGS.budget:
                    cells.append(f"{label}=skip")
                    continue
                try:
                    if kw == "fp16":
                        t = bench(lambda: TK.triton_lut_topk(lut16, packed, vocab, ARGS.k, bias))
                    elif kw == "half_b":
                        bb = max(1, scan_config(batch, ARGS.k, QUANT[quant][0])["block_b"] // 2)
                        t = bench(lambda: TK.triton_lut_topk(lut, packed, vocab, ARGS.k, bias, block_b=bb))
                    elif kw == "half_splits":
                        qt = triton.cdiv(batch, scan_config(batch, ARGS.k, QUANT[quant][0])["block_b"])
                        ns = max(1, triton.cdiv(4 * _sms(dev), qt) // 2)
                        t = bench(lambda: TK.triton_lut_topk(lut, packed, vocab, ARGS.k, bias, num_splits=ns))
                    else:
                        t = bench(lambda: TK.triton_lut_topk(lut, packed, vocab, ARGS.k, bias, **kw))
                    cells.append(f"{label}={t:.3f}")
                except Exception as err:  # a tile that does not compile / fit is a result, not a crash
                    cells.append(f"{label}=ERR({type(err).__name__})")
            say(f"  {quant} B={batch} {scan_config(batch, ARGS.k, QUANT[quant][0])}: " + "  ".join(cells))


if __name__ == "__main__":
    main()
