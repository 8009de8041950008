"""CPU lookup-table scan: torchaq ``lut_topk`` vs FAISS ``IndexPQFastScan`` vs dense fp32 matmul + topk.

One run prints one table (also written to ``benchmarks/results/cpu_scan.txt``). Same data and same
bits for both PQ systems: FAISS trains the product quantizer (M subspaces, 4 bits) and encodes the
class vectors; torchaq scans exactly those codes with a LUT built from FAISS's centroids. Inner
product metric (an output layer's logits). torchaq's time includes building the LUT from the
queries (``torchaq.ops.compute_lut``); FAISS's ``search`` does the same internally.

Data are random gaussian for every configuration (class vectors and queries): the speed of a
scan does not depend on the data, and the recall column is only a sanity check of the 4-bit LUT
quantization (recall@10 of the scan against the exact float LUT scores of the same codes), not a
measure of PQ quality on a real vocabulary.

    python benchmarks/cpu_scan.py            # about a minute on 2 quiet cores
    python benchmarks/cpu_scan.py --quick    # smaller vocabularies, smoke test
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torchaq  # noqa: E402
from benchmarks.common import cpu_name, emit, environment, time_call  # noqa: E402
from torchaq import ops  # noqa: E402

try:
    import faiss
except ImportError:  # benchmark extra not installed
    faiss = None

K_TOP = 100
BATCHES = (1, 16, 256)


def seconds(fn, min_run_time: float, cpu_time: bool) -> float:
    """Seconds per call, the fastest of several blocks of calls (``benchmarks.common.time_call``).

    The machines this runs on are often shared, and other processes inflate wall-clock times
    (never deflate them): hence the fastest block, and for single-thread rows the CPU time of the
    calling thread (FAISS with one OpenMP thread and torch with one intra-op thread compute on the
    calling thread). Rows with all threads need wall-clock time.
    """
    return time_call(fn, min_run_time=min_run_time, cpu_time=cpu_time).best


def recall_at_10(found: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(set(f[:10]) & set(e[:10])) / 10 for f, e in zip(found, exact)]))


def run_config(name, V, d, M, threads, batches, min_run_time, train_n, rows):
    rng = np.random.default_rng(0)
    xb = rng.standard_normal((V, d), dtype=np.float32)
    xq_all = rng.standard_normal((max(batches), d), dtype=np.float32)

    t0 = time.perf_counter()
    index = faiss.IndexPQFastScan(d, M, 4, faiss.METRIC_INNER_PRODUCT)
    index.train(xb[rng.choice(V, size=min(V, train_n), replace=False)])
    index.add(xb)
    # the same codes and centroids for torchaq
    pq = index.pq
    raw = pq.compute_codes(xb)  # (V, M/2) bytes, subspace 2j in the low nibble
    codes = np.empty((V, M), dtype=np.uint8)
    codes[:, 0::2] = raw & 15
    codes[:, 1::2] = raw >> 4
    codebooks = torch.from_numpy(faiss.vector_to_array(pq.centroids).reshape(M, 16, d // M).copy())
    packed = ops.pack_codes(torch.from_numpy(codes), 4)
    weight = torch.from_numpy(xb)
    print(f"  [{name}] trained + encoded in {time.perf_counter() - t0:.1f} s", flush=True)

    # recall@10 of each 4-bit scan against the exact float LUT scores of the same codes
    xq = torch.from_numpy(xq_all[:64])
    exact = ops.lut_score(ops.compute_lut(xq, codebooks), packed, V).topk(10, dim=1).indices.numpy()
    _, ours = ops.lut_topk(ops.compute_lut(xq, codebooks), packed, V, K_TOP)
    _, theirs = index.search(xq_all[:64], K_TOP)
    rec_ours, rec_faiss = recall_at_10(ours.numpy(), exact), recall_at_10(theirs, exact)

    for th in threads:
        torch.set_num_threads(th)
        faiss.omp_set_num_threads(th)
        for B in batches:
            q_np = np.ascontiguousarray(xq_all[:B])
            q = torch.from_numpy(q_np)
            cpu = th == 1
            t_ours = seconds(lambda: ops.lut_topk(ops.compute_lut(q, codebooks), packed, V, K_TOP), min_run_time, cpu)
            t_faiss = seconds(lambda: index.search(q_np, K_TOP), min_run_time, cpu)
            t_dense = seconds(lambda: torch.matmul(q, weight.T).topk(K_TOP, dim=1), min_run_time, cpu)
            rows.append(
                (name, th, B, B / t_ours, B / t_faiss, B / t_dense, t_faiss / t_ours, t_dense / t_ours,
                 rec_ours, rec_faiss)
            )
            print("  " + fmt_row(rows[-1]), flush=True)


HEADER = (
    f"{'config':<26} {'thr':>3} {'batch':>5} {'torchaq q/s':>12} {'faiss q/s':>11} {'dense q/s':>10} "
    f"{'vs faiss':>8} {'vs dense':>8} {'R@10 aq':>8} {'R@10 faiss':>10}"
)


def fmt_row(r) -> str:
    name, th, B, ours, fs, dense, xf, xd, ra, rf = r
    return (
        f"{name:<26} {th:>3} {B:>5} {ours:>12,.0f} {fs:>11,.0f} {dense:>10,.0f} "
        f"{xf:>7.2f}x {xd:>7.1f}x {ra:>8.3f} {rf:>10.3f}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small vocabularies, short timings (smoke test)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "cpu_scan.txt"))
    args = ap.parse_args()
    if faiss is None:
        raise SystemExit("faiss-cpu is needed: pip install 'torchaq[bench]'")
    if not torchaq.backends.CPU_EXTENSION_LOADED:
        print("WARNING: torchaq._C not loaded, timing the pure-torch reference")

    all_threads = os.cpu_count() or 1
    threads = sorted({1, all_threads})
    if args.quick:
        configs = [("V=4k d=128 M=32", 4096, 128, 32)]
        min_run_time, train_n = 0.05, 4096
    else:
        configs = [
            ("V=30522 d=384 M=96", 30522, 384, 96),
            ("V=30522 d=384 M=192", 30522, 384, 192),
            ("V=256k d=1024 M=256", 262144, 1024, 256),
        ]
        min_run_time, train_n = 0.3, 20000

    from torchaq import _C  # noqa: F401  (only to report the kernel set)

    lines = [
        "torchaq CPU LUT scan benchmark (top-k = %d, 4-bit PQ codes, inner product, random gaussian data)" % K_TOP,
        environment(f"torchaq kernels: {_C.cpu_isa()}"),
        f"cpu: {cpu_name()} ({all_threads} logical cores), faiss {faiss.__version__}, numpy {np.__version__}, "
        f"python {platform.python_version()}, torch cpu capability {torch.backends.cpu.get_cpu_capability()}",
        "torchaq time includes compute_lut; 'vs faiss' / 'vs dense' = speed-up of torchaq; "
        "R@10 = recall@10 vs the exact float LUT scores of the same codes (64 queries); "
        "times: fastest block; thr=1 rows CPU time of the calling thread, all-thread rows wall clock",
    ]
    print("\n".join(lines), flush=True)
    rows = []
    t0 = time.perf_counter()
    for name, V, d, M in configs:
        run_config(name, V, d, M, threads, BATCHES, min_run_time, train_n, rows)
    table = "\n".join(lines + ["", HEADER, "-" * len(HEADER)] + [fmt_row(r) for r in rows])
    table += f"\n\ntotal benchmark time {time.perf_counter() - t0:.0f} s"
    print()
    emit(table, None if args.quick else args.out)


if __name__ == "__main__":
    main()
