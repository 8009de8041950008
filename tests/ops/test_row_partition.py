"""``row_log_partition``: each row's exact log-partition function (full and above a floor).

Every kernel set is checked against float64 log-sum-exps of the dense logits, and bitwise for the
guarantee that matters to sampling and scoring: with a given kernel set, a row's values are the
same alone or in any batch and at any thread count (the kernel sets differ in their ``exp``, so
they agree to rounding only). Bad input is refused with the argument named.
"""
from __future__ import annotations

import math

import pytest
import torch

import torchaq
from torchaq import ops

from conftest import ISAS, isa, random_head

CPP = torchaq.backends.CPU_EXTENSION_LOADED


def case(V=1000, d=37, B=9, seed=0, dtype=torch.float32):
    return random_head(V, d, B, seed, dtype)


def exact(h, w, b, t, floor):
    logits = h.double() @ w.double().T + (0 if b is None else b.double())
    full = torch.logsumexp(logits / t, 1)
    kept = (logits / t).masked_fill(logits < floor.double()[:, None], -math.inf) if floor is not None else logits / t
    return torch.stack([full, torch.logsumexp(kept, 1)], 1)


@pytest.mark.parametrize("name", ISAS)
@pytest.mark.parametrize("shape", [(1000, 37), (4099, 64), (300, 384), (100, 1100)])
def test_matches_float64(name, shape):
    V, d = shape
    h, w, b = case(V, d)
    logits = h @ w.T + b
    floor = logits.quantile(0.9, dim=1)  # ~10% of the classes above
    floor[0] = -math.inf                 # every class kept
    floor[1] = logits[1].max() + 1       # no class kept
    for t in (1.0, 0.7):
        for bias, fl in ((b, floor), (None, None)):
            with isa(name):
                out = ops.row_log_partition(h, w, bias, t, fl)
            want = exact(h, w, bias, t, fl)
            assert out.dtype == torch.float32 and out.shape == (h.shape[0], 2)
            fin = torch.isfinite(want)
            assert torch.equal(fin, torch.isfinite(out))
            assert (out.double() - want)[fin].abs().max() < 2e-5
            if fl is not None:
                assert out[1, 1] == -math.inf and out[0, 1] == out[0, 0]
            else:
                assert torch.equal(out[:, 0], out[:, 1])


@pytest.mark.skipif(not CPP, reason="the C++ extension did not load")
def test_batch_and_thread_invariance():
    h, w, b = case(5000, 96, B=23, seed=1)
    floor = (h @ w.T + b).quantile(0.99, dim=1)
    before = torch.get_num_threads()
    outs = {}
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for name in ISAS:
                with isa(name):
                    batch = ops.row_log_partition(h, w, b, 0.8, floor)
                    alone = torch.cat([ops.row_log_partition(h[r:r + 1].clone(), w, b, 0.8, floor[r:r + 1].clone())
                                       for r in range(h.shape[0])])
                    perm = torch.randperm(h.shape[0], generator=torch.Generator().manual_seed(threads))
                    shuffled = ops.row_log_partition(h[perm], w, b, 0.8, floor[perm])
                assert torch.equal(batch, alone)
                assert torch.equal(shuffled, batch[perm])
                assert torch.equal(outs.setdefault(name, batch), batch)  # the same at 1 and 2 threads
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_weight_dtypes(dtype):
    h, w, b = case(700, 40, dtype=dtype)
    out = ops.row_log_partition(h, w, b, 1.0, None)
    want = exact(h, w.float(), b, 1.0, None)
    assert (out.double() - want).abs().max() < 2e-5


def test_agrees_with_reference_and_empty_batch():
    h, w, b = case()
    floor = torch.full((h.shape[0],), 0.5)
    assert torch.allclose(ops.row_log_partition(h, w, b, 1.3, floor),
                          ops.row_log_partition_reference(h, w, b, 1.3, floor), rtol=0, atol=2e-5)
    assert ops.row_log_partition(h[:0], w, b, 1.0, None).shape == (0, 2)


@pytest.mark.parametrize("fn", [ops.row_log_partition, ops.row_log_partition_reference])
def test_bad_input(fn):
    h, w, b = case()
    bad_h = h.clone()
    bad_h[2, 3] = math.nan
    with pytest.raises(ValueError, match="h must be finite"):
        fn(bad_h, w, b, 1.0, None)
    with pytest.raises((ValueError, RuntimeError), match="weight has d"):
        fn(h, w[:, :5], b, 1.0, None)
    with pytest.raises((ValueError, RuntimeError), match="temperature"):
        fn(h, w, b, 0.0, None)
    with pytest.raises((ValueError, RuntimeError), match="bias"):
        fn(h, w, b[:5], 1.0, None)
    with pytest.raises((ValueError, RuntimeError), match="floor"):
        fn(h, w, b, 1.0, torch.zeros(3))
    with pytest.raises((TypeError, RuntimeError), match="h must be"):
        fn(h.long(), w, b, 1.0, None)
