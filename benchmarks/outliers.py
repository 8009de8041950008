"""Rows the codes cannot represent, on real data: MiniLM's vocabulary table and hidden states.

Two query mixes from ``examples/real_data.py``: real tokens only, and the same text with the
hidden states at the [CLS] / [SEP] positions kept (``special_tokens=True``: they point at rows
such as [CLS] that product-quantization codes represent badly). Each mix is scored raw and with
the hidden states scaled so that the exact softmax has a mean entropy of ``--entropy`` nats (a
language model's range, 2-4), against the exact dense layer:

* top-1 agreement of ``topk(h, 1)``;
* total variation between top-50 sampling from the layer (``sample(top_k=50)`` draws from the
  softmax of its top-50 exact logits, so the distance is computed in closed form) and from the
  dense logits;
* mean |log-prob error| of ``log_softmax_topk(h, 10)`` over its 10 entries;
* ``guarantee="bound"``: share of queries whose bound needed rows beyond the default candidates,
  and how many on average;
* the share of queries whose 4-bit uint8 LUT the C++ scan would refuse as too coarse (computed
  here with the same rule as ``torchaq/csrc/scan.cpp``);
* batch-1 ``topk(h, 10)`` time against ``nn.Linear`` + ``torch.topk``, one thread (CPU time).

Rows: the default layer (4-bit, ``d/2`` subspaces, calibrated on the special-token mix's first
half) with its side list, and the same layer with the side list emptied (what the codes alone do).
The fitted layer is cached in ``$TORCHAQ_CACHE`` (default ``~/.cache/torchaq``) (fitting is minutes on a shared machine).

    python benchmarks/outliers.py [--eval 2000] [--entropy 3.0] [--part all|quality|speed]

``--part quality`` (no timing: needs no benchmark lock) writes ``benchmarks/results/outliers.txt``,
``--part speed`` (run it under ``flock /tmp/torchaq-bench.lock``) ``outliers_speed.txt``; ``all``
writes both tables to ``outliers.txt``.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS, emit, environment, markdown_table, time_call  # noqa: E402
from examples.real_data import DEFAULT_CACHE, load_minilm, split  # noqa: E402
import torchaq  # noqa: E402
from torchaq.layer import side_list as outliers  # noqa: E402
from torchaq.layer.partition import log_partition  # noqa: E402

SPECIAL_IDS = (101, 102)  # [CLS], [SEP]


def fitted_layer(table: torch.Tensor, fit_q: torch.Tensor) -> torchaq.QuantizedSoftmax:
    """The default layer calibrated on ``fit_q``, from the cache when it is there."""
    path = DEFAULT_CACHE / f"outliers_layer_v1_{table.shape[0]}x{table.shape[1]}_q{fit_q.shape[0]}.pt"
    if path.is_file():
        layer = torchaq.QuantizedSoftmax(table, fit=False)
        layer.load_state_dict(torch.load(path, weights_only=True))
        return layer
    layer = torchaq.QuantizedSoftmax(table, queries=fit_q, progress=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(layer.state_dict(), path)
    return layer


def entropy_scale(h: torch.Tensor, table: torch.Tensor, target: float) -> float:
    """The factor ``s`` for which the exact softmax of ``s h`` has mean entropy ``target`` nats (bisection)."""
    sub = h[:500]
    lo, hi = 1e-3, 100.0
    for _ in range(40):
        mid = math.sqrt(lo * hi)
        logp = torch.log_softmax(mid * sub @ table.T, dim=1)
        ent = float(-(logp.exp() * logp).sum(1).mean())
        lo, hi = (mid, hi) if ent > target else (lo, mid)
    return math.sqrt(lo * hi)


def coarse_share(layer: torchaq.QuantizedSoftmax, h: torch.Tensor) -> float:
    """Share of queries whose uint8 table the C++ scan refuses (the rule of torchaq/csrc/scan.cpp)."""
    lut = layer.quantizer.lut(h)
    m = lut.shape[1]
    r = lut.amax(-1) - lut.amin(-1)
    scale = torch.minimum(255 / r.amax(1), (65535 - m) / r.sum(1))
    s = lut[:, :: max(1, m // 16)].sort(-1).values  # ~16 evenly spaced subspaces, as the C++ scan
    levels = (s[..., 12] - s[..., 3]).double().quantile(0.5, dim=1, interpolation="higher").float() * scale
    return float((levels < 4.0).float().mean())


@torch.no_grad()
def quality(layer: torchaq.QuantizedSoftmax, h: torch.Tensor, table: torch.Tensor) -> dict:
    exact = h @ table.T
    out = {}
    _, top1 = layer.topk(h, k=1)
    out["top1"] = float((top1[:, 0] == exact.argmax(1)).float().mean())
    v, i = layer.topk(h, k=50)
    ev, ei = exact.topk(50)
    p = torch.zeros_like(exact).scatter_(1, i, v.softmax(1))
    q = torch.zeros_like(exact).scatter_(1, ei, ev.softmax(1))
    out["tv"] = float(0.5 * (p - q).abs().sum(1).mean())
    logp, idx = layer.log_softmax_topk(h, k=10)
    out["lp_err"] = float((logp - torch.log_softmax(exact, 1).gather(1, idx)).abs().mean())
    logits, classes, lut = layer.candidate_logits(h, k=10)
    scores = torchaq.ops.lut_score(lut, layer.packed_codes, layer.num_classes)
    plain = logits[:, :10] - log_partition(h, layer.weight, None, logits, classes, scores, samples=0).unsqueeze(1)
    out["lp_err_plain"] = float((plain - torch.log_softmax(exact, 1).gather(1, classes[:, :10])).abs().mean())
    fresh_scores = lambda: torchaq.ops.lut_score(lut, layer.packed_codes, layer.num_classes)  # noqa: E731
    _, bclasses, extra = outliers.bound_complete(h, layer.weight.detach(), None, fresh_scores, layer.residual_norms,
                                                 logits, classes, 10)
    out["bound_more"] = float((extra > 0).float().mean())
    out["bound_extra"] = float(extra.float().mean())
    out["bound_top10"] = float((bclasses[:, :10].sort(1).values == exact.topk(10).indices.sort(1).values).all(1).float().mean())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--eval", type=int, default=2000, help="evaluation queries per mix")
    ap.add_argument("--entropy", type=float, default=3.0, help="target mean softmax entropy (nats) of the scaled rows")
    ap.add_argument("--part", choices=("all", "quality", "speed"), default="all")
    ap.add_argument("--out", default=None, help="results file (default: by --part, see the module docstring)")
    args = ap.parse_args()
    out = args.out or str(RESULTS / ("outliers_speed.txt" if args.part == "speed" else "outliers.txt"))
    torch.set_num_threads(1)

    table, special_q, special_ids = load_minilm(20_000, 0, special_tokens=True, progress=False, return_token_ids=True)
    _, plain_q = load_minilm(20_000, 0, progress=False)
    fit_q, special_eval = split(special_q, 0.5, max_eval=args.eval)
    special_eval_ids = special_ids[fit_q.shape[0]:][: args.eval]
    _, plain_eval = split(plain_q, 0.5, max_eval=args.eval)
    layer = fitted_layer(table, fit_q)
    side = layer.side_rows.clone()

    mixes = {
        "with special-token positions": special_eval,
        "real tokens only": plain_eval,
        "special-token positions alone": special_eval[torch.isin(special_eval_ids, torch.tensor(SPECIAL_IDS))],
    }
    rows = []
    for mix, h in (mixes.items() if args.part != "speed" else ()):
        s = entropy_scale(h, table, args.entropy)
        for scaled, hs in (("raw", h), (f"x{s:.2f} (entropy {args.entropy:g})", h * s)):
            ent = torch.log_softmax(hs[:500] @ table.T, 1)
            ent = float(-(ent.exp() * ent).sum(1).mean())
            coarse = coarse_share(layer, hs)
            for name, rows_kept in (("default (side list)", side), ("codes only (side list emptied)", side[:0])):
                layer.side_rows = rows_kept
                qd = quality(layer, hs, table)
                rows.append([
                    mix, hs.shape[0], scaled, f"{ent:.2f}", name, f"{qd['top1']:.4f}", f"{qd['tv']:.4f}",
                    f"{qd['lp_err']:.4f}", f"{qd['lp_err_plain']:.4f}", f"{qd['bound_more']:.3f}", f"{qd['bound_extra']:.1f}",
                    f"{qd['bound_top10']:.4f}", f"{coarse:.4f}",
                ])
            layer.side_rows = side
    header = [
        "mix", "queries", "hidden states", "entropy (nats)", "layer", "top-1 agreement", "top-50 sampling TV",
        "mean |log-prob error| (top-10)", "same, log Z without the sampled correction", "bound: share needing more", "bound: mean extra rows",
        "bound: exact top-10", "coarse-LUT fallback share",
    ]

    sections = [
        "# Outlier rows: side list, bound, log-partition (benchmarks/outliers.py)",
        environment(f"MiniLM table {tuple(table.shape)}, default layer: {layer.extra_repr()}"),
        f"side list: {side.numel()} rows (cap {outliers.default_max_rows(table.shape[0])}), first: "
        + ", ".join(repr(t) for t in _tokens(side[:12])),
    ]
    if args.part != "speed":
        sections.append(markdown_table(header, rows))
    if args.part != "quality":
        sections += speed_table(layer, table, special_eval[:1], side)
    emit("\n\n".join(sections), out)


@torch.no_grad()
def speed_table(layer, table, h1, side):
    """Batch-1 ``topk(k=10)`` against ``nn.Linear`` + ``topk``, one thread, CPU time."""
    lin = torch.nn.Linear(table.shape[1], table.shape[0], bias=False)
    with torch.no_grad():
        lin.weight.copy_(table)
    dense = time_call(lambda: lin(h1).topk(10), cpu_time=True)
    fast = time_call(lambda: layer.topk(h1, 10), cpu_time=True)
    layer.side_rows = side[:0]
    bare = time_call(lambda: layer.topk(h1, 10), cpu_time=True)
    layer.side_rows = side
    bound = time_call(lambda: layer.topk(h1, 10, guarantee="bound"), cpu_time=True)
    speed = [
        ["nn.Linear + topk", f"{dense.ms:.3f}", "1.0x"],
        [f"layer.topk, side list ({side.numel()} rows)", f"{fast.ms:.3f}", f"{dense.median / fast.median:.1f}x"],
        ["layer.topk, side list emptied", f"{bare.ms:.3f}", f"{dense.median / bare.median:.1f}x"],
        ['layer.topk(guarantee="bound")', f"{bound.ms:.3f}", f"{dense.median / bound.median:.1f}x"],
    ]
    return [
        "batch-1 topk(k=10), one thread, CPU time per call (median ms):",
        markdown_table(["method", "ms", "speed-up vs dense"], speed),
    ]


def _tokens(ids):
    try:
        from examples.real_data import decode_ids

        return decode_ids(ids)
    except Exception:  # noqa: BLE001 - names are decoration only
        return [int(i) for i in ids]


if __name__ == "__main__":
    main()
