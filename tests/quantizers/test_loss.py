"""The score-aware loss: the paper's decomposition, eta, and the loss function."""
import math

import pytest
import torch

import torchaq
from torchaq.quantizers.loss import parallel_perpendicular, score_aware_weights


def _unit(v):
    return v / v.norm(dim=-1, keepdim=True)


@pytest.mark.parametrize("dim,threshold,norm", [(8, 0.3, 1.0), (16, 0.2, 1.0), (16, 0.5, 2.0)])
def test_monte_carlo_matches_decomposition(dim, threshold, norm):
    """E_q[1(<q,x> >= T) <q,r>^2] = h_par |r_par|^2 + h_perp |r_perp|^2 for q uniform on the sphere."""
    gen = torch.Generator().manual_seed(dim)
    x = norm * _unit(torch.randn(dim, generator=gen, dtype=torch.float64))
    r = 0.3 * torch.randn(dim, generator=gen, dtype=torch.float64)
    q = _unit(torch.randn(400_000, dim, generator=gen, dtype=torch.float64))
    samples = (q @ x >= threshold).double() * (q @ r) ** 2
    mc, stderr = samples.mean().item(), samples.std().item() / math.sqrt(samples.numel())
    h_par, h_perp = score_aware_weights(threshold, dim, norm)
    r_par_sq, r_perp_sq = parallel_perpendicular(x[None], (x - r)[None])
    predicted = h_par * r_par_sq.item() + h_perp * r_perp_sq.item()
    assert abs(mc - predicted) < 4 * stderr + 1e-9, (mc, predicted, stderr)
    assert h_par > h_perp  # a non-decreasing weight puts more weight on the parallel error


def test_ratio_approaches_eta_as_dim_grows():
    errors = []
    for dim in (10, 100, 1000, 10000):
        h_par, h_perp = score_aware_weights(0.2, dim, 1.0, steps=200_001)
        formula = torchaq.eta(0.2, dim, 1.0).item()
        errors.append(abs(h_par / h_perp - formula) / formula)
    assert all(b < a for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.01


def test_eta_values_and_guard():
    assert torchaq.eta(0.2, 100, 1.0).item() == pytest.approx(4.125, rel=1e-5)
    norms = torch.tensor([0.05, 0.2, 1.0, 4.0])
    values = torchaq.eta(0.2, 100, norms)
    assert torch.isfinite(values).all() and (values > 0).all()
    assert values[0] == values[1]  # |x| <= T: clamped to the largest finite value
    assert (values[1:].diff() < 0).all()  # larger norms are less anisotropic
    with pytest.raises(ValueError, match="threshold"):
        torchaq.eta(0.0, 100, 1.0)
    with pytest.raises(ValueError, match="threshold"):
        torchaq.eta(float("nan"), 100, 1.0)
    with pytest.raises(ValueError, match="dim"):
        torchaq.eta(0.2, 1, 1.0)


def test_score_aware_loss_definition():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(50, 12, generator=gen)
    x_hat = x + 0.1 * torch.randn(50, 12, generator=gen)
    r = x - x_hat
    r_par = ((r * x).sum(1, keepdim=True) / (x * x).sum(1, keepdim=True)) * x
    r_perp = r - r_par
    eta = torch.rand(50, generator=gen) * 5 + 1
    expected = eta * r_par.pow(2).sum(1) + r_perp.pow(2).sum(1)
    torch.testing.assert_close(torchaq.score_aware_loss(x, x_hat, eta), expected, rtol=1e-4, atol=1e-6)
    # eta = 1 is the reconstruction error
    torch.testing.assert_close(torchaq.score_aware_loss(x, x_hat, 1.0), r.pow(2).sum(1), rtol=1e-4, atol=1e-6)
    # a zero row has no direction: all of its residual is perpendicular, nothing is NaN
    zero = torchaq.score_aware_loss(torch.zeros(1, 12), torch.ones(1, 12), 4.0)
    assert torch.isfinite(zero).all() and zero.item() == pytest.approx(12.0)
    with pytest.raises(ValueError, match="same shape"):
        torchaq.score_aware_loss(x, x_hat[:, :5], 1.0)
    with pytest.raises(ValueError, match="eta"):
        torchaq.score_aware_loss(x, x_hat, torch.ones(3))
