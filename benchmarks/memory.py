"""Peak extra memory of each inference path of ``QuantizedSoftmax`` against the dense layer.

On the real MiniLM vocabulary table (30522 x 384, ``examples/real_data.py`` ``load_table()``), the
default layer (4-bit, ``M = 192``), at batch 1 / 256 / 4096: the peak of the bytes the CPU
allocator holds during one call, above what it held before (parameters, codes and caches are
already allocated; the call's outputs count). Measured with ``torch.profiler`` memory events
(the allocator's running total, ``Total Allocated``): every tensor torch or the torchaq ops
allocate is seen; scratch memory the C++ kernels take with ``malloc`` outside torch is not.

Paths: ``topk(k=10)``, ``sample`` (``top_k=50``, whole vocabulary, ``top_p=0.9``, with
``return_logprobs``), ``token_logprobs``, ``log_softmax_topk(k=10)``,
``topk(k=10, guarantee="bound")``, ``entropy``; baselines: ``nn.Linear`` + ``log_softmax`` +
``topk`` (what the issue compares against; every ratio is to it), ``nn.Linear`` + ``topk``, and the
dense forms of the sampling paths: ``softmax`` + ``multinomial``, and a nucleus draw as Hugging
Face's ``TopPLogitsWarper`` makes it (sort, nucleus, multinomial).

    python benchmarks/memory.py            # batches 1 256 4096
    python benchmarks/memory.py --quick    # batches 1 256

Writes ``benchmarks/results/memory.txt`` (``--out``).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torchaq  # noqa: E402
from benchmarks.common import CACHE, RESULTS, emit, environment, markdown_table  # noqa: E402
from benchmarks.sampling import dense_top_p  # noqa: E402
from examples.real_data import load_table  # noqa: E402


def peak_mb(fn) -> float:
    """Peak MB the CPU allocator holds during ``fn()`` above its level at the start (outputs included)."""
    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
        del out
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    finally:
        os.unlink(path)
    totals = [e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]"]
    return max([0] + totals) / 2**20


def fitted(table: torch.Tensor) -> torchaq.QuantizedSoftmax:
    """The default layer on the table (isotropic fit, cached under the benchmark cache)."""
    file = CACHE / f"memory_layer_{table.shape[0]}x{table.shape[1]}.pt"
    layer = torchaq.QuantizedSoftmax(table, fit=False, progress=False)
    if file.is_file():
        layer.load_state_dict(torch.load(file, weights_only=False))
    else:
        layer.fit()
        CACHE.mkdir(parents=True, exist_ok=True)
        torch.save(layer.state_dict(), file)
    return layer.eval()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", type=int, nargs="*", default=[1, 256, 4096])
    ap.add_argument("--quick", action="store_true", help="batches 1 and 256 only")
    ap.add_argument("--out", default=str(RESULTS / "memory.txt"))
    args = ap.parse_args(argv)
    batches = [1, 256] if args.quick else args.batches

    torch.manual_seed(0)
    table = load_table()
    layer = fitted(table)
    w = layer.weight.detach()
    gen = torch.Generator().manual_seed(1)
    # queries: table rows plus noise, at the table's scale (hidden states live near the rows)
    base = table[torch.randint(0, table.shape[0], (max(batches),), generator=gen)]
    queries = base + 0.5 * base.norm(dim=1, keepdim=True) / table.shape[1] ** 0.5 * torch.randn(base.shape, generator=gen)
    paths = {
        "nn.Linear + log_softmax + topk (dense)": lambda h: F.log_softmax(F.linear(h, w), dim=1).topk(10),
        "nn.Linear + topk": lambda h: F.linear(h, w).topk(10),
        "nn.Linear + softmax + multinomial (dense sample)": lambda h: torch.multinomial(F.softmax(F.linear(h, w), 1), 1),
        "nn.Linear + sort + nucleus + multinomial (dense top_p=0.9)": lambda h: dense_top_p(F.linear(h, w), 0.9),
        "topk": lambda h: layer.topk(h, k=10),
        "sample(top_k=50)": lambda h: layer.sample(h, top_k=50),
        "sample() (whole vocabulary)": lambda h: layer.sample(h),
        "sample(top_p=0.9)": lambda h: layer.sample(h, top_p=0.9),
        "sample(return_logprobs=True)": lambda h: layer.sample(h, return_logprobs=True),
        "token_logprobs": lambda h: layer.token_logprobs(h, torch.zeros(h.shape[0], dtype=torch.int64)),
        "log_softmax_topk": lambda h: layer.log_softmax_topk(h, k=10),
        'topk(guarantee="bound")': lambda h: layer.topk(h, k=10, guarantee="bound"),
        "entropy": lambda h: layer.entropy(h),
    }
    rows = []
    with torch.no_grad():
        layer.topk(queries[:2], k=10)  # caches (int8 shortlist rows) are built once, before measuring
        for name, fn in paths.items():
            fn(queries[:1])  # the path's own persistent caches (e.g. the scan bias) are built once, not per call
            row = [name]
            for b in batches:
                h = queries[:b].contiguous()
                row.append(peak_mb(lambda: fn(h)))
            rows.append(row)
    dense = rows[0][1:]
    table_rows = []
    for row in rows:
        cells = [row[0]]
        for mb, ref in zip(row[1:], dense):
            cells.append(f"{mb:,.2f} MB ({mb / ref:.2f}x)" if ref > 0 else f"{mb:,.2f} MB")
        table_rows.append(cells)
    text = "\n".join([
        environment(),
        f"table {tuple(table.shape)} (MiniLM word embeddings), layer: {layer.extra_repr()}",
        "peak extra CPU-allocator memory per call (torch.profiler memory events); (x dense) = ratio to the first row",
        "",
        markdown_table(["path"] + [f"batch {b}" for b in batches], table_rows),
    ])
    emit(text, args.out)


if __name__ == "__main__":
    main()
