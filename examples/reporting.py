"""Reporting helpers of the examples and benchmarks: the environment header, Markdown tables, the results writer.

Every table torchaq's scripts print starts with :func:`environment` (host, CPU, threads, load
average, versions, whether the C++ kernels loaded), so a number can be traced to the machine
and load it was measured on.
"""
from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Optional

import torch


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
