"""Silent staleness made loud: .data writes, re-armed warnings, torch.compile, and the int8 shortlist cache."""
import warnings

import pytest
import torch

import torchaq

V, D = 1500, 16


def _layer():
    g = torch.Generator().manual_seed(0)
    return torchaq.QuantizedSoftmax(torch.randn(V, D, generator=g), num_subspaces=8, progress=False, fit_iters=1)


def _recall(layer, h, k=10):
    truth = (h @ layer.weight.detach().T).topk(k).indices
    _, got = layer.topk(h, k=k)
    return (got.unsqueeze(2) == truth.unsqueeze(1)).any(2).float().mean().item()


H = torch.randn(64, D, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("how", ["copy_", "assign"])
def test_data_writes_are_seen_and_refresh_rebuilds_everything(how):
    layer = _layer()
    layer.topk(H, k=10)  # builds the int8 shortlist cache
    new = torch.randn(V, D, generator=torch.Generator().manual_seed(9))
    if how == "copy_":
        layer.weight.data.copy_(new)
    else:
        layer.weight.data = new
    with pytest.warns(RuntimeWarning, match="stale index"):
        layer.topk(H, k=10)
    layer.refresh()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _recall(layer, H) >= 0.95  # codes, side list and int8 rows all follow the new weight
    assert torch.equal(layer.packed_codes, layer.quantizer.pack(layer.quantizer.encode(new)))
    layer.weight.data.copy_(torch.randn(V, D, generator=torch.Generator().manual_seed(10)))
    layer.refresh(refit=True)
    assert _recall(layer, H) >= 0.95


def test_every_refresh_rearms_the_warning():
    layer = _layer()
    for step in range(3):
        with torch.no_grad():
            layer.weight.add_(0.05)
        with pytest.warns(RuntimeWarning, match=rf"stale index #{step + 1}"):
            layer.topk(H, k=3)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            layer.sample(H, top_k=3)  # once per change until the next refresh
        layer.refresh()


def test_compiled_call_on_a_stale_index_raises_with_the_fix():
    layer = _layer()
    compiled = torch.compile(lambda x: layer.topk(x, k=5), backend="aot_eager", fullgraph=True)
    for a, b in zip(compiled(H), layer.topk(H, k=5)):
        assert torch.equal(a, b)
    with torch.no_grad():
        layer.weight.mul_(2.0)
    with pytest.raises(RuntimeError, match=r"layer.refresh\(\)"):
        compiled(H)
    layer.refresh()
    for a, b in zip(compiled(H), layer.topk(H, k=5)):
        assert torch.equal(a, b)


def test_dtype_cast_is_not_stale():
    layer = _layer()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer.to(torch.float64).topk(H.double(), k=3)
