"""chunked_cross_entropy against F.cross_entropy: values, gradients, reductions, dtypes, bad arguments."""
import pytest
import torch
import torch.nn.functional as F

import torchaq


def _data(batch=9, vocab=37, dim=6, dtype=torch.float32, bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(batch, dim, generator=gen, dtype=dtype) * 2
    w = torch.randn(vocab, dim, generator=gen, dtype=dtype)
    b = torch.randn(vocab, generator=gen, dtype=dtype) if bias else None
    t = torch.randint(0, vocab, (batch,), generator=gen)
    return h, w, b, t


@pytest.mark.parametrize("chunk", [1, 5, 37, 100])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_cross_entropy_forward_and_backward(chunk, reduction, bias):
    h, w, b, t = _data(bias=bias)
    ours = [x.clone().requires_grad_() for x in (h, w) + ((b,) if bias else ())]
    ref = [x.clone().requires_grad_() for x in (h, w) + ((b,) if bias else ())]
    out = torchaq.chunked_cross_entropy(ours[0], ours[1], ours[2] if bias else None, t, chunk_size=chunk, reduction=reduction)
    exp = F.cross_entropy(F.linear(ref[0], ref[1], ref[2] if bias else None), t, reduction=reduction)
    torch.testing.assert_close(out, exp)
    upstream = torch.randn_like(exp)
    (out * upstream).sum().backward()
    (exp * upstream).sum().backward()
    for a, e in zip(ours, ref):
        torch.testing.assert_close(a.grad, e.grad)


def test_gradcheck_float64_and_leading_dims():
    h, w, b, t = _data(batch=6, vocab=11, dim=4, dtype=torch.float64)
    h, w, b = (x.requires_grad_() for x in (h, w, b))
    assert torch.autograd.gradcheck(
        lambda h, w, b: torchaq.chunked_cross_entropy(h, w, b, t, chunk_size=3, reduction="none"), (h, w, b))
    out = torchaq.chunked_cross_entropy(h.detach().reshape(2, 3, 4), w.detach(), b.detach(), t.reshape(2, 3), reduction="none")
    assert out.shape == (2, 3)
    torch.testing.assert_close(out.reshape(-1), F.cross_entropy(h.detach() @ w.detach().T + b.detach(), t, reduction="none"))


def test_large_logits_are_stable():
    h, w, b, t = _data()
    out = torchaq.chunked_cross_entropy(h * 200, w, b, t, chunk_size=4)
    torch.testing.assert_close(out, F.cross_entropy(F.linear(h * 200, w, b), t))


@pytest.mark.parametrize("kwargs,err,match", [
    (dict(chunk_size=0), ValueError, "chunk_size"),
    (dict(chunk_size=True), ValueError, "chunk_size"),
    (dict(reduction="avg"), ValueError, "reduction"),
])
def test_bad_arguments(kwargs, err, match):
    h, w, b, t = _data()
    with pytest.raises(err, match=match):
        torchaq.chunked_cross_entropy(h, w, b, t, **kwargs)


def test_bad_inputs():
    h, w, b, t = _data()
    with pytest.raises(ValueError, match="target values"):
        torchaq.chunked_cross_entropy(h, w, b, t + 100)
    with pytest.raises(TypeError, match="target"):
        torchaq.chunked_cross_entropy(h, w, b, t.float())
    with pytest.raises(ValueError, match="h must"):
        torchaq.chunked_cross_entropy(h[:, :2], w, b, t)
    with pytest.raises(ValueError, match="bias"):
        torchaq.chunked_cross_entropy(h, w, b[:3], t)
    with pytest.raises(ValueError, match="weight"):
        torchaq.chunked_cross_entropy(h, w[0], b, t)
