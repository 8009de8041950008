"""Test set-up. Without a GPU, Triton kernels run under the interpreter on CPU tensors; the
switch must be set before anything imports triton, so it is set here, first."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
