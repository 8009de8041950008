"""The whole-LUT mixture proposal with the LUT-sum control variate (torchaq.lut_proposal)."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

import torchaq
from conftest import clustered_softmax_data
from torchaq import ops
from torchaq.training import lut_proposal

V, D = 500, 16


def _data(seed=0, batch=24):
    return clustered_softmax_data(V, D, seed, batch)


@pytest.fixture(scope="module")
def _fitted_layer():
    weight, bias, _, _ = _data()
    # 8 subspaces of 2 dims, 4 bits: a code coarse enough that the sampled quantization error is not tiny
    return torchaq.QuantizedSoftmax(weight, bias, num_subspaces=8, progress=False, fit_iters=1)


@pytest.fixture
def layer(_fitted_layer):
    return copy.deepcopy(_fitted_layer)


def test_codes_and_lut_logits_match_the_scan(layer):
    _, _, h, _ = _data(1, batch=5)
    codes = ops.unpack_codes(layer.packed_codes, layer.quantizer.num_subspaces, layer.quantizer.bits, V)
    classes = torch.tensor([0, 7, 63, 64, 499, 255])
    assert torch.equal(lut_proposal.codes_of(layer, classes), codes[classes])
    scores = ops.lut_score(layer.quantizer.lut(h), layer.packed_codes, V, layer.scan_bias())
    torch.testing.assert_close(lut_proposal.lut_logits(layer, h, classes), scores[:, classes], rtol=1e-5, atol=1e-5)


def test_lut_logits_match_the_scan_with_additive_codes():
    weight, bias, h, _ = _data(1, batch=5)
    layer = torchaq.QuantizedSoftmax(weight, bias, num_subspaces=4, quantizer="aq", progress=False, fit_iters=1)
    scores = ops.lut_score(layer.quantizer.lut(h), layer.packed_codes, V, layer.scan_bias())
    torch.testing.assert_close(lut_proposal.lut_logits(layer, h, torch.arange(V)), scores, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("floor", ["uniform", "zipf"])
def test_mixture_matches_dense_reference_over_chunks(layer, monkeypatch, floor):
    """S_b and Q from the chunked pass (several chunks forced) equal a dense (B, V) computation."""
    monkeypatch.setattr(lut_proposal, "_CHUNK_ELEMENTS", 5 * 64)  # batch 5: one 64-class block per chunk
    _, _, h, target = _data(2, batch=5)
    lut = layer.quantizer.lut(h)
    scores = ops.lut_score(lut, layer.packed_codes, V, layer.scan_bias()).double()
    hard = torch.topk(scores, 3, dim=1).indices
    excluded = torch.cat([hard, target.unsqueeze(1)], 1)
    excluded[0, -1] = hard[0, 0]  # a repeated class is dropped once
    excluded[1, -1] = -1  # padding
    shift = scores.amax(1) - 1.0
    row_weight = torch.rand(5, generator=torch.Generator().manual_seed(0)) + 0.5
    base = None
    if floor == "zipf":
        base = 1.0 / torch.arange(1, V + 1).double()
        base = base / base.sum()
    mix = lut_proposal.LutMixture(layer, lut, excluded, shift.float(), row_weight.float(), 0.7, base)
    keep = torch.ones(5, V, dtype=torch.bool)
    for b in range(5):
        for c in excluded[b].tolist():
            if c >= 0:
                keep[b, c] = False
    e = torch.where(keep, torch.exp(scores), 0.0)
    torch.testing.assert_close(mix.log_rest, torch.log(e.sum(1)), rtol=1e-5, atol=1e-5)
    r = (row_weight.double().unsqueeze(1) * torch.exp(scores - shift.unsqueeze(1)) * keep).sum(0)
    u = torch.full((V,), 1.0 / V, dtype=torch.float64) if base is None else base
    torch.testing.assert_close(mix.proposal, 0.7 * r / r.sum() + 0.3 * u, rtol=1e-4, atol=1e-9)
    # inclusion probabilities of m draws with replacement: pi = 1 - (1 - Q)^m
    classes, log_pi = mix.draws(7, torch.Generator().manual_seed(1))
    assert classes.numel() <= 7 and bool((classes[1:] > classes[:-1]).all())
    torch.testing.assert_close(log_pi.exp(), 1 - (1 - mix.proposal[classes]) ** 7)


@pytest.mark.parametrize("remove_hits", [True, False])
def test_loss_and_gradients_match_float64_reference(remove_hits):
    """lut_cv_loss against the formula written out row by row in float64 (value and autograd)."""
    weight, bias, h, target = _data(3, batch=4)
    hard = torch.stack([torch.randperm(V, generator=torch.Generator().manual_seed(b))[:3] for b in range(4)])
    hard[0, 1] = target[0]  # the target inside a hard set is counted once
    classes = torch.unique(torch.cat([torch.randint(0, V, (12,), generator=torch.Generator().manual_seed(9)),
                                      target[1:2], hard[2, :1]]))
    log_pi = torch.log(torch.rand(classes.numel(), generator=torch.Generator().manual_seed(4)) * 0.5 + 0.1).double()
    logits = (h.double() @ weight.double().T + bias.double())
    draw_lut = (logits[:, classes] + 0.3 * torch.randn(4, classes.numel(), generator=torch.Generator().manual_seed(5))).float()
    log_rest = torch.tensor([3.0, -math.inf, 5.0, 4.0], dtype=torch.float64)
    w = weight.clone().requires_grad_()
    x = h.clone().requires_grad_()
    loss = lut_proposal.lut_cv_loss(x, target, w, bias, hard, classes, log_pi, draw_lut, log_rest, remove_hits)
    loss.sum().backward()
    w64, x64 = weight.double().requires_grad_(), h.double().requires_grad_()
    ref = []
    for b in range(4):
        lg = w64 @ x64[b] + bias.double()
        t = int(target[b])
        exact = {t} | set(hard[b].tolist())
        hard_part = sum(torch.exp(lg[c]) for c in exact - {t})
        z = hard_part + math.exp(float(log_rest[b]))  # R_hat: everything but the target
        excluded = exact if remove_hits else set(hard[b].tolist())
        for j, c in enumerate(classes.tolist()):
            if c not in excluded:
                z = z + (torch.exp(lg[c]) - math.exp(float(draw_lut[b, j]))) / math.exp(float(log_pi[j]))
        ref.append(torch.log(torch.exp(lg[t]) + torch.maximum(z, hard_part)) - lg[t])  # R_hat never below the exact terms
    ref = torch.stack(ref)
    ref.sum().backward()
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(w.grad.double(), w64.grad, rtol=1e-3, atol=1e-4)


def _z_hat(layer, x, target, seed, m, **kw):
    """Z_hat_b = exp(loss_b + l_bt), differentiable (the loss is log Z_hat - l_t)."""
    loss = layer.sampled_softmax_loss(x, target, num_sampled=m, reduction="none", num_hard=2, num_candidates=12,
                                      generator=torch.Generator().manual_seed(seed), **kw)
    return torch.exp(loss + layer(x).gather(1, target.unsqueeze(1)).squeeze(1))


def test_partition_estimate_and_its_gradient_are_unbiased(layer):
    """Monte Carlo over seeds: E[Z_hat] = Z, E[dZ_hat/dh] = dZ/dh, E[dZ_hat/dW] = dZ/dW (few draws)."""
    _, _, h, target = _data(4, batch=8)
    x = h.clone().requires_grad_()
    z = torch.logsumexp(layer(x), 1).exp()
    z.sum().backward()
    gx, gw = x.grad.clone(), layer.weight.grad.clone()
    reps, m = 300, 24
    zs, gxs, sum_gw, sq_gw = [], [], torch.zeros_like(gw), torch.zeros_like(gw)
    for s in range(reps):
        x.grad, layer.weight.grad = None, None
        zh = _z_hat(layer, x, target, s, m)
        zh.sum().backward()
        zs.append(zh.detach())
        gxs.append(x.grad.clone())
        sum_gw += layer.weight.grad
        sq_gw += layer.weight.grad**2
    zs, gxs = torch.stack(zs), torch.stack(gxs)
    ratio = zs.mean(0) / z.detach()
    se = zs.std(0) / z.detach() / reps**0.5
    assert bool(((ratio - 1).abs() < 4 * se + 1e-3).all()), (ratio, se)
    assert float(se.max()) > 1e-4  # the draws do vary: the test checks an estimate, not a constant
    # the mean gradient within 4 standard errors (in norm) of autograd's dZ, per row and for the weight
    err_x = (gxs.mean(0) - gx).norm(dim=1)
    se_x = gxs.std(0).norm(dim=1) / reps**0.5
    assert bool((err_x < 4 * se_x + 1e-3 * gx.norm(dim=1)).all()), (err_x, se_x)
    assert bool((se_x < 0.1 * gx.norm(dim=1)).all())  # ... and the test is sharp enough to see a bias of 40%
    mean_w = sum_gw / reps
    se_w = ((sq_gw / reps - mean_w**2).clamp_min(0).sum() / reps) ** 0.5
    assert float((mean_w - gw).norm()) < 4 * float(se_w) + 1e-3 * float(gw.norm())
    assert float(se_w) < 0.15 * float(gw.norm())


def test_row_subsampled_pass_stays_unbiased(layer):
    """lut_rows < B: the mixture of a few rows' LUT softmaxes, the control variate on those rows only."""
    _, _, h, target = _data(8, batch=10)
    z = torch.logsumexp(layer(h), 1).exp().detach()
    reps = 300
    # a heavy floor (lut_share 0.5) bounds the weights of the rows outside the pass, so that a few
    # hundred repetitions see the mean
    est = torch.stack([_z_hat(layer, h, target, s, 24, lut_rows=4, lut_share=0.5).detach() for s in range(reps)])
    ratio = est.mean(0) / z
    se = est.std(0) / z / reps**0.5
    assert bool(((ratio - 1).abs() < 4 * se + 1e-3).all()), (ratio, se)
    assert float(se.max()) > 1e-4
    # every row's loss is finite and the subsample changes with the generator
    a = layer.sampled_softmax_loss(h, target, num_sampled=16, lut_rows=3, reduction="none",
                                   generator=torch.Generator().manual_seed(0))
    b = layer.sampled_softmax_loss(h, target, num_sampled=16, lut_rows=3, reduction="none",
                                   generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and bool(torch.isfinite(a).all())


def test_loss_gradient_converges_to_the_full_softmax(layer):
    _, _, h, target = _data(5, batch=16)
    x = (h * 2.0).requires_grad_()
    F.cross_entropy(layer(x), target, reduction="sum").backward()
    g = x.grad.clone()
    errs = {}
    for m in (8, 128):
        sq = []
        for s in range(6):
            x.grad = None
            layer.sampled_softmax_loss(x, target, num_sampled=m, reduction="sum", num_hard=2, num_candidates=12,
                                       generator=torch.Generator().manual_seed(s)).backward()
            sq.append(float(((x.grad - g) ** 2).sum() / (g**2).sum()))
        errs[m] = sum(sq) / len(sq)
    assert errs[128] < 0.03 and errs[128] < errs[8] / 4, errs


def test_lut_proposal_beats_top_candidates_on_partition_spread(layer):
    _, _, h, target = _data(6, batch=48)
    full = F.cross_entropy(layer(h * 2.0), target, reduction="none").detach()
    spread = {}
    for name, kw in (("candidates", dict(proposal="candidates")), ("lut_plain", dict(control_variate=False)),
                     ("lut", {})):
        losses = torch.stack([
            layer.sampled_softmax_loss(h * 2.0, target, num_sampled=16, reduction="none", num_hard=2,
                                       num_candidates=12, generator=torch.Generator().manual_seed(s), **kw).detach()
            for s in range(12)
        ])
        spread[name] = float(((losses - full) ** 2).mean())
    assert spread["lut"] < spread["lut_plain"] and spread["lut"] < spread["candidates"], spread


def test_side_rows_are_exact_and_excluded(layer):
    """A row in the exact side list joins every hard set: never drawn into the LUT sum, still unbiased."""
    _, _, h, target = _data(7, batch=6)
    layer.side_rows = torch.tensor([int(target[0]), 11])
    layer._scan_bias_cache = (None, None)
    z = torch.logsumexp(layer(h), 1).detach()
    est = torch.stack([_z_hat(layer, h, target, s, 8).detach() for s in range(200)])
    ratio = est.mean(0) / z.exp()
    se = est.std(0) / z.exp() / 200**0.5
    assert bool(((ratio - 1).abs() < 4 * se + 1e-3).all()), (ratio, se)
    assert float(se.max()) > 1e-4


@pytest.mark.parametrize("kwargs,match", [
    (dict(proposal="bogus"), "proposal"),
    (dict(lut_share=0.0), "lut_share"),
    (dict(lut_share=1.5), "lut_share"),
    (dict(lut_share=True), "lut_share"),
    (dict(lut_share="0.5"), "lut_share"),
    (dict(lut_rows=0), "lut_rows"),
    (dict(lut_rows=True), "lut_rows"),
    (dict(lut_rows=2.0), "lut_rows"),
])
def test_bad_arguments(layer, kwargs, match):
    _, _, h, target = _data()
    with pytest.raises(ValueError, match=match):
        layer.sampled_softmax_loss(h, target, num_sampled=16, **kwargs)
