"""``row_topk``: each row's best scores, value descending then index ascending, row by row.

The C++ kernel (two-pass: block maxima, threshold, revisit) must equal the reference's stable
sort exactly, ties included, on matrices that exercise each path (fewer whole blocks than k, a
partial last block, heavy ties, infinities), give a row the same answer in any batch, and refuse
bad input.
"""
from __future__ import annotations

import math

import pytest
import torch

import torchaq  # noqa: F401  (loads the C++ kernels)
from torchaq import ops


def cases():
    g = torch.Generator().manual_seed(0)
    yield "gaussian", torch.randn(5, 30522, generator=g), 256
    yield "few blocks", torch.randn(3, 100, generator=g), 50           # 3 whole blocks < k
    yield "partial block", torch.randn(4, 32 * 40 + 7, generator=g), 33
    yield "ties", torch.randint(0, 4, (6, 5000), generator=g).float(), 300  # every value repeats
    yield "k > N", torch.randn(2, 70, generator=g), 100
    yield "k = N", torch.randn(2, 64, generator=g), 64
    yield "k = 0", torch.randn(2, 64, generator=g), 0
    yield "k = 1", torch.randn(3, 9000, generator=g), 1
    x = torch.randn(3, 2000, generator=g)
    x[0, ::3] = -math.inf
    x[1, 5] = math.inf
    x[2] = -math.inf
    yield "infinities", x, 40
    z = torch.zeros(2, 500)
    z[0, ::2] = -0.0
    yield "signed zeros", z, 100
    yield "empty batch", torch.randn(0, 100, generator=g), 5
    yield "no columns", torch.randn(3, 0, generator=g), 5


@pytest.mark.parametrize("name,scores,k", list(cases()), ids=[c[0] for c in cases()])
def test_equals_stable_sort(name, scores, k):
    values, indices = ops.row_topk(scores, k)
    ref_v, ref_i = ops.row_topk_reference(scores, k)
    assert values.shape == ref_v.shape == (scores.shape[0], min(k, scores.shape[1]))
    assert indices.dtype == torch.int64
    assert torch.equal(indices, ref_i), name
    assert torch.equal(values, ref_v), name
    assert torch.equal(scores.gather(1, indices), values)


def test_row_alone_equals_row_in_batch():
    g = torch.Generator().manual_seed(1)
    scores = torch.randn(37, 30522, generator=g).round(decimals=1)  # many ties
    values, indices = ops.row_topk(scores, 256)
    for r in (0, 17, 36):
        v, i = ops.row_topk(scores[r:r + 1].clone(), 256)
        assert torch.equal(i[0], indices[r]) and torch.equal(v[0], values[r])


def test_bad_input():
    with pytest.raises(ValueError, match="nan"):
        x = torch.randn(2, 300)
        x[1, 200] = math.nan
        ops.row_topk(x, 5)
    with pytest.raises(ValueError, match="k must be >= 0"):
        ops.row_topk(torch.randn(2, 300), -1)
    with pytest.raises(ValueError, match="scores must be"):
        ops.row_topk(torch.randn(300), 5)
    with pytest.raises(TypeError, match="scores must be a float32"):
        ops.row_topk(torch.randn(2, 300, dtype=torch.float64), 5)
