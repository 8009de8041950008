"""Test set-up. Without a GPU, Triton kernels run under the interpreter on CPU tensors; the
switch must be set before anything imports triton, so it is set here, first."""
import contextlib
import os
import time

import pytest
import torch
import torch.multiprocessing as mp

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


def clustered_softmax_data(num_classes: int, dim: int, seed: int = 0, batch: int = 24):
    """``(weight, bias, h, target)``: rows around 20 centres and hidden states near their targets' rows,
    so that the softmax is peaked and the LUT's top classes matter (the sampled-softmax tests)."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(20, dim, generator=gen)
    weight = centres[torch.randint(0, 20, (num_classes,), generator=gen)] + 0.4 * torch.randn(num_classes, dim, generator=gen)
    bias = 0.1 * torch.randn(num_classes, generator=gen)
    target = torch.randint(0, num_classes, (batch,), generator=gen)
    h = weight[target] + 0.4 * torch.randn(batch, dim, generator=gen)
    return weight, bias, h, target


@pytest.fixture(scope="module")
def one_thread():
    """Small tensors: one thread avoids OpenMP barrier waits on a shared, oversubscribed machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def spawn_ranks(worker, world: int, args: tuple, what: str, deadline: float) -> None:
    """Spawn ``world`` processes running ``worker(rank, *args)``; if they are not all done within
    ``deadline`` seconds, kill them and fail the test, so a stuck rank can never hang CI (an
    exception on any rank is re-raised here by ``torch.multiprocessing``)."""
    ctx = mp.start_processes(worker, args=args, nprocs=world, join=False, start_method="spawn")
    end = time.monotonic() + deadline
    while not ctx.join(timeout=max(0.5, min(5.0, end - time.monotonic()))):
        if time.monotonic() >= end:
            for proc in ctx.processes:
                if proc.is_alive():
                    proc.kill()
            pytest.fail(f"{world} ranks running {what} were not done within {deadline} s (killed)")
