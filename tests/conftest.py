"""Test set-up. Without a GPU, Triton kernels run under the interpreter on CPU tensors; the
switch must be set before anything imports triton, so it is set here, first."""
import contextlib
import math
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


def random_head(num_classes: int, dim: int, batch: int, seed: int = 0, dtype=torch.float32):
    """``(h, weight, bias)``: a random ``(V, d)`` head (rows of norm ~1, in ``dtype``), a float32 bias and
    ``(B, d)`` hidden states that give moderately peaked logits (the exact-pass op tests)."""
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(num_classes, dim, generator=g) / math.sqrt(dim)).to(dtype)
    b = 0.3 * torch.randn(num_classes, generator=g)
    h = 3 * torch.randn(batch, dim, generator=g)
    return h, w, b


def rejection_plan(seed: int = 0, rows: int = 3, num_classes: int = 700, dim: int = 24, head: int = 20, block: int = 64,
                   draws: int = 40, temperature: float = 0.8, floors: bool = True):
    """The arguments of ``torchaq.ops.reject_rounds`` for a random plan laid out as the sampler lays it
    out (the weights of the tail bounds, then of the exact head, block-padded): bounds above the exact
    logits except a few (so violations occur), a truncation floor on one row."""
    from torchaq.ops.counter_rng import row_keys

    g = torch.Generator().manual_seed(seed)
    w = torch.randn(num_classes, dim, generator=g) / dim ** 0.5
    b = 0.2 * torch.randn(num_classes, generator=g)
    h = 2 * torch.randn(rows, dim, generator=g)
    exact = h @ w.T + b
    logits, classes = exact.topk(head, dim=1)
    upper = exact + 0.4 * torch.rand(rows, num_classes, generator=g) - 0.02  # l > u on ~5% of the classes
    upper.scatter_(1, classes, -math.inf)
    floor = torch.full((rows,), -math.inf)
    if floors:
        floor[0] = logits[0, head // 2]
    top = torch.maximum(logits[:, :1], upper.amax(dim=1, keepdim=True))
    span = num_classes + (-num_classes % block)
    total = span + head + (-head % block)
    weights = torch.zeros(rows, total)
    weights[:, :num_classes] = ((upper - top) / temperature).exp().masked_fill(upper < floor[:, None], 0.0)
    weights[:, span:span + head] = ((logits - top) / temperature).exp().masked_fill(logits < floor[:, None], 0.0)
    weights = weights.view(rows, -1, block)
    cum = weights.sum(dim=2).cumsum(dim=1, dtype=torch.float64)
    draw_rows = torch.randint(0, rows, (draws,), generator=g)
    keys = row_keys(torch.randint(-(2 ** 62), 2 ** 62, (draws,), generator=g))
    return (h, w, b, logits, classes, num_classes, top[:, 0], floor, weights, cum, draw_rows, keys, temperature)
