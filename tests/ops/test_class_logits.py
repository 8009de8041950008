"""torchaq.ops.class_logits: per-row and shared class logits and their gradients, on every path."""
from __future__ import annotations

import warnings

import pytest
import torch

from torchaq.ops.class_logits import class_logits


def _case(batch=6, num_classes=40, dim=12, per=(5, 1), shared=7, bias=True, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(num_classes, dim, generator=g).to(dtype).requires_grad_()
    b = torch.randn(num_classes, generator=g).requires_grad_() if bias else None
    h = torch.randn(batch, dim, generator=g).requires_grad_()
    per_row = [torch.randint(0, num_classes, (batch, n), generator=g) for n in per]
    sh = torch.randperm(num_classes, generator=g)[:shared] if shared is not None else None
    return h, w, b, per_row, sh


def _reference(h, w, b, per_row, shared):
    """float64 gather-and-multiply: the definition."""
    hd, wd = h.double(), w.double()
    bd = None if b is None else b.double()
    outs = []
    for c in per_row:
        out = (wd[c] * hd.unsqueeze(1)).sum(-1)
        outs.append(out + bd[c] if bd is not None else out)
    sh = None
    if shared is not None:
        sh = hd @ wd[shared].T
        sh = sh + bd[shared] if bd is not None else sh
    return outs, sh


def _loss(outs, sh):
    total = sum((o.double() * torch.linspace(-1, 1, o.shape[1], dtype=torch.float64)).sin().sum() for o in outs)
    return total + (sh.double().cos().sum() if sh is not None else 0.0)


@pytest.mark.parametrize("kw", [
    dict(),
    dict(bias=False),
    dict(shared=None),
    dict(shared=0),
    dict(per=(0, 1)),
    dict(per=(45, 1), num_classes=40),  # more entries per row than classes: repeats
    dict(batch=1),
    dict(batch=33, per=(9, 1, 4)),
])
def test_values_and_gradients_equal_the_definition(kw):
    h, w, b, per_row, shared = _case(**kw)
    per_row[-1][0, 0] = per_row[0][0, 0] if per_row[0].shape[1] else 0  # a class repeated within a row
    outs, sh = class_logits(h, w, b, per_row, shared)
    ref_outs, ref_sh = _reference(h, w, b, per_row, shared)
    for o, r in zip(outs, ref_outs):
        assert o.dtype == torch.float32 and o.shape == r.shape
        torch.testing.assert_close(o.double(), r, rtol=1e-5, atol=1e-5)
    assert (sh is None) == (shared is None)
    if sh is not None:
        torch.testing.assert_close(sh.double(), ref_sh, rtol=1e-5, atol=1e-5)
    inputs = [t for t in (h, w, b) if t is not None]
    got = torch.autograd.grad(_loss(outs, sh), inputs, allow_unused=True)
    want = torch.autograd.grad(_loss(ref_outs, ref_sh), inputs, allow_unused=True)
    for a, e in zip(got, want):
        torch.testing.assert_close(a.double(), e.double(), rtol=1e-4, atol=1e-4)


def test_only_the_inputs_that_need_a_gradient_get_one():
    h, w, b, per_row, shared = _case()
    h.requires_grad_(False)
    outs, sh = class_logits(h, w, None, per_row, shared)
    (gw,) = torch.autograd.grad(_loss(outs, sh), [w])
    assert gw.shape == w.shape
    with torch.no_grad():
        outs, _ = class_logits(h, w, b, per_row, shared)
    assert not outs[0].requires_grad


def test_other_dtypes_autocast_and_compile_take_the_same_values():
    h, w, b, per_row, shared = _case()
    outs, sh = class_logits(h, w, b, per_row, shared)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low, low_sh = class_logits(h, w, b, per_row, shared)
    assert low[0].dtype == torch.float32
    torch.testing.assert_close(low[0], outs[0])
    torch.testing.assert_close(low_sh, sh)
    half = w.detach().to(torch.bfloat16)  # the gather path: float32 products of the bf16 rows
    bf, _ = class_logits(h, half, b, per_row, shared)
    torch.testing.assert_close(bf[0], _reference(h, half.float(), b, per_row, None)[0][0].float(), rtol=1e-5, atol=1e-5)
    compiled = torch.compile(lambda x: class_logits(x, w, b, per_row, shared)[0][0], backend="eager")
    torch.testing.assert_close(compiled(h), outs[0], rtol=1e-5, atol=1e-5)


def test_no_warning_reaches_the_user():
    h, w, b, per_row, shared = _case()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        outs, sh = class_logits(h, w, b, per_row, shared)
        _loss(outs, sh).backward()
    assert not [str(x.message) for x in seen]


@pytest.mark.parametrize("which", ["per_row", "shared"])
def test_class_ids_out_of_range_are_refused(which):
    h, w, b, per_row, shared = _case()
    if which == "per_row":
        per_row[0][2, 1] = w.shape[0]
    else:
        shared[0] = -1
    with pytest.raises(ValueError, match=which):
        class_logits(h, w, b, per_row, shared)
