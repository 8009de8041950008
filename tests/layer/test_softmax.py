"""torchaq.QuantizedSoftmax: exactness, top-k recall, log-partition, sampling, state, bad inputs."""
import copy
import io

import pytest
import torch
from torch import nn

import torchaq

V, D = 3000, 32


def _structured(seed=0):
    """Clustered class vectors (like real vocabularies) and queries near random classes."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(40, D, generator=gen)
    weight = centres[torch.randint(0, 40, (V,), generator=gen)] + 0.5 * torch.randn(V, D, generator=gen)
    bias = 0.1 * torch.randn(V, generator=gen)
    h = weight[torch.randint(0, V, (64,), generator=gen)] + 0.5 * torch.randn(64, D, generator=gen)
    return weight, bias, h


@pytest.fixture(scope="module")
def data():
    return _structured()


@pytest.fixture(scope="module")
def _fitted_layer(data):
    weight, bias, _ = data
    return torchaq.QuantizedSoftmax(weight, bias, num_subspaces=16, progress=False).eval()


@pytest.fixture
def layer(_fitted_layer):
    """A fresh copy per test (fitting once per module): a test that mutates it cannot leak into others."""
    return copy.deepcopy(_fitted_layer)


def test_forward_is_the_exact_linear_layer(data):
    weight, bias, h = data
    linear = nn.Linear(D, V)
    with torch.no_grad():
        linear.weight.copy_(weight)
        linear.bias.copy_(bias)
    layer = torchaq.QuantizedSoftmax.from_linear(linear, num_subspaces=16, progress=False)
    assert layer.weight is linear.weight and layer.bias is linear.bias  # shared, not copied
    torch.testing.assert_close(layer(h), linear(h))
    torch.testing.assert_close(layer(h.reshape(8, 8, D)), linear(h).reshape(8, 8, V))


def test_topk_recall_and_exact_values(layer, data):
    weight, bias, h = data
    exact = h @ weight.T + bias
    values, idx = layer.topk(h, k=10)
    assert values.shape == idx.shape == (64, 10) and values.dtype == torch.float32
    torch.testing.assert_close(values, exact.gather(1, idx))  # values are exact logits
    assert (values[:, :-1] >= values[:, 1:]).all()
    true = exact.topk(10).indices
    recall = (true.unsqueeze(2) == idx.unsqueeze(1)).any(2).float().mean()
    assert recall >= 0.99
    # few candidates: the LUT ranking alone decides, recall drops but stays useful
    _, idx_small = layer.topk(h, k=10, candidates=10)
    assert (true.unsqueeze(2) == idx_small.unsqueeze(1)).any(2).float().mean() > 0.3
    # leading dims are kept
    v3, i3 = layer.topk(h.reshape(4, 16, D), k=3)
    assert v3.shape == (4, 16, 3)
    torch.testing.assert_close(v3.reshape(64, 3), values[:, :3])


def test_log_softmax_topk_close_to_exact(layer, data):
    weight, bias, h = data
    exact = torch.log_softmax(h @ weight.T + bias, dim=1)
    logp, idx = layer.log_softmax_topk(h, k=5)
    err = (logp - exact.gather(1, idx)).abs()
    assert err.max() < 0.02, err.max()


def test_sampling_matches_exact_top_k_distribution(layer, data):
    """Chi-square test of 20000 draws against exact top-k sampling from the dense logits."""
    weight, bias, h = data
    row = h[:1]
    exact = (row @ weight.T + bias)[0] / 0.7
    top = exact.topk(8)
    probs = torch.softmax(top.values, 0)
    gen = torch.Generator().manual_seed(0)
    draws = layer.sample(row.expand(20000, D), top_k=8, temperature=0.7, generator=gen)
    counts = torch.stack([(draws == c).sum() for c in top.indices]).double()
    assert counts.sum() == 20000  # nothing outside the exact top-8
    expected = probs.double() * 20000
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < 24.3, chi2  # df = 7, p = 0.001


def test_sampling_top_p_temperature_and_generator(layer, data):
    _, _, h = data
    a = layer.sample(h, top_k=20, generator=torch.Generator().manual_seed(1))
    b = layer.sample(h, top_k=20, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.shape == (64,) and a.dtype == torch.int64
    greedy = layer.topk(h, k=1)[1][:, 0]
    assert torch.equal(layer.sample(h, top_k=20, top_p=1e-6), greedy)  # top_p -> only the best
    assert torch.equal(layer.sample(h, top_k=1), greedy)
    assert layer.sample(h.reshape(2, 32, D), top_k=5).shape == (2, 32)


def test_state_dict_round_trip(layer, data):
    _, _, h = data
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    buffer.seek(0)
    fresh = torchaq.QuantizedSoftmax(torch.zeros(V, D), torch.zeros(V), num_subspaces=16, fit=False)
    fresh.load_state_dict(torch.load(buffer))
    for a, b in zip(fresh.topk(h, k=10), layer.topk(h, k=10)):
        assert torch.equal(a, b)
    assert "V=3000, d=32, bits=4, subspaces=16" in repr(fresh)


def test_train_mode_gradients_and_refresh(data):
    weight, bias, h = data
    layer = torchaq.QuantizedSoftmax(weight, bias, num_subspaces=16, progress=False)
    reference = nn.Linear(D, V)
    with torch.no_grad():
        reference.weight.copy_(weight)
        reference.bias.copy_(bias)
    target = torch.randint(0, V, (64,))
    nn.functional.cross_entropy(layer(h), target).backward()
    nn.functional.cross_entropy(reference(h), target).backward()
    torch.testing.assert_close(layer.weight.grad, reference.weight.grad)
    torch.testing.assert_close(layer.bias.grad, reference.bias.grad)
    # an optimiser moves the weights; refresh() brings the index up to date
    opt = torch.optim.SGD(layer.parameters(), lr=50.0)
    opt.step()
    before = layer.packed_codes.clone()
    layer.refresh()
    assert not torch.equal(before, layer.packed_codes)
    exact = layer(h).detach()
    _, idx = layer.topk(h, k=10)
    assert (exact.topk(10).indices.unsqueeze(2) == idx.unsqueeze(1)).any(2).float().mean() >= 0.99


def test_tied_weights_without_bias():
    weight, _, h = _structured(1)
    embedding = nn.Embedding(V, D)
    with torch.no_grad():
        embedding.weight.copy_(weight)
    layer = torchaq.QuantizedSoftmax(embedding.weight, num_subspaces=8, bits=8, progress=False)
    assert layer.weight is embedding.weight and layer.bias is None
    values, idx = layer.topk(h, k=5)
    torch.testing.assert_close(values, (h @ weight.T).gather(1, idx))


def test_low_precision_inputs(layer, data):
    weight, bias, h = data
    for dtype in (torch.bfloat16, torch.float16):
        values, idx = layer.topk(h.to(dtype), k=5)
        assert values.dtype == torch.float32
        torch.testing.assert_close(values, (h.to(dtype).float() @ weight.T + bias).gather(1, idx))
    low = copy.deepcopy(layer).to(torch.bfloat16)
    assert low.weight.dtype == torch.bfloat16
    # the codebooks stay float32 (a bf16 round trip would move every codeword): same index, same LUT
    assert low.quantizer.codebooks.dtype == torch.float32
    assert torch.equal(low.quantizer.codebooks, layer.quantizer.codebooks)
    h16 = h.to(torch.bfloat16)
    torch.testing.assert_close(low.quantizer.lut(h16), layer.quantizer.lut(h16))
    values, idx = low.topk(h16, k=5)
    assert values.dtype == torch.float32
    # values are the exact logits of the bf16 layer (computed in float32), and the top-5 is the
    # bf16 layer's exact top-5 (up to ties created by bf16 rounding)
    exact16 = h16.float() @ low.weight.float().T + low.bias.float()
    torch.testing.assert_close(values, exact16.gather(1, idx))
    torch.testing.assert_close(values, exact16.topk(5).values)


def test_torch_compile_topk_and_sample(layer, data):
    _, _, h = data
    topk = torch.compile(lambda x: layer.topk(x, k=5), backend="aot_eager")
    for a, b in zip(topk(h), layer.topk(h, k=5)):
        assert torch.equal(a, b)
    sample = torch.compile(lambda x, g: layer.sample(x, top_k=5, generator=g), backend="aot_eager")
    drawn = sample(h, torch.Generator().manual_seed(0))
    assert drawn.shape == (64,)
    top5 = layer.topk(h, k=5)[1]
    assert (drawn.unsqueeze(1) == top5).any(1).all()


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda l, h: l.topk(h[:, :5]), "last dimension d=32"),
        (lambda l, h: l.topk(h, k=0), r"k must be an integer in \[1, V=3000\]"),
        (lambda l, h: l.topk(h, k=V + 1), "k must be"),
        (lambda l, h: l.topk(h, k=20, candidates=10), "candidates=10 must be >= k=20"),
        (lambda l, h: l.sample(h, top_p=0.0), "top_p"),
        (lambda l, h: l.sample(h, top_p=1.5), "top_p"),
        (lambda l, h: l.sample(h, temperature=0.0), "temperature"),
        (lambda l, h: l.sample(h, temperature=-1.0), "temperature"),
        (lambda l, h: l.sample(h, top_k=-1), "top_k"),  # top_k=0 now means "no top-k" (Hugging Face)
        (lambda l, h: l.sample(h, top_k=V + 1), "top_k"),
        (lambda l, h: l.sample(h, top_k=0, method="candidates"), "top_k"),  # the old sampler still refuses it
        (lambda l, h: l.topk(torch.full_like(h, float("nan"))), "NaN"),
        (lambda l, h: l.topk(h.index_fill(1, torch.tensor([3]), float("inf"))), "h contains NaN or Inf"),
        (lambda l, h: l.sample(h.index_fill(1, torch.tensor([3]), float("nan"))), "h contains NaN or Inf"),
        (lambda l, h: l.topk(h.to("meta")), "is on meta but the layer is on cpu"),
        (lambda l, h: l.topk(h.long()), "floating-point"),
    ],
)
def test_bad_inputs(layer, data, call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call(layer, data[2])


def test_bad_constructor_inputs():
    with pytest.raises(ValueError, match="weight"):
        torchaq.QuantizedSoftmax(torch.zeros(10))
    with pytest.raises(ValueError, match="bias"):
        torchaq.QuantizedSoftmax(torch.zeros(100, 8), torch.zeros(99), fit=False)
    with pytest.raises(ValueError, match="candidates"):
        torchaq.QuantizedSoftmax(torch.zeros(100, 8), candidates=0, fit=False)
    with pytest.raises(TypeError, match="nn.Linear"):
        torchaq.QuantizedSoftmax.from_linear(nn.Embedding(5, 5))
