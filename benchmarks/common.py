"""The one benchmark harness: a timer, the environment header and the results writer.

Every script under ``benchmarks/`` prints its table with :func:`environment` on top and writes it
to ``benchmarks/results/`` with :func:`emit`, and times calls with :func:`time_call` (two compared
calls in alternating blocks: :func:`time_pair`), so all the
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
    return _timing(times)


def _timing(times) -> Timing:
    times = sorted(times)
    q = lambda p: times[min(len(times) - 1, int(p * len(times)))]  # noqa: E731
    return Timing(best=times[0], median=q(0.5), p90=q(0.9))


def time_alternating(fn_a: Callable[[], object], fn_b: Callable[[], object], max_time: float = 1.0, warmup: int = 1,
                     cpu_time: bool = False):
    """Time single calls ``a, b, a, b, ...`` (5 to 60 of each, about ``max_time`` in all): every ``b``
    runs right after an ``a``, in the caches ``a`` left. A decode step's head runs right after the
    model body, which has streamed its own weights through the caches; a dense ``a`` that reads
    more than the last-level cache leaves ``b`` just as cold. Returns ``(Timing of a, Timing of b,
    median over pairs of time(a) / time(b))``. ``cpu_time`` as in :func:`time_call`."""
    clock = time.thread_time if cpu_time else time.perf_counter
    for _ in range(warmup):
        fn_a()
        fn_b()
    times, spent = ([], []), 0.0
    while len(times[0]) < 5 or (len(times[0]) < 60 and spent < max_time):
        for fn, out in zip((fn_a, fn_b), times):
            t0 = clock()
            fn()
            out.append(clock() - t0)
            spent += out[-1]
    ratios = sorted(a / b for a, b in zip(*times))
    return _timing(times[0]), _timing(times[1]), ratios[len(ratios) // 2]


def time_pair(fn_a: Callable[[], object], fn_b: Callable[[], object], min_run_time: float = 0.5, warmup: int = 1,
              cpu_time: bool = False):
    """Time two calls in alternating blocks of ~20 ms each (``a``, ``b``, ``a``, ``b``, ...) until each has
    run ``min_run_time``: ``(Timing of a, Timing of b, median over block pairs of time(a) / time(b))``.

    On a shared VM whose speed drifts between runs (and within one), the ratio of two calls timed in
    the same few tens of milliseconds drifts much less than the ratio of two separately timed ones.
    ``cpu_time`` as in :func:`time_call` (the calling thread's CPU time; single-threaded code only).
    """
    clock = time.thread_time if cpu_time else time.perf_counter
    for _ in range(warmup):
        fn_a()
        fn_b()

    def per_block(fn) -> int:
        t0 = clock()
        fn()
        return max(1, int(0.02 / max(clock() - t0, 1e-6)))

    counts = per_block(fn_a), per_block(fn_b)
    times = ([], [])
    while sum(times[0]) * counts[0] < min_run_time or len(times[0]) < 5:
        for fn, n, out in zip((fn_a, fn_b), counts, times):
            t0 = clock()
            for _ in range(n):
                fn()
            out.append((clock() - t0) / n)
    ratios = sorted(a / b for a, b in zip(*times))
    return _timing(times[0]), _timing(times[1]), ratios[len(ratios) // 2]
