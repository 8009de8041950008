"""Time to quality: validation perplexity against training wall-clock time (``examples/train_lm.py``).

The results file holds the numbers, one line per arm::

    <arm>: reaches the target at <s> s; <step>:<seconds>s:<perplexity>, ...

and the PNG only draws them. The target is the full softmax's final curve point plus
``TARGET_SLACK`` (a curve point is measured on a few thousand held-out tokens, so single points
move by a few percent). ``python examples/curves.py RESULTS --plot PNG`` renders both again from a
results file that ``train_lm.py --eval-every`` wrote.
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path

TARGET_SLACK = 0.02
SECTION = "validation perplexity (curve points) against training wall-clock seconds"
_LINE = re.compile(r"^(?P<arm>[^:]+): reaches the target at [^;]*; (?P<points>.*)$")


def time_to_reach(curve, target: float):
    """Training seconds at the first curve point whose perplexity is <= ``target`` (None: never)."""
    return next((t for _, t, ppl in curve if ppl <= target), None)


def target_of(curves: dict):
    full = curves.get("full")
    return full[-1][2] * (1 + TARGET_SLACK) if full else None


def curve_lines(curves: dict) -> list:
    """``curves``: arm name -> ``[(step, seconds, perplexity), ...]``; the text section of the results file."""
    target = target_of(curves)
    lines = ["", f"{SECTION}; target = the full softmax's final curve point + {TARGET_SLACK:.0%}"
             + (f" ({target:.1f})" if target else " (no full arm)"), ""]
    for arm, curve in curves.items():
        reach = time_to_reach(curve, target) if target else None
        lines.append(f"{arm}: reaches the target at " + (f"{reach:.0f} s" if reach is not None else "never") + "; "
                     + ", ".join(f"{step}:{t:.0f}s:{ppl:.1f}" for step, t, ppl in curve))
    return lines


def parse_curves(text: str) -> dict:
    """The curves of a results file (the inverse of :func:`curve_lines`)."""
    curves = {}
    for line in text.splitlines():
        m = _LINE.match(line)
        if m:
            points = [p.split(":") for p in m["points"].split(", ")]
            curves[m["arm"]] = [(int(s), float(t.rstrip("s")), float(p)) for s, t, p in points]
    return curves


def plot_curves(curves: dict, title: str, path: str, eval_tokens: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for arm, curve in curves.items():
        _, t, ppl = zip(*curve)
        ax.plot(t, ppl, marker=".", label=arm)
    target = target_of(curves)
    if target:
        ax.axhline(target, color="gray", ls=":", lw=1, label=f"full softmax, final + {TARGET_SLACK:.0%}")
    ax.set_yscale("log")
    ax.set_xlabel("training wall-clock seconds (evaluations excluded)")
    ax.set_ylabel(f"validation perplexity ({eval_tokens} held-out tokens)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", help="a results file of train_lm.py --eval-every")
    parser.add_argument("--plot", default=None, help="PNG to write")
    parser.add_argument("--eval-tokens", type=int, default=8192, help="held-out tokens per curve point (axis label)")
    args = parser.parse_args(argv)
    path = Path(args.results)
    text = path.read_text()
    curves = parse_curves(text)
    if not curves:
        raise SystemExit(f"{path}: no curve lines (written by train_lm.py --eval-every?)")
    head = text.split("\n" + SECTION)[0].rstrip("\n").splitlines()
    head = head[:-1] if head and head[-1] == "" else head
    tail = [ln for ln in text.splitlines() if ln.startswith("(unfinished")]
    path.write_text("\n".join(head + curve_lines(curves) + tail) + "\n")
    if args.plot:
        title = next((ln for ln in head if ln.startswith("train_lm: ")), "train_lm").split(", head optimizer")[0]
        plot_curves(curves, title, args.plot, args.eval_tokens)


if __name__ == "__main__":
    main()
