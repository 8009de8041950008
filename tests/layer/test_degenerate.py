"""Degenerate tables fit correctly, fall back to exact scoring, or warn with the measured cause."""
import warnings

import pytest
import torch

import torchaq
from torchaq.layer import exact, side_list

G = torch.Generator().manual_seed(0)
Q = torch.randn(200, 32, generator=G)


def _recall(layer, w, q, k=10):
    truth = (q @ w.T).topk(k).indices
    _, got = layer.topk(q, k=k)
    return (got.unsqueeze(2) == truth.unsqueeze(1)).any(2).float().mean().item()


def test_identical_rows_keep_mad_positive_and_recall():
    # a vocabulary extended the way resize_token_embeddings does it: new rows at the mean of the old
    real = torch.randn(1500, 32, generator=G) @ torch.randn(32, 32, generator=G) * 0.1
    w = torch.cat([real, real.mean(0, keepdim=True).expand(1800, -1)])
    assert bool(side_list.fit_rows_mask(w).all())  # MAD 0 no longer makes every real row an outlier
    layer = torchaq.QuantizedSoftmax(w, progress=False, fit_iters=1)
    assert _recall(layer, w, Q) >= 0.95  # was 0.63


def test_half_zero_rows_decode_the_rest():
    w = torch.cat([torch.zeros(500, 32), torch.randn(500, 32, generator=G)])
    layer = torchaq.QuantizedSoftmax(w, progress=False, fit_iters=1)
    _, idx = layer.topk(Q, k=1)
    assert (idx[:, 0] == (Q @ w.T).argmax(1)).float().mean() >= 0.95  # was 0.19


def test_robust_z_all_equal_and_infinite():
    assert torch.equal(side_list.robust_z(torch.ones(10)), torch.zeros(10))
    z = side_list.robust_z(torch.tensor([1.0, 1.0, 1.0, 2.0, float("inf")]))
    assert torch.isfinite(z[:4]).all() and z[4] == float("inf")


def test_norms_near_float32_max_stay_in_the_side_list():
    w = torch.randn(1000, 32, generator=G)
    w[5] *= 1e19  # norm^2 overflows float32
    w[6] *= 5e18
    norms = side_list.row_norms(w)
    assert torch.isfinite(norms).all()
    torch.testing.assert_close(norms[5].double(), w[5].double().norm(), rtol=1e-5, atol=0)
    layer = torchaq.QuantizedSoftmax(w, progress=False, fit_iters=1)
    assert {5, 6} <= set(layer.side_rows.tolist())
    q = Q * 1e-18
    _, idx = layer.topk(q, k=1)
    assert (idx[:, 0] == (q @ w.T).argmax(1)).float().mean() >= 0.95  # was 0.82


@pytest.mark.parametrize("d", [2, 4])
def test_tiny_width_scores_exactly(d):
    w = torch.randn(3000, d, generator=G)
    q = torch.randn(50, d, generator=G)
    layer = torchaq.QuantizedSoftmax(w, progress=False)
    assert layer.exact_reason is not None and f"d={d}" in layer.exact_reason and "exact" in repr(layer)
    values, idx = layer.topk(q, k=10)
    ref = (q @ w.T).topk(10)
    assert torch.equal(idx, ref.indices)
    torch.testing.assert_close(values, ref.values)
    logp, idx = layer.log_softmax_topk(q, k=5)
    torch.testing.assert_close(logp, torch.log_softmax(q @ w.T, 1).topk(5).values)
    assert layer.sample(q, top_k=1).equal(ref.indices[:, 0])
    # the whole-vocabulary sampler draws from the exact softmax: the token's logprob is exact
    out = layer.sample(q, seeds=torch.arange(50), return_logprobs=True)
    torch.testing.assert_close(out.logprobs, torch.log_softmax(q @ w.T, 1).gather(1, out.tokens[:, None])[:, 0])
    # training: no codes to sample from, so the loss is the exact cross-entropy
    target = torch.randint(3000, (50,), generator=G)
    target[3] = -100
    hq = q.clone().requires_grad_()
    loss = layer.sampled_softmax_loss(hq, target, num_sampled=64)
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(q @ w.T, target))
    loss.backward()
    assert torch.isfinite(hq.grad).all() and hq.grad[3].abs().max() == 0
    none = layer.sampled_softmax_loss(q, target, num_sampled=64, reduction="none")
    assert none.shape == target.shape
    layer.refresh()  # no index to refresh: nothing fails


def test_narrow_table_warns_with_measured_recall(monkeypatch):
    from torchaq.layer import probe

    monkeypatch.setattr(probe, "MIN_RECALL", 1.01)  # force the warning on a table that recalls well
    with pytest.warns(RuntimeWarning, match=r"measured recall@10 = \d\.\d\d .*d=8"):
        torchaq.QuantizedSoftmax(torch.randn(2000, 8, generator=G), progress=False, fit_iters=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torchaq.QuantizedSoftmax(torch.randn(2000, 16, generator=G), progress=False, fit_iters=1)  # not probed


def test_fewer_rows_than_codewords_scores_exactly_and_errors_name_weight():
    w = torch.randn(10, 32, generator=G)
    layer = torchaq.QuantizedSoftmax(w, progress=False)
    assert "V=10" in layer.exact_reason
    values, idx = layer.topk(Q[:3], k=3)
    assert torch.equal(idx, (Q[:3] @ w.T).topk(3).indices)
    bad = torch.randn(100, 32)
    bad[17, 3] = float("nan")
    with pytest.raises(ValueError, match="weight has NaN or Inf values in row 17"):
        torchaq.QuantizedSoftmax(bad, progress=False)


def test_exact_reason_rule():
    assert exact.exact_reason(10, 32, 4) and exact.exact_reason(200, 32, 8)
    assert exact.exact_reason(1000, 4, 4) and exact.exact_reason(1000, 32, 4) is None
