"""``mass_histogram``: each row's exact softmax mass in bins of logit. Checked against float64 masses
binned by float64 logits (a class within rounding of a bin edge may sit in either neighbour, so bins
are compared after summing neighbours' differences away: the cumulative curve), bitwise for batch
and thread invariance, and for bad input."""
from __future__ import annotations

import math

import pytest
import torch

import torchaq
from torchaq import ops

from conftest import random_head

CPP = torchaq.backends.CPU_EXTENSION_LOADED


def case(V=3000, d=48, B=5, seed=0, dtype=torch.float32):
    h, w, b = random_head(V, d, B, seed, dtype)
    top = (h @ w.float().T + b).amax(dim=1) + 0.0123
    return h, w, b, top


def exact(h, w, b, t, top, width, bins):
    x = ((h.double() @ w.double().T + b.double()) - top.double()[:, None]) / t
    idx = torch.floor(-x / width).clamp(0, bins - 1).long()
    return torch.zeros(h.shape[0], bins, dtype=torch.float64).scatter_add_(1, idx, x.exp())


@pytest.mark.parametrize("fn", [ops.mass_histogram, ops.mass_histogram_reference])
@pytest.mark.parametrize("t,width,bins", [(1.0, 0.01, 500), (0.6, 0.004, 4096), (2.0, 0.5, 7)])
def test_matches_float64(fn, t, width, bins):
    h, w, b, top = case()
    got = fn(h, w, b, t, top, width, bins)
    want = exact(h, w, b, t, top, width, bins)
    assert got.dtype == torch.float64 and got.shape == (h.shape[0], bins)
    assert torch.allclose(got.sum(1), want.sum(1), rtol=1e-5, atol=0)  # the partition function over exp(top / T)
    # the cumulative curve agrees up to one class moving across an edge (rounding of its logit)
    assert (got.cumsum(1) - want.cumsum(1)).abs().max() <= 1e-5 * want.sum(1).max() + want.max()


def test_above_top_and_far_tail_are_clamped():
    h, w, b, top = case()
    got = ops.mass_histogram(h, w, b, 1.0, top - 1.0, 0.01, 50)  # some classes above top, most far below
    want = exact(h, w, b, 1.0, top - 1.0, 0.01, 50)
    assert torch.allclose(got[:, 0], want[:, 0], rtol=1e-4) and torch.allclose(got[:, -1], want[:, -1], rtol=1e-4)


@pytest.mark.skipif(not CPP, reason="the C++ extension did not load")
def test_batch_and_thread_invariance():
    h, w, b, top = case(B=9, seed=1)
    before = torch.get_num_threads()
    try:
        outs = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            batch = ops.mass_histogram(h, w, b, 0.8, top, 0.004, 4096)
            alone = torch.cat([ops.mass_histogram(h[r:r + 1].clone(), w, b, 0.8, top[r:r + 1].clone(), 0.004, 4096)
                               for r in range(h.shape[0])])
            assert torch.equal(batch, alone)
            outs.append(batch)
        assert torch.equal(outs[0], outs[1])
    finally:
        torch.set_num_threads(before)


def test_weight_dtypes_and_empty_batch():
    h, w, b, top = case(dtype=torch.bfloat16)
    got = ops.mass_histogram(h, w, b, 1.0, top, 0.01, 100)
    assert torch.allclose(got.sum(1), exact(h, w.float(), b, 1.0, top, 0.01, 100).sum(1), rtol=1e-5)
    assert ops.mass_histogram(h[:0], w, b, 1.0, top[:0], 0.01, 100).shape == (0, 100)


@pytest.mark.parametrize("fn", [ops.mass_histogram, ops.mass_histogram_reference])
def test_bad_input(fn):
    h, w, b, top = case()
    bad = h.clone()
    bad[0, 0] = math.nan
    with pytest.raises((ValueError, RuntimeError), match="h must be finite"):
        fn(bad, w, b, 1.0, top, 0.01, 10)
    with pytest.raises((ValueError, RuntimeError), match="top must be"):
        fn(h, w, b, 1.0, top[:2], 0.01, 10)
    with pytest.raises((ValueError, RuntimeError), match="top must be finite"):
        fn(h, w, b, 1.0, top.clone().fill_(math.inf), 0.01, 10)
    with pytest.raises((ValueError, RuntimeError), match="width"):
        fn(h, w, b, 1.0, top, 0.0, 10)
    with pytest.raises((ValueError, RuntimeError), match="bins"):
        fn(h, w, b, 1.0, top, 0.01, 0)
    with pytest.raises((ValueError, RuntimeError), match="temperature"):
        fn(h, w, b, -1.0, top, 0.01, 10)
