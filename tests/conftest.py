"""Test set-up. Without a GPU, Triton kernels run under the interpreter on CPU tensors; the
switch must be set before anything imports triton, so it is set here, first."""
import contextlib
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


# the C++ kernel sets; TORCHAQ_CPU_ISA caps the choice at what the CPU supports
ISAS = ("scalar", "avx2", "avx512")


@contextlib.contextmanager
def isa(name: str):
    """Select a C++ kernel set (capped at what the CPU supports); the switch is read at every call."""
    old = os.environ.get("TORCHAQ_CPU_ISA")
    os.environ["TORCHAQ_CPU_ISA"] = name
    try:
        yield
    finally:
        if old is None:
            del os.environ["TORCHAQ_CPU_ISA"]
        else:
            os.environ["TORCHAQ_CPU_ISA"] = old
