"""QuantizedSoftmax built like nn.Linear, skeletons from torch.empty, and state dicts refused at load time."""
import io
import math

import pytest
import torch
from torch import nn

import torchaq
from torchaq.quantizers import extra_state

V, D = 300, 16


def test_nn_linear_form_fits_on_first_use():
    torch.manual_seed(0)
    layer = torchaq.QuantizedSoftmax(D, V, num_subspaces=8, progress=False, fit_iters=1)
    torch.manual_seed(0)
    ref = nn.Linear(D, V)
    assert layer.in_features == D and layer.out_features == V and layer.bias is not None
    assert torch.equal(layer.weight, ref.weight) and torch.equal(layer.bias, ref.bias)  # nn.Linear's init
    assert not layer.fitted
    h = torch.randn(4, D)
    torch.testing.assert_close(layer(h), ref(h))
    values, idx = layer.topk(h, k=3)  # fits here
    assert layer.fitted
    torch.testing.assert_close(values, ref(h).detach().gather(1, idx))
    no_bias = torchaq.QuantizedSoftmax(D, V, bias=False, dtype=torch.float64, progress=False)
    assert no_bias.bias is None and no_bias.weight.dtype == torch.float64
    assert torchaq.QuantizedSoftmax(D, V, False).bias is None
    explicit = torchaq.QuantizedSoftmax(D, V, num_subspaces=8, progress=False, fit_iters=1).fit()
    assert explicit.fitted


@pytest.mark.parametrize(
    "args,kwargs,match",
    [
        ((0, V), {}, "in_features"),
        ((D, 0), {}, "out_features"),
        ((D, 2.5), {}, "out_features"),
        ((D, V), dict(bias=torch.zeros(V)), "bias must be True or False"),
        ((torch.zeros(V, D), 7), {}, "out_features is only for"),
        ((torch.zeros(V, D), torch.zeros(V)), dict(bias=torch.zeros(V)), "bias given twice"),
        ((torch.zeros(V, D),), dict(bias=True), "bias=True/False"),
        ((torch.zeros(V, D),), dict(dtype=torch.float64), "device= and dtype="),
        ((torch.zeros(V, D, dtype=torch.int64),), {}, "weight must be a floating-point"),
    ],
)
def test_construction_errors_name_the_argument(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        torchaq.QuantizedSoftmax(*args, fit=False, **kwargs)


def test_skeleton_from_torch_empty_loads_a_state_dict():
    layer = torchaq.QuantizedSoftmax(torch.randn(V, D), torch.randn(V), num_subspaces=8, progress=False, fit_iters=1)
    garbage_w = torch.full((V, D), float("nan"))
    skeleton = torchaq.QuantizedSoftmax(garbage_w, torch.full((V,), float("inf")), num_subspaces=8, fit=False)
    skeleton.load_state_dict(layer.state_dict())
    h = torch.randn(5, D)
    for a, b in zip(skeleton.topk(h, k=4), layer.topk(h, k=4)):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="bias contains NaN or Inf"):
        torchaq.QuantizedSoftmax(torch.randn(V, D), torch.full((V,), float("inf")), num_subspaces=8).fit()


@pytest.mark.parametrize(
    "key,value,match",
    [
        ("side_rows", torch.tensor([3, V]), r"side_rows: rows must lie in \[0, V=300\)"),
        ("side_rows", torch.tensor([-1]), "side_rows"),
        ("side_rows", torch.tensor([4, 4]), "must not repeat"),
        ("weight", None, "weight: holds NaN or Inf"),
        ("bias", None, "bias: holds NaN or Inf"),
        ("residual_norms", torch.full((V,), -1.0), "residual_norms"),
    ],
)
def test_bad_state_dict_is_refused_at_load_naming_the_key(key, value, match):
    layer = torchaq.QuantizedSoftmax(torch.randn(V, D), torch.randn(V), num_subspaces=8, progress=False, fit_iters=1)
    state = layer.state_dict()
    if value is None:
        value = state[key].clone()
        value.view(-1)[7] = math.nan
    state[key] = value
    fresh = torchaq.QuantizedSoftmax(torch.empty(V, D), torch.empty(V), num_subspaces=8, fit=False)
    with pytest.raises(RuntimeError, match=match):
        fresh.load_state_dict(state)


def test_state_dict_holds_only_tensors_and_old_dict_extra_state_loads():
    layer = torchaq.QuantizedSoftmax(torch.randn(V, D), num_subspaces=8, eta=2.0, progress=False, fit_iters=1)
    state = layer.state_dict()
    assert all(torch.is_tensor(v) for v in state.values())
    safetensors_torch = pytest.importorskip("safetensors.torch")
    blob = safetensors_torch.save({k: v.contiguous() for k, v in state.items()})
    fresh = torchaq.QuantizedSoftmax(torch.empty(V, D), num_subspaces=8, fit=False)
    fresh.load_state_dict(safetensors_torch.load(blob))
    assert fresh.quantizer.rule == layer.quantizer.rule and fresh.fitted
    # a checkpoint written when the extra state was a dict still loads
    state["quantizer._extra_state"] = {"fitted": True, "rule": ("eta", 2.0), "calibration": None, "fit_dtype": "float32"}
    older = torchaq.QuantizedSoftmax(torch.empty(V, D), num_subspaces=8, fit=False)
    older.load_state_dict(state)
    assert older.quantizer.rule == layer.quantizer.rule
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    buffer.seek(0)
    assert torch.load(buffer)["quantizer._extra_state"].dtype == torch.int64


def test_extra_state_round_trips_calibration():
    q = torchaq.AnisotropicPQ(8, 4, threshold=0.3)
    q.fit(torch.randn(300, 8), queries=torch.randn(100, 8), progress=False, iters=1)
    fitted, rule, calibration, dtype = extra_state.decode(q.get_extra_state())
    assert fitted and rule == q.rule and dtype == torch.float32
    assert calibration.keys() == q.calibration.keys()
    assert all(abs(calibration[k] - q.calibration[k]) < 1e-12 for k in calibration)
    with pytest.raises(ValueError, match="extra state"):
        extra_state.decode(torch.zeros(3))
