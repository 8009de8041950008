"""torchaq.linear_cross_entropy against F.cross_entropy on the materialised logits: every convention
(ignore_index, label_smoothing, z_loss, softcap, reductions, shift), gradients, dtypes, compile, bad inputs."""
import pytest
import torch
import torch.nn.functional as F

import torchaq


def _data(n=13, v=41, d=6, dtype=torch.float32, bias=True, seed=0, ignore=True):
    g = torch.Generator().manual_seed(seed)
    e = torch.randn(n, d, generator=g, dtype=dtype) * 2
    c = torch.randn(v, d, generator=g, dtype=dtype)
    b = torch.randn(v, generator=g, dtype=dtype) if bias else None
    t = torch.randint(0, v, (n,), generator=g)
    if ignore:
        t[[1, 4]] = -100
    return e, c, b, t


def _dense(e, c, b, t, softcap=None, reduction="mean", label_smoothing=0.0, z_loss=0.0):
    logits = F.linear(e, c, b)
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    loss = F.cross_entropy(logits, t, reduction=reduction, label_smoothing=label_smoothing)
    if z_loss:
        kept = t != -100
        z = torch.where(kept, z_loss * torch.logsumexp(logits, 1) ** 2, torch.zeros(()))
        loss = loss + {"mean": z.sum() / kept.sum(), "sum": z.sum(), "none": z}[reduction]
    return loss


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("softcap,label_smoothing,z_loss", [(None, 0.0, 0.0), (3.0, 0.0, 0.0), (None, 0.2, 0.0),
                                                            (None, 0.0, 1e-2), (2.5, 0.1, 1e-3)])
def test_matches_dense_cross_entropy(reduction, bias, softcap, label_smoothing, z_loss):
    e, c, b, t = _data(bias=bias)
    ours = [x.clone().requires_grad_() for x in (e, c) + ((b,) if bias else ())]
    ref = [x.clone().requires_grad_() for x in (e, c) + ((b,) if bias else ())]
    kw = dict(softcap=softcap, reduction=reduction, label_smoothing=label_smoothing, z_loss=z_loss)
    out = torchaq.linear_cross_entropy(ours[0], ours[1], t, ours[2] if bias else None, class_block=8, row_chunk=5, **kw)
    exp = _dense(ref[0], ref[1], ref[2] if bias else None, t, **kw)
    torch.testing.assert_close(out, exp)
    upstream = torch.randn_like(exp)
    (out * upstream).sum().backward()
    (exp * upstream).sum().backward()
    for a, r in zip(ours, ref):
        torch.testing.assert_close(a.grad, r.grad)
    if reduction == "none":
        assert out[1] == 0 and out[4] == 0 and (ours[0].grad[[1, 4]] == 0).all()


def test_return_z_loss_is_the_term_in_the_loss():
    e, c, b, t = _data()
    loss, z = torchaq.linear_cross_entropy(e, c, t, b, z_loss=0.05, return_z_loss=True)
    plain = torchaq.linear_cross_entropy(e, c, t, b)
    torch.testing.assert_close(loss - plain, z)
    kept = t != -100
    torch.testing.assert_close(z, (0.05 * torch.logsumexp(F.linear(e, c, b), 1)[kept] ** 2).mean())
    assert not z.requires_grad


def test_all_ignored_behaves_like_f_cross_entropy():
    e, c, b, _ = _data()
    t = torch.full((e.shape[0],), -100)
    e.requires_grad_()
    mean = torchaq.linear_cross_entropy(e, c, t, b)
    assert torch.isnan(mean) and torch.isnan(F.cross_entropy(F.linear(e, c, b), t))
    mean.backward()
    assert (e.grad == 0).all()
    assert torchaq.linear_cross_entropy(e, c, t, b, reduction="sum") == 0


def test_gradcheck_float64_and_leading_dims():
    e, c, b, t = _data(n=6, v=11, d=4, dtype=torch.float64)
    e, c, b = (x.requires_grad_() for x in (e, c, b))
    for reduction in ("none", "mean"):
        assert torch.autograd.gradcheck(lambda e, c, b: torchaq.linear_cross_entropy(
            e, c, t, b, softcap=2.0, label_smoothing=0.1, z_loss=0.01, reduction=reduction, class_block=3), (e, c, b))
    out = torchaq.linear_cross_entropy(e.detach().reshape(2, 3, 4), c.detach(), t.reshape(2, 3), b.detach(), reduction="none")
    assert out.shape == (2, 3)


def test_shift_predicts_the_next_target():
    e, c, b, t = _data(n=12, ignore=False)
    e3, t3 = e.reshape(2, 6, -1), t.reshape(2, 6)
    out = torchaq.linear_cross_entropy(e3, c, t3, b, shift=True)
    torch.testing.assert_close(out, F.cross_entropy(F.linear(e3[:, :-1], c, b).flatten(0, 1), t3[:, 1:].flatten()))


def test_bf16_accumulates_in_float32():
    e, c, b, t = _data(n=32, v=300, d=16, bias=False)
    eb, cb = e.bfloat16().requires_grad_(), c.bfloat16().requires_grad_()
    out = torchaq.linear_cross_entropy(eb, cb, t, class_block=64)
    assert out.dtype == torch.float32
    ef, cf = eb.detach().float().requires_grad_(), cb.detach().float().requires_grad_()
    exp = F.cross_entropy(ef @ cf.T, t)
    torch.testing.assert_close(out, exp, rtol=1e-5, atol=1e-5)
    out.backward()
    exp.backward()
    assert eb.grad.dtype == torch.bfloat16 and cb.grad.dtype == torch.bfloat16
    torch.testing.assert_close(eb.grad.float(), ef.grad.bfloat16().float())
    torch.testing.assert_close(cb.grad.float(), cf.grad.bfloat16().float())


def test_large_logits_are_stable_and_no_grad_forward():
    e, c, b, t = _data()
    with torch.no_grad():
        out = torchaq.linear_cross_entropy(e * 200, c, t, b, class_block=4)
    torch.testing.assert_close(out, F.cross_entropy(F.linear(e * 200, c, b), t))


def test_chunked_cross_entropy_is_the_same_loss():
    e, c, b, t = _data()
    torch.testing.assert_close(torchaq.chunked_cross_entropy(e, c, b, t, chunk_size=7),
                               torchaq.linear_cross_entropy(e, c, t, b))


def test_torch_compile():
    e, c, b, t = _data()
    e.requires_grad_()
    compiled = torch.compile(lambda e: torchaq.linear_cross_entropy(e, c, t, b, softcap=4.0, label_smoothing=0.1),
                             backend="aot_eager", fullgraph=True)
    out = compiled(e)
    out.backward()
    ref = e.detach().clone().requires_grad_()
    exp = _dense(ref, c, b, t, softcap=4.0, label_smoothing=0.1)
    exp.backward()
    torch.testing.assert_close(out, exp)
    torch.testing.assert_close(e.grad, ref.grad)


@pytest.mark.parametrize("mutate,err,match", [
    (lambda e, c, b, t: (e, c, b, t + 100), ValueError, "targets"),
    (lambda e, c, b, t: (e, c, b, t.clamp(min=0) - 7), ValueError, "targets"),
    (lambda e, c, b, t: (e, c, b, t.float()), TypeError, "targets"),
    (lambda e, c, b, t: (e, c.double(), b, t), TypeError, "c must have e's dtype"),
    (lambda e, c, b, t: (e, c.to("meta"), b, t), ValueError, "c is on"),
    (lambda e, c, b, t: (e.index_fill(0, torch.tensor([2]), float("nan")), c, b, t), ValueError, "e must be finite"),
    (lambda e, c, b, t: (e, c.index_fill(0, torch.tensor([2]), float("inf")), b, t), ValueError, "c must be finite"),
    (lambda e, c, b, t: (e, c, b[:3], t), ValueError, "bias"),
    (lambda e, c, b, t: (e[:, :2], c, b, t), ValueError, "c must"),
])
def test_bad_inputs_name_the_argument(mutate, err, match):
    e, c, b, t = mutate(*_data())
    with pytest.raises(err, match=match):
        torchaq.linear_cross_entropy(e, c, t, b)


@pytest.mark.parametrize("kwargs,match", [
    (dict(softcap=0.0), "softcap"), (dict(softcap=-1.0), "softcap"), (dict(softcap=float("inf")), "softcap"),
    (dict(label_smoothing=1.5), "label_smoothing"), (dict(z_loss=-1.0), "z_loss"), (dict(reduction="avg"), "reduction"),
    (dict(class_block=0), "class_block"), (dict(row_chunk=-1), "row_chunk"),
])
def test_bad_options_name_the_argument(kwargs, match):
    e, c, b, t = _data()
    with pytest.raises(ValueError, match=match):
        torchaq.linear_cross_entropy(e, c, t, b, **kwargs)
