"""Sampled softmax: the estimator against a float64 hand-built reference, limits, samplers, refresher."""
import logging

import pytest
import torch
import torch.nn.functional as F

import torchaq
from torchaq.sampled_softmax import sampled_softmax_loss

V, D = 500, 16


def _data(seed=0, batch=24):
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(20, D, generator=gen)
    weight = centres[torch.randint(0, 20, (V,), generator=gen)] + 0.4 * torch.randn(V, D, generator=gen)
    bias = 0.1 * torch.randn(V, generator=gen)
    target = torch.randint(0, V, (batch,), generator=gen)
    h = weight[target] + 0.4 * torch.randn(batch, D, generator=gen)
    return weight, bias, h, target


@pytest.fixture(scope="module")
def layer():
    weight, bias, _, _ = _data()
    return torchaq.QuantizedSoftmax(weight, bias, num_subspaces=8, progress=False)


def _hand_reference(h, target, weight, bias, proposal, samples, hard, remove_hits):
    """Z_hat = e^{l_t} + sum_{H_b \\ t} e^{l_c} + 1/m' sum_{kept} e^{l_s} (1 - Q(excluded)) / Q(s), row by row."""
    losses = []
    for b in range(h.shape[0]):
        hard_set = set(hard[b].tolist())
        logits = weight @ h[b] + bias
        t = int(target[b])
        z = torch.exp(logits[t])
        for c in hard_set - {t}:
            z = z + torch.exp(logits[c])
        excluded = hard_set | ({t} if remove_hits else set())
        kept = [int(s) for s in samples if int(s) not in excluded]
        rest = 1 - sum(float(proposal[c]) for c in excluded)
        for s in kept:
            z = z + torch.exp(logits[s]) * rest / (len(kept) * proposal[s])
        losses.append(torch.log(z) - logits[t])
    return torch.stack(losses)


@pytest.mark.parametrize("remove_hits", [True, False])
@pytest.mark.parametrize("with_hard", [True, False])
def test_loss_and_gradients_match_float64_reference(remove_hits, with_hard):
    weight, bias, h, target = _data(1, batch=6)
    gen_q = torch.Generator().manual_seed(0)
    proposal = torch.rand(V, generator=gen_q, dtype=torch.float64) ** 4 + 1e-3
    proposal[target] += 2.0  # make accidental hits happen
    proposal /= proposal.sum()
    # per-row hard sets; row 0's contains its target, and draws land in them
    hard = torch.randperm(V, generator=gen_q)[:24].reshape(6, 4)
    hard[0, 2] = target[0]
    hard = hard if with_hard else torch.zeros((6, 0), dtype=torch.int64)
    samples = torch.multinomial(proposal.float(), 60, replacement=True, generator=torch.Generator().manual_seed(5))
    assert any(int(s) in set(target.tolist()) for s in samples)  # hits really occur
    assert len(set(samples.tolist())) < len(samples)  # and classes drawn more than once
    if with_hard:
        proposal[hard.reshape(-1)] += 0.05  # and draws land in the hard sets
        proposal /= proposal.sum()
        samples = torch.multinomial(proposal.float(), 60, replacement=True, generator=torch.Generator().manual_seed(5))
        assert any(int(s) in set(hard[b].tolist()) for b in range(6) for s in samples)

    params32 = [t.clone().requires_grad_() for t in (h, weight, bias)]
    loss32 = sampled_softmax_loss(
        params32[0], target, params32[1], params32[2], proposal.float(), 60, hard if with_hard else None,
        remove_hits, torch.Generator().manual_seed(5),
    )
    params64 = [t.double().clone().requires_grad_() for t in (h, weight, bias)]
    loss64 = _hand_reference(params64[0], target, params64[1], params64[2], proposal, samples, hard, remove_hits)
    torch.testing.assert_close(loss32.double(), loss64, rtol=1e-4, atol=1e-5)
    loss32.sum().backward()
    loss64.sum().backward()
    for a, b in zip(params32, params64):
        torch.testing.assert_close(a.grad.double(), b.grad, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("num_sampled", [V, 7])
def test_exact_softmax_proposal_gives_full_cross_entropy(layer, num_sampled):
    _, _, h, target = _data()
    row, t = h[:1], target[:1]
    exact = layer(row)
    counts = torch.softmax(exact.detach()[0].double(), 0)  # the exact softmax as the proposal
    loss = layer.sampled_softmax_loss(
        row, t, num_sampled=num_sampled, sampler="unigram", class_counts=counts, generator=torch.Generator().manual_seed(0)
    )
    torch.testing.assert_close(loss, F.cross_entropy(exact, t), rtol=1e-4, atol=1e-4)


def test_estimator_converges_and_quantized_beats_uniform(layer):
    _, _, h, target = _data(2, batch=64)
    full = F.cross_entropy(layer(h), target).item()
    errors = {}
    for sampler in ("uniform", "quantized"):
        losses = [
            layer.sampled_softmax_loss(h, target, num_sampled=32, sampler=sampler, generator=torch.Generator().manual_seed(s)).item()
            for s in range(20)
        ]
        errors[sampler] = abs(sum(losses) / len(losses) - full)
    assert errors["quantized"] < errors["uniform"], errors
    assert errors["quantized"] < 0.05 * full, (errors, full)
    # all classes drawn many times: the uniform estimate is close to the full loss too
    many = layer.sampled_softmax_loss(h, target, num_sampled=V, sampler="uniform", generator=torch.Generator().manual_seed(0))
    assert abs(many.item() - full) < 0.1 * full


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
    assert 0 < used < V  # only the rows that were used receive gradient
    layer.zero_grad()


def test_bf16_autocast_and_compile(layer):
    _, _, h, target = _data()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = layer.sampled_softmax_loss(h, target, num_sampled=64, sampler="uniform")
    assert torch.isfinite(loss)
    compiled = torch.compile(lambda x, t: layer.sampled_softmax_loss(x, t, num_sampled=64, sampler="quantized"), backend="aot_eager")
    out = compiled(h, target)
    assert torch.isfinite(out)


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
