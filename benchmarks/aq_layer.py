"""Layer speed with additive codes: ``QuantizedSoftmax.topk`` with ``quantizer="aq"`` vs the default ``"pq"``.

The scan over the codes, the top-C selection and the exact re-score are the same for both
quantizers; only the lookup table differs: PQ's costs ``K d`` multiply-adds per query (each
codeword covers ``d / M`` dimensions), AQ's ``M K d`` (full-width codewords). This prints, per
shape and batch size (1 thread, CPU time of the calling thread, median of blocks), the time of
``topk(h, k=10)`` (default candidates), of its LUT alone, and of ``nn.Linear`` + ``torch.topk``.

The codebooks and codes are random (seeded): speed does not depend on what they encode, and an
AQ fit at LLM sizes takes far longer than this measurement. Shapes: the MiniLM table's
(30522 x 384) with PQ's default ``d / 2`` subspaces and AQ at 384 and 768 bits, and an LLM head
(32768 x 2048) with PQ's default and AQ at 512 and 1024 bits.

    python benchmarks/aq_layer.py          # -> benchmarks/results/aq_layer.txt
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torchaq  # noqa: E402
from benchmarks.common import environment, emit, markdown_table, time_call  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
K = 10
# (label, V, d, [(quantizer, M), ...])
SHAPES = [
    ("MiniLM 30522x384", 30522, 384, [("pq", 192), ("aq", 96), ("aq", 192)]),
    ("LLM head 32768x2048", 32768, 2048, [("pq", 1024), ("aq", 128), ("aq", 256)]),
]


def random_layer(weight: torch.Tensor, quantizer: str, m: int, gen: torch.Generator) -> torchaq.QuantizedSoftmax:
    """A layer with seeded random codebooks and codes (installed as ``fit`` would leave them)."""
    layer = torchaq.QuantizedSoftmax(weight, num_subspaces=m, quantizer=quantizer, fit=False, progress=False).eval()
    q = layer.quantizer
    books = torch.randn(q.codebooks.shape, generator=gen) * float(weight.std()) / (m ** 0.5 if quantizer == "aq" else 1)
    with torch.no_grad():
        q.codebooks.copy_(books)
    q.fitted = True
    codes = torch.randint(0, q.num_codewords, (weight.shape[0], m), generator=gen, dtype=torch.uint8)
    layer.packed_codes = q.pack(codes)
    layer._mark_fresh()
    return layer


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="*", default=[1, 64])
    ap.add_argument("--min-run-time", type=float, default=0.5)
    ap.add_argument("--out", default=str(RESULTS / "aq_layer.txt"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for label, v, d, configs in SHAPES:
        weight = torch.randn(v, d, generator=gen) / d ** 0.5
        for batch in args.batches:
            h = torch.randn(batch, d, generator=gen) * 2.0
            dense = time_call(lambda: (h @ weight.T).topk(K, dim=1), args.min_run_time, cpu_time=True)
            for quantizer, m in configs:
                layer = random_layer(weight, quantizer, m, gen)
                q = layer.quantizer
                with torch.no_grad():
                    topk = time_call(lambda: layer.topk(h, k=K), args.min_run_time, cpu_time=True)
                    lut = time_call(lambda: q.lut_unchecked(h), args.min_run_time, cpu_time=True)
                rows.append([label, batch, f"{quantizer} M={m} ({4 * m} b)", f"{topk.ms:.3f}", f"{lut.ms:.3f}",
                             f"{100 * lut.median / topk.median:.0f}%", f"{dense.ms:.3f}",
                             f"{dense.median / topk.median:.2f}x"])
                print(rows[-1], flush=True)
    text = "\n".join([
        "command: python benchmarks/aq_layer.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "QuantizedSoftmax.topk(h, k=10) (default candidates) with quantizer='pq' vs 'aq'; random seeded "
        "codebooks and codes; 1 thread, CPU time of the calling thread, median ms per call.",
        "lut: the quantizer's lookup table alone (part of topk); dense: h @ W.T + torch.topk; speed-up: dense / topk.",
        environment(),
        "",
        markdown_table(["shape", "batch", "quantizer", "topk ms", "lut ms", "lut share", "dense ms", "vs dense"], rows),
    ])
    emit(text, args.out)
    return text


if __name__ == "__main__":
    main()
