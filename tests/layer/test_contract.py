"""What a user gets from bad or unusual input: errors that name the argument, no silent reshapes,
fitted-ness that torch.compile and meta tensors can read, float32 codebooks under any cast."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import torchaq

V, D = 600, 16


@pytest.fixture(scope="module")
def _fitted():
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(V, D, generator=g)
    bias = 0.1 * torch.randn(V, generator=g)
    return torchaq.QuantizedSoftmax(weight, bias, num_subspaces=8, progress=False, fit_iters=1)


@pytest.fixture
def layer(_fitted):
    return copy.deepcopy(_fitted)


def _h(n=6, seed=1):
    return torch.randn(n, D, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(num_subspaces=0), r"num_subspaces must be an integer in \[1, d=16\]"),
        (dict(num_subspaces=17), "num_subspaces"),
        (dict(num_subspaces=True), "num_subspaces"),
        (dict(bits=4.0), "bits must be 4 or 8"),
        (dict(bits=True), "bits must be 4 or 8"),
        (dict(seed=None), "seed must be an integer"),
        (dict(bias=torch.arange(V)), "bias must be a floating-point"),
        (dict(bias=torch.full((V,), float("nan"))), "bias contains NaN"),
        (dict(bias=torch.full((V,), float("inf"))), "bias contains NaN or Inf"),
        (dict(candidates=0), "candidates"),
        (dict(candidates=2.5), "candidates"),
    ],
)
def test_constructor_errors_name_the_argument(kwargs, match):
    bias = kwargs.pop("bias", None)
    # values are checked when the layer fits (a fit=False skeleton may hold torch.empty garbage
    # until load_state_dict, which checks them then: tests/layer/test_construction.py)
    fit = None if "contains" in match else False
    with pytest.raises(ValueError, match=match):
        torchaq.QuantizedSoftmax(torch.randn(V, D), bias, fit=fit, **kwargs)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda l, h: l.sample(h, temperature=True), "temperature"),
        (lambda l, h: l.sample(h, top_p=True), "top_p"),
        (lambda l, h: l.sample(h, temperature=float("inf")), "temperature"),
        (lambda l, h: l.topk(h, k=True), "k must be an integer"),
        (lambda l, h: l.topk(h, k=2.0), "k must be an integer"),
        (lambda l, h: l.topk(h, k=5, candidates=np.int64(3)), "candidates=3 must be >= k=5"),
    ],
)
def test_call_errors_name_the_argument(layer, call, match):
    with pytest.raises(ValueError, match=match):
        call(layer, _h())


def test_numpy_integers_are_integers(layer):
    h = _h()
    v_np, i_np = layer.topk(h, k=np.int64(5), candidates=np.int32(64))
    v, i = layer.topk(h, k=5, candidates=64)
    assert torch.equal(i_np, i) and torch.equal(v_np, v)
    assert layer.sample(h, top_k=np.int16(3), generator=torch.Generator().manual_seed(0)).shape == (6,)
    q = torchaq.AnisotropicPQ(np.int64(D), np.int64(4), bits=np.int64(4), seed=np.int64(3))
    assert (q.dim, q.num_subspaces, q.bits, q.seed) == (D, 4, 4, 3) and type(q.dim) is int


def test_fit_on_a_parameter_builds_no_autograd_state():
    weight = torch.nn.Parameter(torch.randn(V, D))
    pq = torchaq.AnisotropicPQ(D, 4, threshold=None).fit(weight, iters=1, progress=False)
    assert not pq.codebooks.requires_grad and pq.codebooks.grad_fn is None
    assert not pq.encode(weight).requires_grad


def test_codebooks_stay_float32_under_dtype_casts(layer):
    reference = layer.quantizer.codebooks.clone()
    for cast in (lambda m: m.to(torch.bfloat16), lambda m: m.half(), lambda m: m.double()):
        moved = cast(copy.deepcopy(layer))
        assert moved.quantizer.codebooks.dtype == torch.float32
        assert torch.equal(moved.quantizer.codebooks, reference)


def test_fitted_flag_round_trips_and_compile_fullgraph(layer):
    assert layer.quantizer.fitted is True
    fresh = torchaq.QuantizedSoftmax(torch.zeros(V, D), torch.zeros(V), num_subspaces=8, fit=False)
    assert fresh.quantizer.fitted is False
    with pytest.raises(RuntimeError, match="not fitted"):
        fresh.topk(_h())
    fresh.load_state_dict(layer.state_dict())
    assert fresh.quantizer.fitted is True
    # a state dict written when `fitted` was a buffer still loads
    old = layer.quantizer.state_dict()
    old["fitted"] = torch.tensor(True)
    pq = torchaq.AnisotropicPQ(D, 8)
    pq.load_state_dict(old)
    assert pq.fitted is True
    h = _h()
    compiled = torch.compile(lambda x: layer.topk(x, k=5), backend="aot_eager", fullgraph=True)
    for a, b in zip(compiled(h), layer.topk(h, k=5)):
        assert torch.equal(a, b)


def test_meta_device_copy_traces_without_data(layer):
    meta = copy.deepcopy(layer).to("meta")
    assert "fitted=True" in repr(meta.quantizer) and "V=600" in repr(meta)
    values, idx = meta.topk(_h().to("meta"), k=5)
    assert values.device.type == idx.device.type == "meta" and values.shape == idx.shape == (6, 5)


def test_refresher_validates_hidden_states(layer):
    refresher = torchaq.CodebookRefresher(layer, every=None, refit_every=2, max_queries=40)
    with pytest.raises(ValueError, match="hidden must have last dimension d=16"):
        refresher.step(torch.randn(4, 8))  # 32 numbers: would have become 2 rows of 16
    with pytest.raises(ValueError, match="hidden contains NaN"):
        refresher.step(torch.full((3, D), float("nan")))
    assert refresher._recent is None and refresher.num_steps == 0  # nothing bad was stored or counted
    refresher.step(torch.randn(2, 5, D))  # leading dims are fine
    assert refresher._recent.shape == (10, D)
    with pytest.raises(ValueError, match="max_queries"):
        torchaq.CodebookRefresher(layer, max_queries=np.float64(30))
    assert torchaq.CodebookRefresher(layer, every=np.int64(3)).every == 3
