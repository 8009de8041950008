"""``inverse_cdf``: the C++ kernel returns the reference's positions exactly, and both are the inverse
CDF of the block weights (checked against a float64 cumulative sum over the whole row)."""
from __future__ import annotations

import pytest
import torch

from torchaq import ops


def case(R=3, nb=40, m=256, P=7, n=300, seed=0, zeros=True):
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(R, nb, m, generator=g) ** 8  # skewed weights, many tiny
    if zeros:
        w[0, 3] = 0.0             # an empty block
        w[1, :, 100:] = 0.0       # empty tails inside blocks
        w[2, -5:] = 0.0           # trailing empty blocks
    cum = w.sum(dim=2).cumsum(dim=1, dtype=torch.float64)
    rows = torch.randint(0, R, (P,), generator=g)
    u = torch.rand(P, n, generator=g, dtype=torch.float64)
    return w, cum, rows, u


@pytest.mark.parametrize("shape", [(3, 40, 256, 7, 300), (1, 1, 1, 2, 5), (2, 3, 7, 1, 1000), (4, 120, 256, 64, 32)])
def test_equals_reference_and_is_the_inverse_cdf(shape):
    w, cum, rows, u = case(*shape, zeros=shape[1] >= 40 and shape[2] >= 128)
    pos = ops.inverse_cdf(w, cum, rows, u)
    assert torch.equal(pos, ops.inverse_cdf_reference(w, cum, rows, u))
    flat = w.reshape(w.shape[0], -1).double()
    assert bool((flat[rows.unsqueeze(1), pos] > 0).all()), "a zero-weight position was drawn"
    # the position brackets u * total in the whole-row cumulative sum (up to float64 rounding)
    full = flat.cumsum(dim=1)[rows]
    target = u * full[:, -1:]
    hi, lo = full.gather(1, pos), torch.where(pos > 0, full.gather(1, (pos - 1).clamp(min=0)), 0.0)
    assert bool((lo <= target * (1 + 1e-12) + 1e-300).all()) and bool((target <= hi * (1 + 1e-12)).all())


def test_extreme_uniforms_and_empty():
    w, cum, rows, _ = case(zeros=False)
    u = torch.tensor([[1e-300, 0.5, 1 - 2 ** -53]] * rows.shape[0], dtype=torch.float64)
    pos = ops.inverse_cdf(w, cum, rows, u)
    assert torch.equal(pos, ops.inverse_cdf_reference(w, cum, rows, u))
    assert ops.inverse_cdf(w, cum, rows[:0], u[:0]).shape == (0, 3)


@pytest.mark.parametrize("fn", [ops.inverse_cdf, ops.inverse_cdf_reference])
def test_bad_input(fn):
    w, cum, rows, u = case()
    with pytest.raises((TypeError, RuntimeError), match="weights"):
        fn(w.double(), cum, rows, u)
    with pytest.raises((TypeError, RuntimeError), match="cum"):
        fn(w, cum.float(), rows, u)
    with pytest.raises((TypeError, RuntimeError), match="rows"):
        fn(w, cum, rows.int(), u)
    with pytest.raises((TypeError, RuntimeError), match="u must"):
        fn(w, cum, rows, u[:2])
    with pytest.raises((ValueError, RuntimeError), match="rows must be in"):
        fn(w, cum, torch.full_like(rows, 3), u)
