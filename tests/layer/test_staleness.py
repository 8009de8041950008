"""Silent staleness made loud: .data writes, re-armed warnings, torch.compile, and the int8 shortlist cache."""
import ctypes
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


def test_sentinel_bytes_see_one_changed_value_and_hold_no_storage():
    """The CPU check compares the sentinel values as bytes through a view of the weight's memory: one
    changed sentinel value is seen (bf16 too), and the view does not keep a replaced weight alive."""
    from torchaq.layer import staleness

    for dtype in (torch.float32, torch.bfloat16):  # (bytes: any dtype)
        w = torch.randn(V, D, generator=torch.Generator().manual_seed(3)).to(dtype)
        snap = staleness.snapshot(w)
        assert snap.host is not None and staleness.changed(w, snap) is None
        w.data[snap.stride * (snap.count - 1), SENTINEL_COLUMN] += 1  # the last sentinel row's last compared value
        assert "through .data" in staleness.changed(w, snap)
    # strided rows (a transposed weight) take the tensor comparison
    wt = torch.randn(D, V).t()
    snap = staleness.snapshot(wt)
    assert snap.host is None and staleness.changed(wt, snap) is None
    wt.data[0, 0] += 1
    assert "through .data" in staleness.changed(wt, snap)
    # a replaced weight is reported; the snapshot's view refers to no tensor (it would keep a replaced
    # weight's storage alive): its bases end in ctypes memory
    p = torch.nn.Parameter(torch.randn(V, D))
    snap = staleness.snapshot(p)
    chain, base = [], snap.host
    while base is not None:
        chain.append(base)
        base = getattr(base, "base", None)
    assert not any(isinstance(b, torch.Tensor) for b in chain) and isinstance(chain[-1], ctypes.Array), chain
    p.data = torch.randn(V, D)
    assert "replaced" in staleness.changed(p, snap)

SENTINEL_COLUMN = 15
