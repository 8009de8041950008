"""Loads the optional compiled backends: the C++ CPU extension and the Triton CUDA kernels.

Both register themselves as kernels of the ``torch.ops.torchaq.*`` ops declared in
:mod:`torchaq.ops`; when either is missing, those ops run their pure-torch reference.
"""
from __future__ import annotations

import os
import warnings

CPU_EXTENSION_LOADED = False
TRITON_LOADED = False


def load_cpu_extension() -> bool:
    """Import ``torchaq._C`` (its static initialisers register the CPU kernels). Warns once if absent."""
    global CPU_EXTENSION_LOADED
    if os.environ.get("TORCHAQ_DISABLE_CPP") == "1":
        return False
    try:
        from . import _C  # noqa: F401
    except ImportError as err:  # built without a compiler, or torch ABI mismatch
        warnings.warn(
            f"torchaq: the C++ extension torchaq._C is not available ({err}); CPU ops use the slower "
            "pure-torch reference. Reinstall with `pip install --no-build-isolation .` to build it.",
            RuntimeWarning,
            stacklevel=3,
        )
        return False
    CPU_EXTENSION_LOADED = True
    return True


def load_triton_kernels() -> bool:
    """Register the Triton kernels for CUDA tensors when triton and a CUDA device are present."""
    global TRITON_LOADED
    try:
        import torch

        if not torch.cuda.is_available():
            return False
        from torchaq.triton_kernels import register  # noqa: F401
    except ImportError:
        return False
    TRITON_LOADED = True
    return True
