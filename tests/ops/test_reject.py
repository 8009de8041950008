"""``reject_rounds``: the C++ kernel keeps the reference's proposals (same uniforms, same positions,
same acceptance tests), so the tokens, the done flags and the violation counts agree; the token
logits agree to float32 rounding (another dot-product order). Bad input names the argument."""
from __future__ import annotations

import pytest
import torch

from torchaq import ops

from conftest import rejection_plan


@pytest.mark.parametrize("seed,kwargs", [(0, {}), (1, dict(temperature=0.3)), (2, dict(floors=False, head=1)),
                                         (3, dict(rows=5, num_classes=2000, block=256, draws=300))])
@pytest.mark.parametrize("lut_tail", [False, True])
def test_equals_reference(seed, kwargs, lut_tail):
    args = rejection_plan(seed, **kwargs)
    for proposals, rounds in ((4, 3), (1, 1), (32, 6)):
        got = ops.reject_rounds(*args, proposals, rounds, lut_tail)
        want = ops.reject_rounds_reference(*args, proposals, rounds, lut_tail)
        for a, b in zip(got[:2], want[:2]):
            assert torch.equal(a, b)
        assert torch.equal(got[3], want[3])
        assert torch.allclose(got[2], want[2], rtol=1e-5, atol=1e-5)
        # a kept tail token is a class above the floor; head tokens are head classes
        h, w, b, logits, classes, num_tail, top, floor = args[:8]
        done, tokens = got[0], got[1]
        rows = args[10]
        assert bool((tokens[done] >= 0).all()) and bool((tokens[done] < w.shape[0]).all())
        exact = (h[rows] * w[tokens]).sum(1) + b[tokens]
        assert bool((exact[done] >= floor[rows][done] - 1e-5).all())


def test_a_draw_is_the_same_alone():
    args = list(rejection_plan(4, draws=30))
    batch = ops.reject_rounds(*args, 8, 4, False)
    rows, keys = args[10], args[11]
    for p in range(rows.shape[0]):
        args[10], args[11] = rows[p:p + 1].clone(), keys[p:p + 1].clone()
        alone = ops.reject_rounds(*args, 8, 4, False)
        assert all(torch.equal(a, b[p:p + 1]) for a, b in zip(alone, batch))


@pytest.mark.parametrize("fn", [ops.reject_rounds, ops.reject_rounds_reference])
def test_bad_input(fn):
    args = list(rejection_plan())
    with pytest.raises((ValueError, RuntimeError), match="rows must be in"):
        fn(*args[:10], torch.full_like(args[10], 99), *args[11:], 4, 2, False)
    with pytest.raises((ValueError, RuntimeError), match="keys"):
        fn(*args[:11], args[11][:2], args[12], 4, 2, False)
    with pytest.raises((ValueError, RuntimeError), match="floor"):
        fn(*args[:7], args[7][:1], *args[8:], 4, 2, False)
    with pytest.raises((ValueError, RuntimeError), match="top"):
        fn(*args[:6], args[6][:1], *args[7:], 4, 2, False)
    with pytest.raises((ValueError, RuntimeError), match="num_tail"):
        fn(*args[:5], args[1].shape[0] + 1, *args[6:], 4, 2, False)
    with pytest.raises((ValueError, RuntimeError), match="proposals"):
        fn(*args, 0, 2, False)
