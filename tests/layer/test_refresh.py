"""QuantizedSoftmax.refresh(): incremental re-encoding and the stale-index warning."""
import io
import warnings

import pytest
import torch
from torch import nn

import torchaq
from torchaq import ops
from torchaq.layer import incremental
from torchaq.layer import side_list as outliers

V, D = 1200, 16


def _layer(bits=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(20, D, generator=gen)
    weight = centres[torch.randint(0, 20, (V,), generator=gen)] + 0.5 * torch.randn(V, D, generator=gen)
    return torchaq.QuantizedSoftmax(weight, num_subspaces=8, bits=bits, eta=2.0, progress=False, fit_iters=1)


def _full_codes(layer):
    return layer.quantizer.pack(layer.quantizer.encode(layer.weight.detach()))


@pytest.mark.parametrize("bits", [4, 8])
def test_incremental_refresh_equals_full_reencode(bits, monkeypatch):
    layer = _layer(bits)
    encoded = []
    original = layer.quantizer.encode
    monkeypatch.setattr(layer.quantizer, "encode", lambda x: encoded.append(x.shape[0]) or original(x))
    layer.refresh()  # nothing changed: no encoding at all
    assert encoded == []
    rows = torch.tensor([0, 5, 31, 32, 33, 700, V - 1])
    with torch.no_grad():
        layer.weight[rows] += 3 * torch.randn(len(rows), D, generator=torch.Generator().manual_seed(1))
    before = layer.packed_codes.clone()
    layer.refresh()
    assert encoded == [len(rows)]  # only the moved rows
    assert not torch.equal(before, layer.packed_codes)
    monkeypatch.undo()
    assert torch.equal(layer.packed_codes, _full_codes(layer))
    # an optimiser step that touches every row: all re-encoded, still equal to a full encode
    layer.weight.grad = torch.randn(V, D)
    torch.optim.SGD([layer.weight], lr=0.5).step()
    layer.refresh()
    assert torch.equal(layer.packed_codes, _full_codes(layer))
    # ... and the side list and residual norms of that full pass are the side-list rule's
    rule_side, rule_norms = _side_rows_by_rule(layer)
    assert torch.equal(layer.side_rows, rule_side) and torch.equal(layer.residual_norms, rule_norms)


def _side_rows_by_rule(layer):
    """:func:`torchaq.layer.side_list.select_side_rows` (no queries) and the residual norms, from the layer's codes."""
    codes = ops.unpack_codes(layer.packed_codes, layer.quantizer.num_subspaces, layer.quantizer.bits, layer.num_classes)
    recon = layer.quantizer.decode(codes, dtype=torch.float32)
    weight = layer.weight.detach()
    return outliers.select_side_rows(weight, recon), outliers.residual_norms(weight, recon)


def test_side_rows_with_queries_take_their_observed_errors_in_one_decode(monkeypatch):
    """refresh_side_rows(queries) is select_side_rows with the queries' observed errors; the norms and
    error scales are those of a refresh; one decode of all rows; bad queries change nothing."""
    layer = _layer()
    queries = torch.randn(40, D, generator=torch.Generator().manual_seed(2))
    codes = ops.unpack_codes(layer.packed_codes, layer.quantizer.num_subspaces, layer.quantizer.bits, layer.num_classes)
    recon = layer.quantizer.decode(codes, dtype=torch.float32)
    want = outliers.select_side_rows(layer.weight.detach(), recon, queries)
    scales = layer.error_scales.clone()
    before = layer.side_rows.clone()
    with pytest.raises(ValueError, match="queries"):
        layer.refresh_side_rows(torch.full((3, D), float("nan")))
    assert torch.equal(layer.side_rows, before)
    decoded = []
    original = layer.quantizer.decode
    monkeypatch.setattr(layer.quantizer, "decode", lambda c, dtype=None: decoded.append(c.shape[0]) or original(c, dtype))
    assert torch.equal(layer.refresh_side_rows(queries), want)
    assert decoded == [V]
    assert torch.equal(layer.side_rows, want)
    torch.testing.assert_close(layer.residual_norms, outliers.residual_norms(layer.weight.detach(), recon))
    torch.testing.assert_close(layer.error_scales, scales)


def test_incremental_side_rows_equal_the_full_pass(monkeypatch):
    """The side list and residual norms after an incremental refresh equal refresh_side_rows()'s,
    and the incremental refresh does not decode all rows."""
    layer = _layer()
    rows = torch.tensor([3, 64, 65, 900])
    with torch.no_grad():
        layer.weight[rows] *= 40  # huge rows: they must enter the side list
    decoded = []
    original = layer.quantizer.decode
    monkeypatch.setattr(layer.quantizer, "decode", lambda c, dtype=None: decoded.append(c.shape[0]) or original(c, dtype))
    layer.refresh()
    assert decoded == [len(rows)]
    monkeypatch.undo()
    side, norms = layer.side_rows.clone(), layer.residual_norms.clone()
    assert set(rows.tolist()) <= set(side.tolist())
    rule_side, rule_norms = _side_rows_by_rule(layer)
    assert torch.equal(side, rule_side)
    torch.testing.assert_close(norms, rule_norms)
    layer.refresh_side_rows()
    assert torch.equal(side, layer.side_rows)
    torch.testing.assert_close(norms, layer.residual_norms)
    # a version bump with no real change keeps the list
    with torch.no_grad():
        layer.weight.add_(0.0)
    layer.refresh()
    assert torch.equal(side, layer.side_rows)


def test_refit_and_new_codebooks_reencode_everything(monkeypatch):
    layer = _layer()
    with torch.no_grad():
        layer.quantizer.codebooks.mul_(1.01)  # codebooks changed in place: incremental is invalid
    layer.refresh()
    assert torch.equal(layer.packed_codes, _full_codes(layer))
    layer.refresh(refit=True)
    assert torch.equal(layer.packed_codes, _full_codes(layer))


def test_write_packed_rows_matches_pack_codes():
    gen = torch.Generator().manual_seed(2)
    for bits, m in ((4, 7), (4, 8), (8, 5)):
        codes = torch.randint(0, 2**bits, (100, m), generator=gen, dtype=torch.uint8)
        packed = ops.pack_codes(torch.zeros_like(codes), bits)
        incremental.write_packed_rows(packed, torch.arange(100), codes, bits)
        assert torch.equal(packed, ops.pack_codes(codes, bits))


def test_stale_weight_warns_once():
    layer = _layer()
    h = torch.randn(4, D)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer.topk(h, k=3)  # fresh: no warning
    embedding = nn.Embedding(V, D)
    tied = torchaq.QuantizedSoftmax(embedding.weight, num_subspaces=8, progress=False, fit_iters=1)
    with torch.no_grad():
        embedding.weight.mul_(1.5)  # the tied embedding changes in place
    with pytest.warns(RuntimeWarning, match=r"refresh\(\)"):
        tied.topk(h, k=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tied.log_softmax_topk(h, k=3)  # only once
        tied.sample(h, top_k=3)
        tied.refresh()
        tied.topk(h, k=3)
    with pytest.warns(RuntimeWarning, match=r"refresh\(\)"):
        other = _layer()
        with torch.no_grad():
            other.weight.add_(0.1)
        other.sample(h, top_k=3)


def test_state_dict_load_is_fresh():
    layer = _layer()
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    buffer.seek(0)
    fresh = torchaq.QuantizedSoftmax(torch.zeros(V, D), num_subspaces=8, eta=2.0, fit=False)
    fresh.load_state_dict(torch.load(buffer))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        values, idx = fresh.topk(torch.randn(3, D), k=5)
    fresh.refresh()  # full re-encode after a load: same codes
    assert torch.equal(fresh.packed_codes, layer.packed_codes)
