"""The sampled loss's tail weight gradient from a row subsample (torchaq.training.tail_grad)."""
import copy

import pytest
import torch
import torch.nn.functional as F

import torchaq
from conftest import clustered_softmax_data
from torchaq.training import sampled_softmax
from torchaq.training.tail_grad import (check_tail_grad_rows, default_tail_rows, exact_sets,
                                       tail_weight_gradient)

V, D = 500, 16


@pytest.fixture(scope="module")
def _fitted_layer():
    weight, bias, _, _ = clustered_softmax_data(V, D, 0, 24)
    return torchaq.QuantizedSoftmax(weight, bias, num_subspaces=8, progress=False)


@pytest.fixture
def layer(_fitted_layer):
    return copy.deepcopy(_fitted_layer)


def _tail_reference(h, target, weight, bias, exact, row_weight):
    """sum_b g_b sum_{c not in E_b} p_bc h_b (and the bias's), float64, densely."""
    h, weight, bias, g = h.double(), weight.double(), bias.double(), row_weight.double()
    p = torch.softmax(h @ weight.T + bias, dim=1)
    for b in range(h.shape[0]):
        ids = exact[b][exact[b] >= 0]
        p[b, ids] = 0.0
    p = p * g.unsqueeze(1)
    return p.T @ h, p.sum(0)


def _rows(seed, batch=12):
    weight, bias, h, target = clustered_softmax_data(V, D, seed, batch)
    g = torch.Generator().manual_seed(seed)
    hard = torch.stack([torch.randperm(V, generator=g)[:5] for _ in range(batch)])
    hard[0, 1] = target[0]  # a target inside its hard set: counted once
    return weight, bias, h, target, exact_sets(target, hard)


def test_all_rows_give_the_exact_tail_in_float64():
    weight, bias, h, target, exact = _rows(1)
    has_target = (exact[:, :-1] == target.unsqueeze(1)).any(1)
    assert has_target[0] and torch.equal(exact[:, -1], torch.where(has_target, -1, target))
    weight, bias = weight.clone().requires_grad_(), bias.clone().requires_grad_()
    row_weight = torch.rand(h.shape[0], generator=torch.Generator().manual_seed(2)) + 0.5
    hh = h.clone().requires_grad_()
    zeros = tail_weight_gradient(hh, target, weight, bias, exact, num_rows=100)
    assert torch.equal(zeros, torch.zeros(h.shape[0]))
    (zeros * row_weight).sum().backward()
    ref_w, ref_b = _tail_reference(h, target, weight.detach(), bias.detach(), exact, row_weight)
    # float32 against float64: the exact sets' terms are subtracted from the full gradient (rounding of its size)
    atol = 1e-6 * float(ref_w.abs().max())
    torch.testing.assert_close(weight.grad.double(), ref_w, rtol=1e-4, atol=atol)
    torch.testing.assert_close(bias.grad.double(), ref_b, rtol=1e-4, atol=1e-6 * float(ref_b.abs().max()))
    assert hh.grad is None  # h gets its gradient from the draws, never from the tail


def test_row_subsample_is_unbiased():
    weight, bias, h, target, exact = _rows(3)
    ref_w, ref_b = _tail_reference(h, target, weight, bias, exact, torch.ones(h.shape[0]))
    weight = weight.clone().requires_grad_()
    total = torch.zeros_like(weight, dtype=torch.float64)
    trials = 600
    for seed in range(trials):
        weight.grad = None
        tail_weight_gradient(h, target, weight, bias, exact, num_rows=3,
                             generator=torch.Generator().manual_seed(seed)).sum().backward()
        total += weight.grad.double()
    mean = total / trials
    # one draw of 3 of 12 rows is far off; the mean of 600 is within a few percent
    one = weight.grad.double()
    assert (one - ref_w).norm() > 0.3 * ref_w.norm()
    assert (mean - ref_w).norm() < 0.06 * ref_w.norm()


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("z_loss", [0.0, 0.05])
def test_layer_loss_with_every_row_has_the_full_softmax_weight_gradient(layer, reduction, z_loss):
    """With the uniform sampler the exact set is the target alone: head (the target's -(1 - p_hat_t) h)
    plus the tail of every row is the full softmax's weight gradient, p_t replaced by the estimate's
    p_hat_t = exp(-loss_b)."""
    g = torch.Generator().manual_seed(5)
    h = torch.randn(10, D, generator=g) * 2
    t = torch.randint(0, V, (10,), generator=g)
    t[3] = -100  # an ignored row: no gradient, out of the mean
    kept = t != -100
    loss = layer.sampled_softmax_loss(h, t, num_sampled=200, sampler="uniform", reduction=reduction, z_loss=z_loss,
                                      tail_grad_rows=10, generator=torch.Generator().manual_seed(0))
    per_row = layer.sampled_softmax_loss(h, t, num_sampled=200, sampler="uniform", reduction="none",
                                         tail_grad_rows=10, generator=torch.Generator().manual_seed(0)).detach()
    loss.backward()
    hk, tk = h[kept].double(), t[kept]
    w, b = layer.weight.detach().double(), layer.bias.detach().double()
    logits = hk @ w.T + b
    p = torch.softmax(logits, 1)
    log_z_hat = per_row[kept].double() + logits.gather(1, tk.unsqueeze(1)).squeeze(1)
    p_hat_t = torch.exp(-per_row[kept].double())
    g_row = torch.full((len(tk),), 1.0 / len(tk) if reduction == "mean" else 1.0, dtype=torch.float64)
    scale = g_row * (1 + 2 * z_loss * log_z_hat)  # d loss / d log Z of each row
    dlogits = p * scale.unsqueeze(1)  # the tail and the target's p_t ...
    rows = torch.arange(len(tk))
    dlogits[rows, tk] = scale * p_hat_t - g_row  # ... the target's from the estimate (head), minus its one-hot
    torch.testing.assert_close(layer.weight.grad.double(), dlogits.T @ hk, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(layer.bias.grad.double(), dlogits.sum(0), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kwargs", [dict(), dict(proposal="candidates"), dict(proposal="candidates", share_draws=False),
                                    dict(sampler="unigram", class_counts=torch.arange(1.0, V + 1))])
def test_loss_and_h_gradient_are_the_draws_and_every_class_gets_a_weight_gradient(layer, kwargs):
    _, _, h, target = clustered_softmax_data(V, D, 0, 24)
    out = {}
    for rows in (0, 8):
        hh = h.clone().requires_grad_()
        layer.zero_grad()
        loss = layer.sampled_softmax_loss(hh, target, num_sampled=64, tail_grad_rows=rows,
                                          generator=torch.Generator().manual_seed(1), **kwargs)
        loss.backward()
        out[rows] = loss.detach(), hh.grad, layer.weight.grad.clone()
    assert torch.equal(out[0][0], out[8][0])  # the same draws: the row subsample comes after them
    # the same gradient in h (per-row draws: their logits are a second node, so another rounding)
    torch.testing.assert_close(out[0][1], out[8][1], rtol=1e-5, atol=1e-7)
    assert 0 < int((out[0][2].abs().sum(1) > 0).sum()) < V  # the draws reach some classes
    assert bool((out[8][2].abs().sum(1) > 0).all())  # the tail reaches every class


def test_no_grad_and_compile(layer):
    _, _, h, target = clustered_softmax_data(V, D, 0, 24)
    with torch.no_grad():
        layer.sampled_softmax_loss(h, target, num_sampled=64)
    fn = lambda x, t: layer.sampled_softmax_loss(x, t, num_sampled=64, sampler="uniform",  # noqa: E731
                                                 generator=torch.Generator().manual_seed(4))
    grads = []
    for f in (fn, torch.compile(fn, backend="eager")):
        layer.zero_grad()
        f(h, target).backward()
        grads.append(layer.weight.grad.clone())
    torch.testing.assert_close(grads[1], grads[0])


def test_default_tail_rows_grow_with_the_batch():
    assert [default_tail_rows(b) for b in (1, 64, 2048, 2049, 4096, 8192)] == [64, 64, 64, 65, 128, 256]
    assert check_tail_grad_rows(None, 8192) == 256 and check_tail_grad_rows(None) is None
    assert check_tail_grad_rows(10, 8192) == 10 and check_tail_grad_rows(0, 8192) == 0


@pytest.mark.parametrize("rows, expected", [(None, 65), (7, 7)])
def test_sampled_loss_uses_the_default_tail_rows(layer, monkeypatch, rows, expected):
    seen = []
    original = sampled_softmax.tail_weight_gradient

    def recording(h, target, weight, bias, exact, num_rows, *args, **kwargs):
        seen.append(num_rows)
        return original(h, target, weight, bias, exact, num_rows, *args, **kwargs)

    monkeypatch.setattr(sampled_softmax, "tail_weight_gradient", recording)
    _, _, h, target = clustered_softmax_data(V, D, 0, 2049)  # one row over 2,048: 65 rows by default
    layer.sampled_softmax_loss(h, target, num_sampled=16, tail_grad_rows=rows).backward()
    assert seen == [expected]


@pytest.mark.parametrize("bad", [-1, 1.5, True, "8"])
def test_bad_tail_grad_rows(layer, bad):
    _, _, h, target = clustered_softmax_data(V, D, 0, 4)
    with pytest.raises(ValueError, match="tail_grad_rows"):
        layer.sampled_softmax_loss(h, target, num_sampled=16, tail_grad_rows=bad)
