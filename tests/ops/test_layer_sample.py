"""``torchaq::tail_bounds_`` and ``torchaq::layer_sample``: the kernels against their references, the
one-op sampler against its steps, and ``QuantizedSoftmax.sample`` on the paths it takes."""
import math

import pytest
import torch

import torchaq
from torchaq import ops
from torchaq.layer import exact_sampling as es
from torchaq.ops.layer_sample import layer_sample_reference
from torchaq.ops.tail_bounds import tail_bounds_reference

CPP = torchaq.backends.CPU_EXTENSION_LOADED


def _bounds_case(seed=0, rows=4, n=300, width=384, d=12, head=9):
    g = torch.Generator().manual_seed(seed)
    buf = torch.randn(rows, width, generator=g)
    rho = torch.rand(n, generator=g)
    h = torch.randn(rows, d, generator=g)
    step = torch.rand(rows, generator=g)
    classes = torch.stack([torch.randperm(n, generator=g)[:head] for _ in range(rows)])
    return buf, rho, h, step, classes


@pytest.mark.parametrize("sigmas, rounding", [(4.75, 2.0), (0.0, 0.0), (3.0, 0.5)])
def test_tail_bounds_equals_the_formula_in_place_on_a_column_slice(sigmas, rounding):
    buf, rho, h, step, head = _bounds_case()
    n = rho.numel()
    want = buf[:, :n].double() + (sigmas * h.double().norm(dim=1, keepdim=True)) * rho.double() + rounding * step.double()[:, None]
    want.scatter_(1, head, -math.inf)
    tail = buf.clone()
    upper_max = ops.tail_bounds_(tail[:, :n], rho, h, sigmas, step, rounding, head)
    torch.testing.assert_close(tail[:, :n].double(), want, rtol=1e-6, atol=1e-5)
    assert torch.equal(tail[:, n:], buf[:, n:])  # the columns after the slice are not touched
    assert torch.equal(upper_max, tail[:, :n].amax(dim=1))
    ref = buf.clone()
    torch.testing.assert_close(tail_bounds_reference(ref[:, :n], rho, h, sigmas, step, rounding, head), upper_max)
    torch.testing.assert_close(ref, tail)


def test_tail_bounds_edge_rows_and_bad_arguments():
    buf, rho, h, step, head = _bounds_case(rows=2, n=9, width=9, head=9)
    assert torch.equal(ops.tail_bounds_(buf, rho, h, 1.0, step, 1.0, head), torch.full((2,), -math.inf))  # all head
    buf[0, [i for i in range(9) if i not in head[0, :2].tolist()][0]] = math.nan
    assert math.isnan(float(ops.tail_bounds_(buf, rho, h, 1.0, step, 1.0, head[:, :2])[0]))  # nan spreads, as amax
    empty = torch.empty(0, 9)
    assert ops.tail_bounds_(empty, rho, h[:0], 1.0, step[:0], 1.0, head[:0]).shape == (0,)
    with pytest.raises(ValueError, match="head must hold class ids"):
        ops.tail_bounds_(buf, rho, h, 1.0, step, 1.0, head + 9)
    with pytest.raises(ValueError, match="error_scales must be"):
        ops.tail_bounds_(buf, rho[:5], h, 1.0, step, 1.0, head)
    with pytest.raises(ValueError, match="step must be"):
        ops.tail_bounds_(buf, rho, h, 1.0, step.double(), 1.0, head)
    with pytest.raises(ValueError, match="sigmas and rounding"):
        ops.tail_bounds_(buf, rho, h, -1.0, step, 1.0, head)


@pytest.fixture(scope="module")
def layer_and_rows():
    g = torch.Generator().manual_seed(3)
    V, D = 1200, 16
    centres = torch.randn(10, D, generator=g)
    weight = centres[torch.randint(0, 10, (V,), generator=g)] + 0.6 * torch.randn(V, D, generator=g)
    weight[7] *= 30  # a row unlike the rest: the side list
    bias = 0.1 * torch.randn(V, generator=g)
    layer = torchaq.QuantizedSoftmax(weight, bias, num_subspaces=8, progress=False, fit_iters=1).eval()
    h = 0.6 * (weight[torch.randint(0, V, (6,), generator=g)] + 0.5 * torch.randn(6, D, generator=g))
    return layer, h


def _op_args(layer, h, seeds, head=40, temperature=1.0, rounds=es.MAX_ROUNDS):
    q = layer.quantizer
    factor = es.rounding_factor(q.num_subspaces, es.ERROR_SIGMAS)
    return (h, q.pad(h), q.codebooks, layer.packed_codes, layer.num_classes, layer.scan_bias(), layer.weight.detach(),
            layer.bias.detach(), layer.side_rows, layer.error_scales, seeds, head, es.ERROR_SIGMAS, factor,
            temperature, es.WEIGHT_RANGE, es.BLOCK, es.PROPOSALS, rounds)


@pytest.mark.parametrize("temperature, rounds", [(1.0, es.MAX_ROUNDS), (0.5, es.MAX_ROUNDS), (1.0, 0)])
def test_layer_sample_equals_its_steps(layer_and_rows, temperature, rounds):
    """On CPU the kernel calls the steps' own kernels: tokens, logits and done equal the composition bit for bit."""
    layer, h = layer_and_rows
    assert layer.side_rows.numel() >= 1
    args = _op_args(layer, h, torch.arange(100, 106), temperature=temperature, rounds=rounds)
    got = torch.ops.torchaq.layer_sample(*args)
    want = layer_sample_reference(*args)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    assert bool(got[2].all()) == (rounds > 0)  # no round: nothing kept, every row left to the caller
    # a row alone gets what it gets in the batch
    alone = torch.ops.torchaq.layer_sample(*_op_args(layer, h[2:3], torch.arange(102, 103), temperature=temperature,
                                                     rounds=rounds))
    assert torch.equal(alone[0], got[0][2:3]) and torch.equal(alone[1], got[1][2:3])


def test_layer_sample_flags_risky_rows_and_refuses_an_overflowing_temperature(layer_and_rows):
    layer, h = layer_and_rows
    # a tiny temperature puts some tail bound more than WEIGHT_RANGE * T above the best exact logit:
    # those rows are left to the general path (which re-scores those classes first)
    args = list(_op_args(layer, h, torch.arange(6), temperature=1e-4))
    done = torch.ops.torchaq.layer_sample(*args)[2]
    assert not bool(done.all())
    args[14] = 1e-38
    with pytest.raises(ValueError, match="temperature=1e-38 is so small"):
        torch.ops.torchaq.layer_sample(*args)
    with pytest.raises(ValueError, match="seeds must be"):
        torch.ops.torchaq.layer_sample(*_op_args(layer, h, torch.arange(6))[:10], torch.zeros(5, dtype=torch.long),
                                       *_op_args(layer, h, torch.arange(6))[11:])


@pytest.mark.parametrize("temperature", [1.0, 0.7, 1e-4])
def test_sample_takes_the_one_op_path_and_gives_the_general_paths_tokens(layer_and_rows, temperature, monkeypatch):
    """``sample`` without truncation calls ``layer_sample``; the step-by-step path (what it falls back to,
    and what ``sample_many`` runs) draws the same tokens with the same seeds; the logprobs are exact."""
    layer, h = layer_and_rows
    seeds = torch.arange(500, 506)
    calls = []
    real = type(layer).one_op_sample

    def spy(self, *a, **k):
        out = real(self, *a, **k)
        calls.append(bool(out[2].all()))
        return out

    monkeypatch.setattr(type(layer), "one_op_sample", spy)
    fast = layer.sample(h, seeds=seeds, temperature=temperature, return_logprobs=True, candidates=16)
    assert len(calls) == 1 and (calls[0] or temperature != 1.0)  # at 1e-4 some rows finish on the general path
    assert temperature != 1e-4 or not calls[0]
    for i in range(h.shape[0]):
        tok, _ = es.sample_many(layer, h[i], seeds[i:i + 1], temperature=temperature, candidates=16)
        assert int(tok[0]) == int(fast.tokens[i])
    exact = layer.token_logprobs(h, fast.tokens, temperature=temperature)
    torch.testing.assert_close(fast.logprobs, exact, rtol=0, atol=1e-4 / temperature)
    assert torch.equal(fast.truncated_logprobs, fast.logprobs)
    with pytest.raises(ValueError, match="h contains NaN or Inf"):
        layer.sample(h.clone().fill_(math.nan))


def test_sample_records_no_autograd_history_on_any_path(layer_and_rows):
    """Under grad mode the one-op path runs on detached parameters without a no_grad context; every
    path (one op, ``h`` that requires grad, truncations, logprobs, rows left to the general path)
    returns tensors without history, the same tokens as under ``no_grad``, and no parameter grad."""
    layer, h = layer_and_rows
    seeds = torch.arange(6)
    cases = [dict(), dict(top_k=5), dict(top_p=0.9), dict(return_logprobs=True), dict(temperature=1e-4)]
    for kw in cases:
        with torch.no_grad():
            want = layer.sample(h, seeds=seeds, **kw)
        for x in (h, h.clone().requires_grad_()):
            got = layer.sample(x, seeds=seeds, **kw)
            for a, b in zip(want if isinstance(want, tuple) else (want,), got if isinstance(got, tuple) else (got,)):
                assert torch.equal(a, b) and not b.requires_grad and b.grad_fn is None, kw
    assert layer.weight.grad is None
