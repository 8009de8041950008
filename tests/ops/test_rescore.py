"""torch.ops.torchaq.rescore_topk: the fused exact re-score + top-k against its torch reference.

Contract (torchaq/ops.py, rescore_topk): values are the float32 logits ``<h, W[c]> + bias[c]`` of
the best ``k`` candidates, best first, ties by class id; a repeated class counts once (its
repeats score -inf). The C++ kernel sums each dot product in a fixed order of its own, so its
values equal the reference's to float rounding, and every kernel set (scalar, AVX2, AVX-512)
returns bit-identical results.
"""
from __future__ import annotations

import pytest
import torch

from conftest import ISAS, isa
from torchaq import ops
from torchaq.backends import CPU_EXTENSION_LOADED


def make(batch, v, d, c, seed=0, bias=True, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(v, d, generator=g).to(dtype)
    b = torch.randn(v, generator=g) if bias else None
    h = torch.randn(batch, d, generator=g)
    cand = torch.stack([torch.randperm(v, generator=g)[:c] for _ in range(batch)])
    return h, w, b, cand


def check_against_reference(h, w, b, cand, k):
    v, i = ops.rescore_topk(h, w, b, cand, k)
    vr, ir = ops.rescore_topk_reference(h, w, b, cand, k)
    kk = min(k, cand.shape[1])
    assert v.shape == i.shape == (h.shape[0], kk) and v.dtype == torch.float32 and i.dtype == torch.int64
    torch.testing.assert_close(v, vr, rtol=1e-5, atol=1e-5)
    # values are the logits of the returned classes, sorted, and the classes are candidates
    exact = h.double() @ w.double().T + (0 if b is None else b.double())
    torch.testing.assert_close(v.double(), exact.gather(1, i), rtol=1e-5, atol=1e-4)
    assert (v[:, :-1] >= v[:, 1:]).all()
    assert (i.unsqueeze(2) == cand.unsqueeze(1)).any(2).all()
    # the same set as the reference unless two logits are within rounding of each other
    gap = (vr[:, :-1] - vr[:, 1:]).abs().min() if kk > 1 else torch.tensor(1.0)
    if gap > 1e-4:
        assert torch.equal(i, ir)
    return v, i


@pytest.mark.parametrize("batch,v,d,c,k", [(1, 500, 384, 64, 10), (7, 300, 33, 40, 40), (5, 1000, 100, 256, 1),
                                           (3, 50, 1, 20, 7), (17, 2000, 130, 100, 300)])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_reference(batch, v, d, c, k, bias):
    check_against_reference(*make(batch, v, d, c, seed=batch + d, bias=bias), k)


@pytest.mark.skipif(not CPU_EXTENSION_LOADED, reason="C++ extension not built")
@pytest.mark.parametrize("d", [5, 64, 100, 384])
def test_every_isa_identical(d):
    h, w, b, cand = make(9, 700, d, 90, seed=d)
    out = {}
    for name in ISAS:
        with isa(name):
            out[name] = ops.rescore_topk(h, w, b, cand, 12)
    for name in ISAS[1:]:
        assert torch.equal(out[name][0], out["scalar"][0]) and torch.equal(out[name][1], out["scalar"][1])


def test_ties_rank_smaller_class_first_and_repeats_count_once():
    w = torch.ones(20, 4)  # every logit equal
    h = torch.ones(2, 4)
    cand = torch.tensor([[9, 3, 17, 3, 5, 9], [0, 1, 2, 3, 4, 5]])
    for fn in (ops.rescore_topk, ops.rescore_topk_reference):
        v, i = fn(h, w, None, cand, 6)
        assert i[0, :4].tolist() == [3, 5, 9, 17] and i[1].tolist() == [0, 1, 2, 3, 4, 5]
        assert (v[0, :4] == 4).all() and (v[0, 4:] == -float("inf")).all() and (v[1] == 4).all()
        assert sorted(i[0, 4:].tolist()) == [3, 9]


def test_dtypes_and_layouts():
    h, w, b, cand = make(4, 300, 48, 30, seed=1)
    want_v, want_i = ops.rescore_topk(h, w, b, cand, 5)
    # non-contiguous weight (row stride > d), h, candidates
    wide = torch.zeros(300, 96)
    wide[:, :48] = w
    v, i = ops.rescore_topk(h.T.contiguous().T, wide[:, :48], b, cand.T.contiguous().T, 5)
    assert torch.equal(v, want_v) and torch.equal(i, want_i)
    # a column-major weight, a bf16 weight and a float64 h: computed in float32 from converted rows
    v, i = ops.rescore_topk(h, w.T.contiguous().T, b, cand, 5)
    assert torch.equal(v, want_v) and torch.equal(i, want_i)
    h16, w16 = h.double(), w.bfloat16()
    v, i = ops.rescore_topk(h16, w16, b.double(), cand, 5)
    vr, ir = ops.rescore_topk_reference(h16, w16, b.double(), cand, 5)
    torch.testing.assert_close(v, vr, rtol=1e-5, atol=1e-5)
    # empty shapes
    assert ops.rescore_topk(h[:0], w, b, cand[:0], 5)[0].shape == (0, 5)
    assert ops.rescore_topk(h, w, b, cand, 0)[1].shape == (4, 0)
    assert ops.rescore_topk(h, w, b, cand[:, :3], 5)[1].shape == (4, 3)


@pytest.mark.parametrize("fn", [ops.rescore_topk, ops.rescore_topk_reference])
def test_bad_inputs(fn):
    h, w, b, cand = make(2, 100, 8, 10)
    with pytest.raises(ValueError, match=r"h must be \(B, d\)"):
        fn(h[0], w, b, cand, 3)
    with pytest.raises(ValueError, match="h has d = 8 but weight has d = 7"):
        fn(h, w[:, :7], b, cand, 3)
    with pytest.raises(TypeError, match="floating point"):
        fn(h.long(), w, b, cand, 3)
    with pytest.raises(TypeError, match="candidates must be int64"):
        fn(h, w, b, cand.int(), 3)
    with pytest.raises(ValueError, match="candidates must be"):
        fn(h, w, b, cand[:1], 3)
    with pytest.raises(ValueError, match="bias must have shape"):
        fn(h, w, b[:5], cand, 3)
    with pytest.raises(ValueError, match="k must be >= 0"):
        fn(h, w, b, cand, -1)
    for bad in (-1, 100):
        with pytest.raises(ValueError, match=r"class ids in \[0, 100\)"):
            fn(h, w, b, cand.index_fill(1, torch.tensor([4]), bad), 3)





def test_threads_give_identical_results():
    h, w, b, cand = make(64, 3000, 96, 128, seed=5)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.rescore_topk(h, w, b, cand, 10)
        torch.set_num_threads(2)
        two = ops.rescore_topk(h, w, b, cand, 10)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])


def test_gather_rows_one_node_matches_separate_index_selects():
    from torchaq.ops.rescore import gather_rows

    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(50, 8, generator=gen, requires_grad=True)
    a = torch.randint(0, 50, (4, 3), generator=gen)
    b = torch.tensor([[7], [7], [0], [49]])
    c = torch.tensor([1, 7, 7, 30])  # repeated rows accumulate
    ra, rb, rc = gather_rows(weight, a, b, c)
    assert ra.shape == (4, 3, 8) and rb.shape == (4, 1, 8) and rc.shape == (4, 8)
    torch.testing.assert_close(rc, weight.detach()[c])
    (ra.sum() * 2 + (rb ** 2).sum() + rc[:, 0].sum()).backward()
    ours = weight.grad.clone()
    weight.grad = None
    (weight[a].sum() * 2 + (weight[b] ** 2).sum() + weight[c][:, 0].sum()).backward()
    torch.testing.assert_close(ours, weight.grad)
    weight.grad = None
    ra, rb, rc = gather_rows(weight, a, b, c)  # an unused output gets no gradient
    rb.sum().backward()
    expected = torch.zeros_like(weight).index_add_(0, b.reshape(-1), torch.ones(4, 8))
    torch.testing.assert_close(weight.grad, expected)
    with torch.no_grad():  # no autograd node without grad
        assert gather_rows(weight, a)[0].grad_fn is None
