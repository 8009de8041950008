"""``proposal_weights_``: the C++ kernel's block weights, written over the bounds, and their cumulative
sums equal the reference's to float32 rounding (another vectorised exp, another summation order),
with the layout, the floor, the padding and extreme exponents exactly where the reference puts them;
a wider buffer only adds empty blocks."""
from __future__ import annotations

import math

import pytest
import torch

from torchaq import ops

from conftest import ISAS, isa


def case(B=4, N=1000, H=37, seed=0):
    g = torch.Generator().manual_seed(seed)
    upper = 3 * torch.randn(B, N, generator=g)
    logits = (3 * torch.randn(B, H, generator=g)).sort(dim=1, descending=True).values
    upper[:, ::7] = -math.inf   # classes that are not proposed (the head's own)
    floor = torch.full((B,), -math.inf)
    floor[1] = 1.0
    top = torch.maximum(logits[:, 0], upper.amax(dim=1))
    top[2] += 30.0              # every weight of row 2 tiny (exponents below -30 / T)
    return upper, logits, floor, top


def in_place(fn, upper, logits, floor, top, t, block, extra=0):
    """``fn`` (the op or its reference) on a buffer holding ``upper``, ``extra`` blocks wider than needed."""
    width = ops.proposal_width(upper.shape[1], logits.shape[1], block) + extra * block
    buf = torch.full((upper.shape[0], width), 7.0)  # garbage past the bounds: the op overwrites it
    buf[:, :upper.shape[1]] = upper
    cum = fn(buf, upper.shape[1], logits, floor, top, t, block)
    return buf.view(upper.shape[0], -1, block), cum


@pytest.mark.parametrize("name", ISAS)
@pytest.mark.parametrize("t,block,extra", [(1.0, 256, 0), (0.7, 64, 2), (2.5, 5, 0)])
def test_matches_reference(name, t, block, extra):
    upper, logits, floor, top = case()
    with isa(name):
        w, cum = in_place(ops.proposal_weights_, upper, logits, floor, top, t, block, extra)
        fw, fcum = ops.proposal_weights(upper, logits, floor, top, t, block)
    rw, rcum = in_place(ops.proposal_weights_reference, upper, logits, floor, top, t, block, extra)
    assert w.shape == rw.shape and cum.shape == rcum.shape and cum.dtype == torch.float64
    assert torch.equal(w == 0, rw == 0)  # the same zeros: floor, -inf bounds, padding
    assert torch.allclose(w, rw, rtol=2e-6, atol=1e-30)
    assert torch.allclose(cum, rcum, rtol=1e-5, atol=0)
    # layout: the tail first, padded to a block, then the head, then empty blocks
    N, H = upper.shape[1], logits.shape[1]
    span = N + (-N % block)
    flat = w.reshape(w.shape[0], -1)
    assert bool((flat[:, N:span] == 0).all()) and bool((flat[:, span + H:] == 0).all())
    assert torch.allclose(flat[0, span:span + H], ((logits[0] - top[0]) / t).exp(), rtol=2e-6)
    assert torch.allclose(flat[0, :N], ((upper[0] - top[0]) / t).exp(), rtol=2e-6)
    # the functional form (a fresh buffer of the narrowest width) gives the same weights
    assert torch.equal(fw.reshape(4, -1), flat[:, :fw[0].numel()]) and torch.equal(fcum, cum[:, :fcum.shape[1]])


def test_a_row_is_the_same_alone():
    upper, logits, floor, top = case(B=6, seed=1)
    w, cum = ops.proposal_weights(upper, logits, floor, top, 0.9, 256)
    for r in range(6):
        wr, cr = ops.proposal_weights(upper[r:r + 1].clone(), logits[r:r + 1].clone(), floor[r:r + 1].clone(),
                                      top[r:r + 1].clone(), 0.9, 256)
        assert torch.equal(wr[0], w[r]) and torch.equal(cr[0], cum[r])


@pytest.mark.parametrize("fn", [ops.proposal_weights_, ops.proposal_weights_reference])
def test_bad_input(fn):
    upper, logits, floor, top = case()
    buf = torch.zeros(4, ops.proposal_width(upper.shape[1], logits.shape[1], 256))
    N = upper.shape[1]
    with pytest.raises((ValueError, RuntimeError), match="weights"):
        fn(buf.double(), N, logits, floor, top, 1.0, 256)
    with pytest.raises((ValueError, RuntimeError), match="weights"):
        fn(buf[:, :-256], N, logits, floor, top, 1.0, 256)  # no room for the head
    with pytest.raises((ValueError, RuntimeError), match="weights"):
        fn(buf[:, :-1], N, logits, floor, top, 1.0, 256)  # not a multiple of block
    with pytest.raises((ValueError, RuntimeError), match="weights"):
        fn(torch.zeros(buf.shape[1], 4).T, N, logits, floor, top, 1.0, 256)  # not contiguous
    with pytest.raises((ValueError, RuntimeError), match="logits"):
        fn(buf, N, logits[:2], floor, top, 1.0, 256)
    with pytest.raises((ValueError, RuntimeError), match="floor"):
        fn(buf, N, logits, floor[:1], top, 1.0, 256)
    with pytest.raises((ValueError, RuntimeError), match="top"):
        fn(buf, N, logits, floor, top.double(), 1.0, 256)
    with pytest.raises((ValueError, RuntimeError), match="temperature"):
        fn(buf, N, logits, floor, top, 0.0, 256)
    with pytest.raises((ValueError, RuntimeError), match="block"):
        fn(buf, N, logits, floor, top, 1.0, 0)
