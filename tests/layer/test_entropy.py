"""layer.entropy(h): the softmax entropy within 0.01 nats, never holding (B, V)."""
import pytest
import torch

import torchaq
from torchaq.layer import exact


@pytest.mark.parametrize("scale", [0.1, 1.0, 30.0])
def test_entropy_matches_dense(scale, monkeypatch):
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(5000, 32, generator=g), torch.randn(5000, generator=g)
    layer = torchaq.QuantizedSoftmax(w, b, num_subspaces=16, progress=False, fit_iters=1)
    h = torch.randn(3, 7, 32, generator=g) * scale
    logp = torch.log_softmax(h @ w.T + b, dim=-1)
    want = -(logp.exp() * logp).sum(-1)
    monkeypatch.setattr(exact, "CLASS_CHUNK", 1024)  # several class blocks
    monkeypatch.setattr(exact, "ROW_CHUNK", 4)  # several row blocks
    got = layer.entropy(h)
    assert got.shape == (3, 7) and got.dtype == torch.float32
    assert (got - want).abs().max() < 0.01
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="h must have last dimension"):
        layer.entropy(torch.randn(2, 31))
