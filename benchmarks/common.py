"""The one benchmark harness: a timer, the environment header and the results writer.

Every script under ``benchmarks/`` prints its table with :func:`environment` on top and writes it
to ``benchmarks/results/`` with :func:`emit`, and times calls with :func:`time_call`, so all the
numbers in ``benchmarks/results/`` are measured and reported the same way.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch.utils import benchmark as tbench

# the environment header, tables and the results writer are the examples' own (benchmarks build on examples/)
from examples.real_data import DEFAULT_CACHE
from examples.reporting import cpu_name, emit, environment, markdown_table  # noqa: F401  (re-exported)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
# the benchmarks' cache of fitted layers and real hidden states (outside the source tree)
CACHE = DEFAULT_CACHE


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
