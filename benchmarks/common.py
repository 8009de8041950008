"""The one benchmark harness: a timer, the environment header and the results writer.

Every script under ``benchmarks/`` prints its table with :func:`environment` on top and writes it
to ``benchmarks/results/`` with :func:`emit`, and times calls with :func:`time_call`, so all the
numbers in ``benchmarks/results/`` are measured and reported the same way.
"""
from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from torch.utils import benchmark as tbench

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(module: str) -> str:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:  # noqa: BLE001 - not installed or no metadata
        return "not installed"


def environment(extra: str = "") -> str:
    """One header line: host, CPU, threads, Python / torch / FAISS / ScaNN versions, torchaq backends."""
    from torchaq import backends

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    line = (
        f"{platform.node()} | {cpu_name()} | {os.cpu_count()} cpus, torch threads {torch.get_num_threads()} | "
        f"load avg {load:.2f} | python {platform.python_version()} | torch {torch.__version__} | "
        f"faiss {_version('faiss-cpu')} | scann {_version('scann')} | "
        f"torchaq C++: {'yes' if backends.CPU_EXTENSION_LOADED else 'NO (reference)'}"
    )
    return line + (f" | {extra}" if extra else "")


@dataclass
class Timing:
    """Seconds per call: the fastest block (``best``) and the median and 90th percentile of blocks."""

    best: float
    median: float
    p90: float

    @property
    def ms(self) -> float:
        """The figure tables report: the median, in milliseconds."""
        return self.median * 1e3


def time_call(fn: Callable[[], object], min_run_time: float = 0.5, warmup: int = 1,
              cpu_time: bool = False) -> Timing:
    """Time ``fn()`` after ``warmup`` calls.

    ``cpu_time=False``: wall clock with ``torch.utils.benchmark.Timer.blocked_autorange`` (what
    multi-threaded rows need). ``cpu_time=True``: CPU time of the calling thread
    (``time.thread_time``) over blocks of ~20 ms, which other processes on a shared machine
    cannot inflate; only meaningful for single-threaded code (one torch / OpenMP thread).
    """
    for _ in range(warmup):
        fn()
    if not cpu_time:
        t = tbench.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
        times = sorted(t.blocked_autorange(min_run_time=min_run_time).times)
    else:
        clock = time.thread_time
        t0 = clock()
        fn()
        n = max(1, int(0.02 / max(clock() - t0, 1e-6)))
        times, spent = [], 0.0
        while spent < min_run_time or len(times) < 3:
            t0 = clock()
            for _ in range(n):
                fn()
            dt = clock() - t0
            spent += dt
            times.append(dt / n)
        times.sort()
    q = lambda p: times[min(len(times) - 1, int(p * len(times)))]  # noqa: E731
    return Timing(best=times[0], median=q(0.5), p90=q(0.9))


def markdown_table(header: list[str], rows: list[list[object]]) -> str:
    """A Markdown table; floats are printed as given (format them before)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def emit(text: str, out: Optional[str | os.PathLike] = None, echo: bool = True) -> None:
    """Print ``text`` (unless ``echo=False``); also write it to ``out`` (a path; ``None`` or empty: print only)."""
    if echo:
        print(text, flush=True)
    if out:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
