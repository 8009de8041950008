"""Printing a benchmark's table and keeping a copy under ``benchmarks/results/``."""
from __future__ import annotations

import os
from pathlib import Path


def emit(text: str, out: str) -> None:
    """Print ``text``; also write it to ``out`` unless ``out`` is empty."""
    print(text)
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        Path(out).write_text(text + "\n")
