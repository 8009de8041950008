"""torch.ops.torchaq.layer_topk (LUT + scan + exact re-score of the candidates and the side list, one
op) against its reference (the ops in turn), the int8 shortlist stage, and the layer's use of it."""
from __future__ import annotations

import copy

import pytest
import torch

import torchaq
from conftest import ISAS, isa
from torchaq import ops
from torchaq.backends import CPU_EXTENSION_LOADED
from torchaq.ops.layer_topk import layer_topk_reference, quantize_rows_int8

V, D = 2000, 32


def _layer(bits=4, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(30, D, generator=g)
    w = centres[torch.randint(0, 30, (V,), generator=g)] + 0.5 * torch.randn(V, D, generator=g)
    w[7] *= 40  # a huge-norm row: goes to the side list
    b = 0.1 * torch.randn(V, generator=g) if bias else None
    layer = torchaq.QuantizedSoftmax(w, b, num_subspaces=16 if bits == 4 else 8, bits=bits, progress=False).eval()
    h = w[torch.randint(0, V, (9,), generator=g)] + 0.5 * torch.randn(9, D, generator=g)
    return layer, h


@pytest.fixture(scope="module")
def fitted():
    return {(bits, bias): _layer(bits, bias) for bits in (4, 8) for bias in (False, True)}


def _args(layer, h, candidates=64, exclude=False, shortlist=None, side=True, k=10):
    q = layer.quantizer
    w8, sc = quantize_rows_int8(layer.weight) if shortlist else (None, None)
    scan_bias = layer.scan_bias() if exclude else (None if layer.bias is None else layer.bias.detach())
    side_rows = layer.side_rows if side else layer.side_rows[:0]
    return (h, q.pad(h), q.codebooks, layer.packed_codes, layer.num_classes, candidates, scan_bias,
            layer.weight.detach(), None if layer.bias is None else layer.bias.detach(), side_rows, w8, sc,
            shortlist or 0, k)


def _exact(layer, h):
    return h @ layer.weight.detach().T + (0 if layer.bias is None else layer.bias.detach())


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("exclude", [False, True])
def test_matches_reference_without_shortlist(fitted, bits, bias, exclude):
    layer, h = fitted[(bits, bias)]
    assert layer.side_rows.numel() >= 1
    args = _args(layer, h, exclude=exclude)
    v, i = torch.ops.torchaq.layer_topk(*args)
    vr, ir = layer_topk_reference(*args)
    assert v.shape == i.shape == (9, 10) and v.dtype == torch.float32 and i.dtype == torch.int64
    assert torch.equal(v, vr) and torch.equal(i, ir)
    torch.testing.assert_close(v, _exact(layer, h).gather(1, i), rtol=1e-5, atol=1e-5)
    # the side rows are always among the candidates: the huge row 7 wins for a query along it
    hv = layer.weight.detach()[7:8] / 40
    args = _args(layer, hv, exclude=exclude)
    assert int(torch.ops.torchaq.layer_topk(*args)[1][0, 0]) == 7


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shortlist", [12, 40, 500])
def test_shortlist_keeps_values_exact(fitted, bias, shortlist):
    layer, h = fitted[(4, bias)]
    plain = torch.ops.torchaq.layer_topk(*_args(layer, h, candidates=200))
    args = _args(layer, h, candidates=200, shortlist=shortlist)
    v, i = torch.ops.torchaq.layer_topk(*args)
    vr, ir = layer_topk_reference(*args)
    torch.testing.assert_close(v, _exact(layer, h).gather(1, i), rtol=1e-5, atol=1e-5)
    assert (v[:, :-1] >= v[:, 1:]).all()
    # int8 rows rank well enough that a shortlist of 12 already keeps the top-10 of 200 candidates here
    assert torch.equal(i, plain[1]) and torch.equal(v, plain[0])
    assert torch.equal(i, ir) and torch.equal(v, vr)


def test_shortlist_stage_really_filters():
    # candidates whose int8 ranking is wrong on purpose: row 0's int8 copy says "worst"; a
    # shortlist of 1 then drops it, a shortlist of 2 keeps it
    layer, h = _layer(4, False, seed=1)
    args = list(_args(layer, h[:1], candidates=V, shortlist=1, k=1, side=False))
    best = int(_exact(layer, h[:1]).argmax())
    w8, sc = args[10].clone(), args[11]
    w8[best] = -torch.sign(h[0]).to(torch.int8) * 127
    args[10] = w8
    assert int(torch.ops.torchaq.layer_topk(*args)[1][0, 0]) != best
    args[12] = 2 * V
    assert int(torch.ops.torchaq.layer_topk(*args)[1][0, 0]) == best


@pytest.mark.skipif(not CPU_EXTENSION_LOADED, reason="C++ extension not built")
@pytest.mark.parametrize("shortlist", [None, 16])
def test_every_isa_identical(fitted, shortlist):
    layer, h = fitted[(4, True)]
    args = _args(layer, h, candidates=128, shortlist=shortlist)
    out = {}
    for name in ISAS:
        with isa(name):
            out[name] = torch.ops.torchaq.layer_topk(*args)
    for name in ISAS[1:]:
        assert torch.equal(out[name][0], out["scalar"][0]) and torch.equal(out[name][1], out["scalar"][1])





def test_quantize_rows_int8():
    w = torch.randn(50, 33)
    w[3] = 0
    w8, scale = quantize_rows_int8(w)
    assert w8.dtype == torch.int8 and scale.shape == (50,) and int(w8.abs().max()) == 127
    assert (w - w8.float() * scale[:, None]).abs().le(scale[:, None] / 2 + 1e-7).all()
    assert scale[3] == 1 and (w8[3] == 0).all()


@pytest.mark.parametrize("fn", [torch.ops.torchaq.layer_topk, layer_topk_reference])
def test_bad_inputs(fitted, fn):
    layer, h = fitted[(4, True)]
    good = _args(layer, h, shortlist=16)

    def call(**change):
        names = ["h", "queries", "codebooks", "packed", "num_classes", "candidates", "scan_bias", "weight", "bias",
                 "side_rows", "weight_i8", "row_scale", "shortlist", "k"]
        args = dict(zip(names, good))
        args.update(change)
        return fn(*[args[n] for n in names])

    nan_h = h.clone()
    nan_h[2, 5] = float("nan")
    with pytest.raises(ValueError, match="h contains NaN or Inf"):
        call(h=nan_h, queries=layer.quantizer.pad(nan_h))
    with pytest.raises(ValueError, match="same B"):
        call(queries=layer.quantizer.pad(h[:2]))
    with pytest.raises(ValueError, match="candidates must be >= 1"):
        call(candidates=0)
    with pytest.raises(ValueError, match="k must be >= 1"):
        call(k=0)
    with pytest.raises((ValueError, TypeError), match="side_rows"):
        call(side_rows=layer.side_rows.int())
    with pytest.raises(ValueError, match="go together"):
        call(row_scale=None)
    with pytest.raises(TypeError, match="int8"):
        call(weight_i8=good[10].float())
    with pytest.raises(ValueError, match="shape of weight"):
        call(weight_i8=good[10][:, :5])
    with pytest.raises(ValueError, match="shortlist must be >= 1"):
        call(shortlist=0)
    with pytest.raises(ValueError):
        call(num_classes=V + 100)  # packed does not match
    with pytest.raises(ValueError):
        call(weight=layer.weight.detach()[:, :5])


def test_layer_uses_the_op_and_drops_its_cache(fitted):
    layer, h = copy.deepcopy(fitted[(4, True)][0]), fitted[(4, True)][1]
    layer.shortlist = False
    want = layer.candidate_logits(h, 64, 10, keep=10)[:2]
    got = layer.topk(h, k=10, candidates=64)
    # the same candidates up to the side rows the unbiased scan may repeat: same top-10 here
    assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])
    layer.shortlist = True
    assert torch.equal(layer.topk(h, k=10, candidates=64)[1], want[1])
    # an in-place weight change and a refresh: the cached tensors and int8 rows follow
    with torch.no_grad():
        layer.weight.mul_(2)
    layer.refresh()
    v, i = layer.topk(h, k=10)
    torch.testing.assert_close(v, _exact(layer, h).gather(1, i), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(v, _exact(layer, h).topk(10).values, rtol=1e-5, atol=1e-5)
    # a new parameter (assignment) is picked up too
    layer.weight = torch.nn.Parameter(layer.weight.detach() / 2)
    layer.refresh()
    v, i = layer.topk(h, k=10)
    torch.testing.assert_close(v, _exact(layer, h).gather(1, i), rtol=1e-5, atol=1e-5)


def test_layer_warns_when_the_weight_changed_without_refresh(fitted):
    layer, h = copy.deepcopy(fitted[(4, False)][0]), fitted[(4, False)][1]
    layer.topk(h)  # builds the cache
    with torch.no_grad():
        layer.weight.add_(0.01)
    with pytest.warns(RuntimeWarning, match="stale"):
        v, i = layer.topk(h)
    # the int8 shortlist follows the new weight at once; values are exact logits of the new weight
    torch.testing.assert_close(v, _exact(layer, h).gather(1, i), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not CPU_EXTENSION_LOADED, reason="C++ extension not built")
@pytest.mark.parametrize("k", [5, 64])  # one-pass and two-pass top-k
def test_gfni_scan_equals_the_shift_and_mask_scan(fitted, monkeypatch, k):
    layer, h = fitted[(4, True)]
    lut = layer.quantizer.lut(torch.cat([h, h, h]))
    out = {}
    for flag in ("0", "1"):
        monkeypatch.setenv("TORCHAQ_NO_GFNI", flag)
        out[flag] = ops.lut_topk(lut, layer.packed_codes, layer.num_classes, k, layer.float_bias())
    assert torch.equal(out["0"][0], out["1"][0]) and torch.equal(out["0"][1], out["1"][1])


@pytest.mark.parametrize("side", [False, True])
def test_layer_topk_equals_the_composed_path_with_a_bias(fitted, side):
    # the scan must rank with the layer's bias whether or not there is a side list
    layer, h = copy.deepcopy(fitted[(4, True)][0]), fitted[(4, True)][1]
    if not side:
        layer.side_rows = layer.side_rows[:0]
    layer.shortlist = False
    for cand in (12, 64):
        want = layer.candidate_logits(h, cand, 10, keep=10)[:2]
        got = layer.topk(h, k=10, candidates=cand)
        assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])
