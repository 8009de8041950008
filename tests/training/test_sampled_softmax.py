"""Sampled softmax: the estimator against a float64 hand-built reference, limits, samplers, refresher."""
import copy
import logging
import re

import pytest
import torch
import torch.nn.functional as F

import torchaq
from conftest import clustered_softmax_data
from torchaq.training.sampled_softmax import row_proposals, sampled_softmax_loss

V, D = 500, 16


def _data(seed=0, batch=24):
    return clustered_softmax_data(V, D, seed, batch)


@pytest.fixture(scope="module")
def _fitted_layer():
    weight, bias, _, _ = _data()
    return torchaq.QuantizedSoftmax(weight, bias, num_subspaces=8, progress=False)


@pytest.fixture
def layer(_fitted_layer):
    """A fresh copy per test (fitted once per module): gradients, refreshes and refits stay in their test."""
    return copy.deepcopy(_fitted_layer)


def _hand_reference(h, target, weight, bias, classes, log_pi, hard, remove_hits):
    """Z_hat = e^{l_t} + sum_{H_b \\ t} e^{l_c} + sum_{c in U \\ E_b} e^{l_c} / pi(c), row by row, float64."""
    losses = []
    for b in range(h.shape[0]):
        hard_set = set(hard[b].tolist())
        logits = weight @ h[b] + bias
        t = int(target[b])
        z = torch.exp(logits[t])
        for c in hard_set - {t}:
            z = z + torch.exp(logits[c])
        excluded = hard_set | ({t} if remove_hits else set())
        for c, lp in zip(classes.tolist(), log_pi.tolist()):
            if c not in excluded:
                z = z + torch.exp(logits[c] - lp)
        losses.append(torch.log(z) - logits[t])
    return torch.stack(losses)


@pytest.mark.parametrize("remove_hits", [True, False])
@pytest.mark.parametrize("with_hard", [True, False])
def test_loss_and_gradients_match_float64_reference(remove_hits, with_hard):
    weight, bias, h, target = _data(1, batch=6)
    gen_q = torch.Generator().manual_seed(0)
    hard = torch.randperm(V, generator=gen_q)[:24].reshape(6, 4)
    hard[0, 2] = target[0]  # row 0's hard set holds its target
    hard = hard if with_hard else torch.zeros((6, 0), dtype=torch.int64)
    # drawn classes that hit targets and hard sets, with arbitrary inclusion probabilities
    classes = torch.unique(torch.cat([target[:3], hard.reshape(-1)[:5], torch.randperm(V, generator=gen_q)[:20]]))
    log_pi = torch.log(torch.rand(classes.numel(), generator=gen_q, dtype=torch.float64) * 0.9 + 0.05)
    params32 = [t.clone().requires_grad_() for t in (h, weight, bias)]
    loss32 = sampled_softmax_loss(params32[0], target, params32[1], params32[2], classes, log_pi,
                                  hard if with_hard else None, remove_hits)
    params64 = [t.double().clone().requires_grad_() for t in (h, weight, bias)]
    loss64 = _hand_reference(params64[0], target, params64[1], params64[2], classes, log_pi, hard, remove_hits)
    torch.testing.assert_close(loss32.double(), loss64, rtol=1e-4, atol=1e-5)
    loss32.sum().backward()
    loss64.sum().backward()
    for a, b in zip(params32, params64):
        torch.testing.assert_close(a.grad.double(), b.grad, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("zipf_floor", [False, True])
def test_row_proposals_are_distributions_and_inclusion_probabilities_are_exact(layer, zipf_floor):
    _, _, h, _ = _data(3, batch=5)
    base = (1.0 / torch.arange(1, V + 1).double()) if zipf_floor else None
    props = row_proposals(layer, h, num_hard=4, num_candidates=20, base=None if base is None else base / base.sum())
    everything = torch.arange(V).expand(5, V)
    q = props.prob(torch.arange(5), everything)
    torch.testing.assert_close(q.sum(1), torch.ones(5, dtype=torch.float64))
    assert bool((q > 0).all())
    # pi(c) = 1 - prod_k (1 - Q_k(c))^{n_k} (m = 10: n_k = 2 for each of the 5 rows) against the
    # frequency over many independent draws
    m, trials = 10, 600
    hits = torch.zeros(V, dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    for _ in range(trials):
        classes, _ = props.shared_draws(m, gen)
        hits[classes] += 1
    exact = -torch.expm1((2 * torch.log1p(-q)).sum(0))
    classes, log_pi = props.shared_draws(m, gen)
    torch.testing.assert_close(log_pi.exp(), exact[classes])
    top = exact.argsort(descending=True)[:40]
    assert (hits[top] / trials - exact[top]).abs().max() < 0.08  # ~4 standard errors
    assert abs(float(hits.sum() / trials - exact.sum())) < 0.3  # expected number of distinct classes


@pytest.mark.parametrize("kwargs", [dict(sampler="uniform"), dict(sampler="quantized"),
                                    dict(sampler="quantized", share_draws=False)])
def test_partition_estimate_is_unbiased(layer, kwargs):
    """E[Z_hat] = Z: the mean over draws of exp(loss) = Z_hat / e^{l_t} matches the full softmax's."""
    _, _, h, target = _data(2, batch=16)
    full = F.cross_entropy(layer(h), target, reduction="none").detach().double().exp()
    est = torch.stack([
        layer.sampled_softmax_loss(h, target, num_sampled=48, reduction="none", num_hard=4, num_candidates=24,
                                   generator=torch.Generator().manual_seed(s), **kwargs).detach().double().exp()
        for s in range(120)
    ])
    ratio = est.mean(0) / full
    assert abs(float(ratio.mean()) - 1) < 0.04, ratio
    assert float((ratio - 1).abs().max()) < 0.3, ratio


def test_quantized_beats_uniform_and_control_variate_lowers_variance(layer):
    _, _, h, target = _data(2, batch=64)
    full = F.cross_entropy(layer(h), target, reduction="none").detach()
    spread = {}
    for name, kw in (("uniform", dict(sampler="uniform")), ("plain", dict(control_variate=False)), ("cv", {})):
        losses = torch.stack([
            layer.sampled_softmax_loss(h, target, num_sampled=32, reduction="none", num_hard=4, num_candidates=32,
                                       generator=torch.Generator().manual_seed(s), **kw).detach()
            for s in range(16)
        ])
        spread[name] = float(((losses - full) ** 2).mean())
    assert spread["cv"] < spread["plain"] < spread["uniform"], spread


def test_empty_batch_gives_zero_or_empty_loss(layer):
    h = torch.zeros(0, D, requires_grad=True)
    target = torch.zeros(0, dtype=torch.int64)
    for sampler in ("quantized", "uniform"):
        assert layer.sampled_softmax_loss(h, target, num_sampled=8, sampler=sampler).item() == 0.0
        assert layer.sampled_softmax_loss(h, target, num_sampled=8, sampler=sampler, reduction="sum").item() == 0.0
        none = layer.sampled_softmax_loss(h.reshape(0, 3, D), target.reshape(0, 3), num_sampled=8, sampler=sampler,
                                          reduction="none")
        assert none.shape == (0, 3)
    layer.sampled_softmax_loss(h, target, num_sampled=8).backward()
    assert h.grad.shape == (0, D)
    layer.zero_grad()


def test_effective_sample_size_is_logged(layer, caplog):
    _, _, h, target = _data()
    with caplog.at_level(logging.DEBUG, logger="torchaq"):
        layer.sampled_softmax_loss(h, target, num_sampled=64, generator=torch.Generator().manual_seed(0))
    lines = [r.getMessage() for r in caplog.records if "ESS" in r.getMessage()]
    assert lines, caplog.text
    mean, low = (float(x) for x in re.findall(r"mean ([0-9.]+) min ([0-9.]+)", lines[0])[0])
    assert 1.0 <= low <= mean <= 64


def test_reductions_shapes_generator_and_gradients(layer):
    _, _, h, target = _data()
    h3, t3 = h.reshape(4, 6, D).clone().requires_grad_(), target.reshape(4, 6)
    per_row = layer.sampled_softmax_loss(h3, t3, num_sampled=64, reduction="none", generator=torch.Generator().manual_seed(1))
    assert per_row.shape == (4, 6)
    again = layer.sampled_softmax_loss(h3, t3, num_sampled=64, reduction="none", generator=torch.Generator().manual_seed(1))
    assert torch.equal(per_row, again)
    summed = layer.sampled_softmax_loss(h3, t3, num_sampled=64, reduction="sum", generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(summed, per_row.sum())
    summed.backward()
    assert h3.grad is not None and torch.isfinite(h3.grad).all()
    assert layer.weight.grad is not None and layer.bias.grad is not None
    used = (layer.weight.grad.abs().sum(1) > 0).sum()
    assert used == V  # the tail's weight gradient (tail_grad_rows) reaches every class; test_tail_grad.py has more
    layer.zero_grad()


def test_bf16_autocast_and_compile_agree_with_eager(layer):
    _, _, h, target = _data()
    eager = layer.sampled_softmax_loss(h, target, num_sampled=64, sampler="uniform", generator=torch.Generator().manual_seed(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = layer.sampled_softmax_loss(h, target, num_sampled=64, sampler="uniform", generator=torch.Generator().manual_seed(3))
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, eager, rtol=0.05, atol=0.05)
    fn = lambda x, t: layer.sampled_softmax_loss(x, t, num_sampled=64, sampler="uniform",  # noqa: E731
                                                 generator=torch.Generator().manual_seed(4))
    compiled = torch.compile(fn, backend="eager")
    torch.testing.assert_close(compiled(h, target), fn(h, target))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(num_sampled=0), "num_sampled"),
        (dict(num_sampled=V + 1), "num_sampled"),
        (dict(num_sampled=64, sampler="bogus"), "sampler"),
        (dict(num_sampled=64, reduction="avg"), "reduction"),
        (dict(num_sampled=64, sampler="unigram"), "class_counts"),
        (dict(num_sampled=64, sampler="unigram", class_counts=torch.zeros(V)), "class_counts"),
        (dict(num_sampled=64, sampler="unigram", class_counts=-torch.ones(V)), "class_counts"),
        (dict(num_sampled=64, sampler="unigram", class_counts=torch.ones(V - 1)), "class_counts"),
        (dict(num_sampled=True), "num_sampled"),
        (dict(num_sampled=64, num_hard=-1), "num_hard"),
        (dict(num_sampled=64, num_candidates=0), "num_candidates"),
        (dict(num_sampled=64, candidate_share=1.0), "candidate_share"),
        (dict(num_sampled=64, candidate_share=True), "candidate_share"),
    ],
)
def test_bad_arguments(layer, kwargs, match):
    _, _, h, target = _data()
    with pytest.raises(ValueError, match=match):
        layer.sampled_softmax_loss(h, target, **kwargs)


def test_bad_targets(layer):
    _, _, h, target = _data()
    with pytest.raises(ValueError, match=r"target values must be in \[0, V=500\)"):
        layer.sampled_softmax_loss(h, target + V, num_sampled=64)
    with pytest.raises(ValueError, match="target must have shape"):
        layer.sampled_softmax_loss(h, target[:5], num_sampled=64)
    with pytest.raises(TypeError, match="target"):
        layer.sampled_softmax_loss(h, target.float(), num_sampled=64)
    with pytest.raises(ValueError, match="d=16"):
        layer.sampled_softmax_loss(h[:, :5], target, num_sampled=64)


def test_refresher_schedules_and_logs(layer, caplog):
    _, _, h, _ = _data()
    refresher = torchaq.CodebookRefresher(layer, every=2, refit_every=5, max_queries=40)
    with caplog.at_level(logging.INFO, logger="torchaq"):
        kinds = [refresher.step(h) for _ in range(6)]
    assert kinds == [None, "reencode", None, "reencode", "refit", "reencode"]
    assert [e["kind"] for e in refresher.history] == ["reencode", "reencode", "refit", "reencode"]
    assert all(e["seconds"] >= 0 for e in refresher.history)
    assert "refit of 500 rows at step 5" in caplog.text
    with pytest.raises(ValueError, match="every"):
        torchaq.CodebookRefresher(layer, every=0)
    with pytest.raises(TypeError, match="QuantizedSoftmax"):
        torchaq.CodebookRefresher(torch.nn.Linear(2, 2))


# ------------------------------------------------------------------------------------------------
# the loss conventions of F.cross_entropy (torchaq.training.conventions)
# ------------------------------------------------------------------------------------------------
def _exact_kept_rows_loss(layer, h, t, **kw):
    """The sampled loss with every class drawn (uniform, num_sampled = V draws cover the vocabulary only
    in expectation, so compare against itself on the kept rows instead)."""
    return layer.sampled_softmax_loss(h, t, sampler="uniform", generator=torch.Generator().manual_seed(0), **kw)


def test_ignore_index_drops_rows_exactly(layer):
    g = torch.Generator().manual_seed(3)
    h = torch.randn(10, layer.dim, generator=g).requires_grad_()
    t = torch.randint(0, layer.num_classes, (10,), generator=g)
    t_ign = t.clone()
    t_ign[[2, 7]] = -100
    kept = t_ign != -100
    out = _exact_kept_rows_loss(layer, h, t_ign, num_sampled=64, reduction="none")
    assert out[2] == 0 and out[7] == 0
    ref = _exact_kept_rows_loss(layer, h[kept], t[kept], num_sampled=64, reduction="none")
    torch.testing.assert_close(out[kept], ref)
    mean = _exact_kept_rows_loss(layer, h, t_ign, num_sampled=64)
    torch.testing.assert_close(mean, ref.mean())
    mean.backward()
    assert (h.grad[[2, 7]] == 0).all() and (h.grad[kept] != 0).any()


def test_all_ignored_batch_is_nan_mean_zero_sum(layer):
    h = torch.randn(4, layer.dim)
    t = torch.full((4,), -100)
    assert torch.isnan(layer.sampled_softmax_loss(h, t, num_sampled=16))
    assert layer.sampled_softmax_loss(h, t, num_sampled=16, reduction="sum") == 0


def test_label_smoothing_and_z_loss_follow_the_definitions(layer):
    g = torch.Generator().manual_seed(4)
    h = torch.randn(6, layer.dim, generator=g)
    t = torch.randint(0, layer.num_classes, (6,), generator=g)
    base = _exact_kept_rows_loss(layer, h, t, num_sampled=64, reduction="none")
    logits = layer(h).float()
    lt = logits.gather(1, t.unsqueeze(1)).squeeze(1)
    smooth = _exact_kept_rows_loss(layer, h, t, num_sampled=64, reduction="none", label_smoothing=0.2)
    torch.testing.assert_close(smooth, base + 0.2 * (lt - logits.mean(1)), rtol=1e-5, atol=1e-5)
    out, z = _exact_kept_rows_loss(layer, h, t, num_sampled=64, reduction="none", z_loss=0.1, return_z_loss=True)
    torch.testing.assert_close(z, 0.1 * (base + lt) ** 2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, base + z)


def test_sampled_loss_refuses_softcap_and_bad_options(layer):
    h, t = torch.randn(3, layer.dim), torch.zeros(3, dtype=torch.long)
    for kw, match in ((dict(softcap=5.0), "softcap"), (dict(softcap=-1.0), "softcap"),
                      (dict(label_smoothing=2.0), "label_smoothing"), (dict(z_loss=-1.0), "z_loss")):
        with pytest.raises(ValueError, match=match):
            layer.sampled_softmax_loss(h, t, num_sampled=8, **kw)
    with pytest.raises(ValueError, match="ignore_index"):
        layer.sampled_softmax_loss(h, t - 5, num_sampled=8)
