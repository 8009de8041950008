"""Part ``scan`` of ``benchmarks/llm_heads.py``: the 4-bit LUT scan alone, cost per look-up vs V, M, batch.

``torchaq.ops.lut_topk(lut, packed, V, 256)`` (the scan + top-256 selection the layer runs) on
random codes and random LUTs, one thread, CPU time of the thread. Picoseconds per look-up =
time / (B * V * M): constant when the scan is compute-bound, growing when it waits on memory.
Comparing V = 65,536 (codes of M <= 320 fit the 32 MB L3) with V = 262,144 (they do not) at the
same M and batch shows whether the scan reads each code block once for many queries (the
query-blocked scan): if it did, the per-look-up cost at batch 64 would not depend on V.
Random LUTs make the two-pass top-k revisit more blocks than real LUTs do (its block bound is
looser), so absolute times are upper bounds of the layer's scan.
"""
from __future__ import annotations

import torch

from benchmarks.common import markdown_table, time_call
from torchaq import ops


@torch.no_grad()
def run(vocabs, subspaces, batches, k: int = 256, min_run: float = 0.1) -> str:
    torch.set_num_threads(1)
    body = []
    for m in subspaces:
        p = (m + 1) // 2
        for v in vocabs:
            packed = torch.randint(0, 256, ((v + 31) // 32, p, 32), dtype=torch.uint8)
            cells = [m, f"{v:,}", f"{packed.numel() / 2 ** 20:.0f}"]
            for b in batches:
                lut = torch.randn(b, m, 16)
                t = time_call(lambda: ops.lut_topk(lut, packed, v, k), min_run_time=min_run, cpu_time=True).median
                cells.append(f"{t * 1e3:.2f} ms / {t / (b * v * m) * 1e12:.1f} ps")
                print(f"    scan M={m} V={v} B={b}: {t * 1e3:.3f} ms", flush=True)
            body.append(cells)
            del packed
    return (f"## The 4-bit scan alone: lut_topk(k={k}) on random codes, 1 thread (ms per call / ps per look-up)\n"
            + markdown_table(["M", "V", "code MiB", *[f"batch {b}" for b in batches]], body))
