"""Pick the faster of two ways to compute the same result, per call shape, by timing the first calls.

The LUT scan costs ``B V M`` table look-ups and the dense matmul ``B V d`` multiply-adds, so which
one is faster depends on the batch, the dtype's matmul kernels and the machine: on a CPU with fast
bfloat16 matmuls, a dense head can beat the scan at batch 32 while losing to it ten times over at
batch 1. Where both paths return what the caller needs (the fast ``generate`` step of
:mod:`torchaq.hf`), :class:`FasterPath` times each on the first calls of every key (batch, dtype,
threads, ...) and then keeps to the faster one, so the drop-in is never slower than the layer it
replaced beyond those first calls.

Policy: the paths take turns (the first path first) until each has ``min_samples`` timings; the
key is then decided if one path's best time beats the other's by ``clear_ratio``, else the turns
go on until each has ``max_samples`` and the lower best time wins.
"""
from __future__ import annotations

from typing import Dict, Hashable, List, Optional, Sequence


class FasterPath:
    """Per-key choice between ``paths`` from measured seconds (module docstring)."""

    def __init__(self, paths: Sequence[str], min_samples: int = 1, max_samples: int = 3, clear_ratio: float = 1.5):
        if len(paths) < 2 or len(set(paths)) != len(paths):
            raise ValueError(f"paths must be two or more distinct names, got {paths!r}")
        if not 1 <= min_samples <= max_samples:
            raise ValueError(f"need 1 <= min_samples <= max_samples, got {min_samples}, {max_samples}")
        if clear_ratio < 1:
            raise ValueError(f"clear_ratio must be >= 1, got {clear_ratio}")
        self.paths = tuple(paths)
        self.min_samples, self.max_samples, self.clear_ratio = min_samples, max_samples, clear_ratio
        self._seconds: Dict[Hashable, Dict[str, List[float]]] = {}
        self._chosen: Dict[Hashable, str] = {}

    def choice(self, key: Hashable) -> Optional[str]:
        """The path chosen for ``key``, or None while it is still being timed."""
        return self._chosen.get(key)

    def next_path(self, key: Hashable) -> str:
        """The path to run for ``key`` now: the chosen one, else the one with the fewest timings."""
        chosen = self._chosen.get(key)
        if chosen is not None:
            return chosen
        seconds = self._seconds.get(key, {})
        return min(self.paths, key=lambda p: len(seconds.get(p, ())))

    def record(self, key: Hashable, path: str, seconds: float) -> None:
        """Add one timing of ``path`` for ``key``; decides the key once the policy allows."""
        if path not in self.paths:
            raise ValueError(f"path must be one of {self.paths}, got {path!r}")
        if key in self._chosen:
            return
        times = self._seconds.setdefault(key, {p: [] for p in self.paths})
        times[path].append(float(seconds))
        counts = [len(times[p]) for p in self.paths]
        if min(counts) < self.min_samples:
            return
        best = sorted((min(times[p]), p) for p in self.paths)
        if best[1][0] >= self.clear_ratio * best[0][0] or min(counts) >= self.max_samples:
            self._chosen[key] = best[0][1]
            del self._seconds[key]

    def reset(self) -> None:
        """Forget every timing and choice (e.g. the machine got busier or quieter since they were taken)."""
        self._seconds.clear()
        self._chosen.clear()
