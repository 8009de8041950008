"""The sampler's per-class LUT error scales (torchaq.layer.error_model): formula, fit, refresh, state."""
from __future__ import annotations

import copy
import math

import pytest
import torch

import torchaq
from torchaq import ops
from torchaq.layer import error_model
from torchaq.layer.exact_sampling import ERROR_SIGMAS, head_scores, tail_bounds


def low_rank_head(num_classes: int, dim: int, batch: int, seed: int = 0):
    """Rows with most of their energy in a ``dim // 8``-dimensional subspace (a decaying spectrum) plus
    isotropic noise, log-normal norms; queries in that subspace: residuals lean toward the queries."""
    g = torch.Generator().manual_seed(seed)
    rank = dim // 8
    basis = torch.linalg.qr(torch.randn(dim, rank, generator=g))[0]
    spec = torch.arange(1, rank + 1, dtype=torch.float32) ** -0.5
    rows = 0.9 * (torch.randn(num_classes, rank, generator=g) * spec) @ basis.T
    rows += 0.3 * spec.norm() / math.sqrt(dim) * torch.randn(num_classes, dim, generator=g)
    rows *= (torch.exp(0.3 * torch.randn(num_classes, 1, generator=g)) / rows.norm(dim=1, keepdim=True))
    h = (torch.randn(batch, rank, generator=g) * spec) @ basis.T
    h *= 4.0 / (h @ rows.T).std(dim=1, keepdim=True)
    return rows.contiguous(), h.contiguous()


@pytest.fixture(scope="module")
def fitted():
    weight, h = low_rank_head(4096, 256, 96)
    layer = torchaq.QuantizedSoftmax(weight, num_subspaces=64, progress=False, fit_iters=1).eval()
    return layer, h


def test_scales_equal_the_dense_formula():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(300, 40, generator=g) + 3 * torch.randn(1, 40, generator=g)  # one dominant direction
    model = error_model.fit_error_model(w, rank=5)
    r = 0.1 * torch.randn(50, 40, generator=g)
    r[:10] += 0.2 * w[:10]  # some residuals along the rows' directions
    got = error_model.error_scales(r, r.norm(dim=1), model)
    u, excess, floor = model
    sigma = (u * excess) @ u.T + floor * torch.eye(40)  # S = U diag(lam) U^T + c (I - U U^T)
    along = ((r @ sigma) * r).sum(1).sqrt()
    torch.testing.assert_close(got, torch.maximum(r.norm(dim=1) / math.sqrt(40), along), rtol=1e-5, atol=1e-7)
    assert bool((got[:10] > r[:10].norm(dim=1) / math.sqrt(40) * 1.5).all())  # the rows' directions count more


def test_model_finds_the_rows_subspace_and_keeps_the_global_rng():
    g = torch.Generator().manual_seed(2)
    basis = torch.linalg.qr(torch.randn(64, 4, generator=g))[0]
    w = torch.randn(2000, 4, generator=g) * torch.tensor([4.0, 3.0, 2.0, 1.5]) @ basis.T + 0.1 * torch.randn(2000, 64, generator=g)
    state = torch.get_rng_state()
    model = error_model.fit_error_model(w, rank=4)
    assert torch.equal(torch.get_rng_state(), state)  # seeded: never draws from torch's global generator
    again = error_model.fit_error_model(w, rank=4)
    assert all(torch.equal(a, b) for a, b in zip(model, again))
    x = w / w.norm(dim=1, keepdim=True)
    lam, vec = torch.linalg.eigh(x.T @ x / x.shape[0])
    top = vec[:, -4:]
    assert (model.directions @ model.directions.T - top @ top.T).norm() < 1e-3
    torch.testing.assert_close(model.excess + model.floor, lam[-4:], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(model.floor, (1 - lam[-4:].sum()) / 60, rtol=1e-4, atol=1e-7)


def test_degenerate_rows_give_the_isotropic_model():
    zero = error_model.fit_error_model(torch.zeros(10, 32))
    r = torch.randn(5, 32)
    torch.testing.assert_close(error_model.error_scales(r, r.norm(dim=1), zero), r.norm(dim=1) / math.sqrt(32))
    assert error_model.error_scales(r[:0], r[:0].norm(dim=1), zero).shape == (0,)


def test_layer_scales_bound_the_measured_error_where_the_isotropic_model_fails(fitted):
    """Low-rank rows, queries in their subspace: the measured LUT error in units of ``rho_i`` stays
    within N(0, 1)'s quantiles, while in the isotropic units it exceeds them (the model matters)."""
    layer, h = fitted
    weight = layer.weight.detach()
    lut = layer.quantizer.lut(h)
    s = ops.lut_score(lut, layer.packed_codes, layer.num_classes, None)
    err = (h @ weight.T - s) / h.norm(dim=1, keepdim=True)
    keep = torch.ones(layer.num_classes, dtype=torch.bool)
    keep[layer.side_rows] = False
    model = (err / layer.error_scales)[:, keep].flatten()
    iso = (err / (layer.residual_norms / math.sqrt(layer.dim)))[:, keep].flatten()
    z = 3.719  # one-sided N(0, 1) tail 1e-4
    expected = 1e-4 * model.numel()
    assert int((iso > z).sum()) > 3 * expected  # the old model's failures
    assert int((model > z).sum()) < 2 * expected
    assert bool((layer.error_scales >= layer.residual_norms / math.sqrt(layer.dim) * (1 - 1e-6)).all())
    # and the sampler's bound (quantized scores, rounding allowance) at its own z: no failure expected here
    scores, _, classes, step = head_scores(layer, h, 64)
    upper = tail_bounds(layer, h, scores, classes, rounding=step)
    tail = upper > -math.inf
    assert int(((h @ weight.T) > upper)[tail].sum()) <= 2
    assert ERROR_SIGMAS > z


def test_incremental_refresh_updates_only_the_moved_rows(fitted):
    layer = copy.deepcopy(fitted[0]).refresh()  # a copy's first refresh is a full re-encode
    before = layer.error_scales.clone()
    moved = torch.tensor([3, 700, 4000])
    with torch.no_grad():
        layer.weight[moved] = layer.weight[moved].flip(0) * 1.1
    layer.refresh()
    same = torch.ones(layer.num_classes, dtype=torch.bool)
    same[moved] = False
    assert torch.equal(layer.error_scales[same], before[same])
    assert not torch.equal(layer.error_scales[moved], before[moved])
    assert bool(torch.isfinite(layer.error_scales).all())


def test_state_dict_round_trip_and_legacy_checkpoints(fitted):
    layer = fitted[0]
    state = layer.state_dict()
    assert "error_scales" in state
    skeleton = torchaq.QuantizedSoftmax(torch.empty_like(layer.weight), num_subspaces=64, fit=False, progress=False)
    skeleton.load_state_dict(state)
    assert torch.equal(skeleton.error_scales, layer.error_scales)
    # a checkpoint saved before error_scales existed: they are derived from its weight and codes
    legacy = {k: v for k, v in state.items() if k != "error_scales"}
    old = torchaq.QuantizedSoftmax(torch.empty_like(layer.weight), num_subspaces=64, fit=False, progress=False)
    old.load_state_dict(legacy)
    torch.testing.assert_close(old.error_scales, layer.error_scales)
    assert torch.equal(old.side_rows, layer.side_rows)
    h = fitted[1][:4]
    assert torch.equal(old.sample(h, seeds=torch.arange(4)), layer.sample(h, seeds=torch.arange(4)))
    bad = dict(state, error_scales=torch.full_like(layer.error_scales, float("nan")))
    with pytest.raises(RuntimeError, match="error_scales"):
        copy.deepcopy(skeleton).load_state_dict(bad)
