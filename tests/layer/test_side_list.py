"""Rows the codes cannot represent: the exact side list, the residual bound, the coarse-LUT
fallback of the C++ scan, and the corrected log-partition (torchaq/outliers.py, partition.py)."""
import io

import pytest
import torch

import torchaq
from torchaq import ops
from torchaq import backends
from torchaq.layer import side_list as outliers
from torchaq.ops import lut_topk_reference
from torchaq.layer.partition import log_partition

V, D = 5000, 64


def _clustered(noise=0.5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(50, D, generator=gen)
    weight = centres[torch.randint(0, 50, (V,), generator=gen)] + noise * torch.randn(V, D, generator=gen)
    h = weight[torch.randint(0, V, (200,), generator=gen)] + 0.5 * torch.randn(200, D, generator=gen)
    return weight, h


def _recall(idx, exact, k):
    true = exact.topk(k).indices
    return (true.unsqueeze(2) == idx.unsqueeze(1)).any(2).float().mean().item()


@pytest.fixture(scope="module")
def clustered():
    return _clustered()


@pytest.fixture(scope="module")
def planted():
    """Tight clusters plus 10 rows of median norm along 2-coordinate directions no cluster covers."""
    weight, _ = _clustered(noise=0.15)
    rows = torch.arange(10) * 37 + 5
    dirs = torch.zeros(10, D)
    dirs[torch.arange(10), torch.arange(10) * 6] = 1.0
    dirs[torch.arange(10), torch.arange(10) * 6 + 1] = 1.0
    dirs = dirs / dirs.norm(dim=1, keepdim=True)
    weight[rows] = dirs * weight.norm(dim=1).median()
    gen = torch.Generator().manual_seed(3)
    h = 2 * dirs + 0.05 * torch.randn(10, D, generator=gen)  # queries aimed at the planted rows
    bias = 0.01 * torch.randn(V, generator=gen)
    layer = torchaq.QuantizedSoftmax(weight, bias, progress=False, fit_iters=2)
    return layer, weight, bias, rows, h


@pytest.fixture(scope="module")
def base_recall(clustered):
    weight, h = clustered
    base = torchaq.QuantizedSoftmax(weight, progress=False, fit_iters=2)
    return _recall(base.topk(h, 10)[1], h @ weight.T, 10)


@pytest.mark.parametrize("factor", [30, 100, 1000])
def test_huge_norm_row_does_not_hurt_the_other_queries(clustered, base_recall, factor):
    weight, h = clustered
    big = weight.clone()
    big[123] *= factor
    layer = torchaq.QuantizedSoftmax(big, progress=False, fit_iters=2)
    assert 123 in layer.side_rows.tolist()
    exact = h @ big.T
    _, idx = layer.topk(h, 10)
    assert _recall(idx, exact, 10) >= base_recall - 0.005
    # the queries whose top-10 the huge row is not in: their recall is the same as without it
    other = (exact.topk(10).indices != 123).all(1)
    assert other.sum() > 20
    assert _recall(idx[other], exact[other], 10) >= base_recall - 0.005


@pytest.mark.skipif(not backends.CPU_EXTENSION_LOADED, reason="C++ extension not built")
@pytest.mark.parametrize("factor", [100, 1000])
def test_cpp_scan_falls_back_when_a_codeword_takes_the_lut_range(clustered, factor):
    """The huge row *inside* the codebooks (a bare quantizer): the uint8 table cannot resolve the
    rest, so the C++ scan must fall back to exact float sums instead of losing recall."""
    weight, h = clustered
    big = weight.clone()
    big[123] *= factor
    q = torchaq.AnisotropicPQ(D, 32, threshold=None).fit(big, iters=1, progress=False)
    packed = q.pack(q.encode(big))
    lut = q.lut(h)
    values, idx = ops.lut_topk(lut, packed, V, 10)
    ref_values, ref_idx = lut_topk_reference(lut, packed, V, 10)
    assert _recall(idx, ops.lut_score(lut, packed, V), 10) >= 0.99
    torch.testing.assert_close(values, ref_values, rtol=1e-5, atol=1e-3)


def test_planted_rows_are_found_and_kept(planted):
    layer, weight, bias, rows, h = planted
    assert set(rows.tolist()) <= set(layer.side_rows.tolist())
    assert layer.side_rows.numel() <= outliers.default_max_rows(V)
    exact = h @ weight.T + bias
    assert torch.equal(exact.argmax(1), rows)  # the planted rows are the right answers
    for candidates in (None, 8):
        values, idx = layer.topk(h, k=1, candidates=candidates)
        assert torch.equal(idx[:, 0], rows)
        torch.testing.assert_close(values[:, 0], exact.gather(1, rows[:, None])[:, 0])
    # without the side list the LUT ranking alone misses some of them
    side = layer.side_rows
    try:
        layer.side_rows = side[:0]
        assert not torch.equal(layer.topk(h, k=1, candidates=8)[1][:, 0], rows)
    finally:
        layer.side_rows = side
    # sample and log_softmax_topk see them too; candidates never repeat a class
    assert torch.equal(layer.sample(h, top_k=1), rows)
    logp, idx = layer.log_softmax_topk(h, k=1)
    assert torch.equal(idx[:, 0], rows)
    torch.testing.assert_close(logp[:, 0], torch.log_softmax(exact, 1).gather(1, rows[:, None])[:, 0], atol=2e-3, rtol=0)
    _, classes, _ = layer.candidate_logits(h, k=1)
    assert all(len(set(r.tolist())) == r.numel() for r in classes)


def test_side_list_survives_state_dict_and_refresh(planted):
    layer, weight, bias, rows, h = planted
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    buffer.seek(0)
    fresh = torchaq.QuantizedSoftmax(torch.zeros(V, D), torch.zeros(V), fit=False)
    fresh.load_state_dict(torch.load(buffer))
    assert torch.equal(fresh.side_rows, layer.side_rows)
    assert torch.equal(fresh.residual_norms, layer.residual_norms)
    for a, b in zip(fresh.topk(h, k=3), layer.topk(h, k=3)):
        assert torch.equal(a, b)
    # refresh keeps it current: same weights, same list; a new outlier joins after it appears
    fresh.refresh()
    assert torch.equal(fresh.side_rows, layer.side_rows)
    with torch.no_grad():
        fresh.weight[777] *= 50
    fresh.refresh()
    assert 777 in fresh.side_rows.tolist() and set(rows.tolist()) <= set(fresh.side_rows.tolist())


@pytest.mark.parametrize("proposal", ["lut", "candidates"])
def test_sampled_softmax_hard_set_holds_the_side_rows(planted, monkeypatch, proposal):
    layer, _, _, rows, h = planted
    from torchaq.training import lut_proposal
    from torchaq.training import sampled_softmax

    seen = {}
    module, name, pos = ((lut_proposal, "lut_cv_loss", 4) if proposal == "lut"
                         else (sampled_softmax, "sampled_softmax_loss", 6))
    original = getattr(module, name)

    def spy(*args, **kwargs):
        seen["hard"] = args[pos]
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)
    loss = layer.sampled_softmax_loss(h, rows, num_sampled=64, generator=torch.Generator().manual_seed(0),
                                      proposal=proposal)
    hard = seen["hard"]
    assert torch.isfinite(loss)
    assert all(set(layer.side_rows.tolist()) <= set(r.tolist()) for r in hard)
    assert all(len(set(r.tolist())) == r.numel() for r in hard)  # distinct classes per row


@pytest.mark.parametrize("dense_fraction", [1, 8])  # 1: always the gather path
def test_bound_mode_is_exact(clustered, dense_fraction, monkeypatch):
    monkeypatch.setattr(outliers, "DENSE_FRACTION", dense_fraction)
    weight, h = clustered
    bias = 0.1 * torch.randn(V, generator=torch.Generator().manual_seed(5))
    layer = torchaq.QuantizedSoftmax(weight, bias, num_subspaces=16, progress=False, fit_iters=1)
    exact = h @ weight.T + bias
    true_v, true_i = exact.topk(10)
    # few candidates: the plain scan misses rows, the bound completes the list
    _, plain = layer.topk(h, k=10, candidates=10)
    assert _recall(plain, exact, 10) < 0.99
    values, idx = layer.topk(h, k=10, candidates=10, guarantee="bound")
    assert _recall(idx, exact, 10) == 1.0
    torch.testing.assert_close(values, true_v)
    logits, classes, lut = layer.candidate_logits(h, candidates=10, k=10)
    scores = ops.lut_score(lut, layer.packed_codes, layer.num_classes, layer.float_bias())
    bias = None if layer.bias is None else layer.bias.detach()
    _, _, extra = outliers.bound_complete(h, layer.weight.detach(), bias, scores, layer.residual_norms, logits, classes, 10)
    assert (extra > 0).any()
    with pytest.raises(ValueError, match="guarantee"):
        layer.topk(h, k=10, guarantee="exact")


def test_log_partition_unbiased_on_flat_softmax():
    """Unclustered rows, coarse codes, flat softmax (entropy ~6.5 nats): the LUT mass of the rest
    alone underestimates log Z by ~0.3 nats; the exactly scored sample removes the bias."""
    gen = torch.Generator().manual_seed(0)
    weight, h = torch.randn(V, D, generator=gen), 0.25 * torch.randn(200, D, generator=gen)
    layer = torchaq.QuantizedSoftmax(weight, num_subspaces=16, progress=False, fit_iters=1)
    exact = torch.log_softmax(h @ weight.T, dim=1)
    logp, idx = layer.log_softmax_topk(h, k=5)
    err = logp - exact.gather(1, idx)
    assert err.mean().abs() < 0.05, err.mean()
    # the uncorrected estimate on the same candidates is biased
    logits, classes, lut = layer.candidate_logits(h, k=5)
    scores = ops.lut_score(lut, layer.packed_codes, V)
    plain = log_partition(h, weight, None, logits, classes, scores, samples=0)
    corrected = log_partition(h, weight, None, logits, classes, scores)
    true = torch.logsumexp(h @ weight.T, dim=1)
    assert (true - plain).mean() > 0.1 and (true - corrected).mean().abs() < 0.05


def test_log_partition_peaked_softmax(clustered):
    weight, h = clustered
    layer = torchaq.QuantizedSoftmax(weight, progress=False, fit_iters=1)
    for scale in (0.25, 1.0):  # entropy ~3.4 and ~0.6 nats
        exact = torch.log_softmax((h * scale) @ weight.T, dim=1)
        logp, idx = layer.log_softmax_topk(h * scale, k=5)
        err = logp - exact.gather(1, idx)
        assert err.mean().abs() < 0.005 and err.abs().max() < 0.02, (scale, err.mean(), err.abs().max())


@pytest.mark.parametrize("backend", ["reference", "cpp", "triton"])
def test_scan_bias_keeps_side_rows_out_on_every_backend(backend):
    """The side rows' scan bias: no backend ranks them, and the rest keeps its exact order."""
    gen = torch.Generator().manual_seed(0)
    n, m, k = 300, 4, 20
    lut = torch.randn(5, m, 16, generator=gen)
    packed = ops.pack_codes_reference(torch.randint(0, 16, (n, m), generator=gen, dtype=torch.uint8), 4)
    side = torch.tensor([3, 50, 77, 299])
    bias = outliers.scan_bias(0.1 * torch.randn(n, generator=gen), side, n, "cpu")
    if backend == "triton":
        pytest.importorskip("triton")
        from torchaq.triton_kernels import triton_lut_topk as scan
    elif backend == "cpp":
        if not backends.CPU_EXTENSION_LOADED:
            pytest.skip("C++ extension not built")
        scan = ops.lut_topk
    else:
        scan = lut_topk_reference
    _, idx = scan(lut, packed, n, k, bias)
    assert not torch.isin(idx, side).any()
    full = ops.lut_score_reference(lut, packed, n, bias)
    if backend == "cpp":  # uint8 LUT: the set is approximate, within the quantization error
        assert _recall(idx, full, k) >= 0.9
    else:
        assert torch.equal(idx.sort(1).values, full.topk(k).indices.sort(1).values)


def test_planted_rows_found_on_the_reference_backend(planted, monkeypatch):
    layer, weight, bias, rows, h = planted
    monkeypatch.setattr(ops, "lut_topk", lut_topk_reference)
    monkeypatch.setattr(ops, "lut_score", ops.lut_score_reference)
    _, idx = layer.topk(h, k=1, candidates=8)
    assert torch.equal(idx[:, 0], rows)
    values, idx = layer.topk(h, k=3, candidates=3, guarantee="bound")
    exact = h @ weight.T + bias
    torch.testing.assert_close(values, exact.topk(3).values)


def test_torch_compile_topk_with_side_rows(planted):
    layer, _, _, rows, h = planted
    compiled = torch.compile(lambda x: layer.topk(x, k=2), backend="aot_eager")
    for a, b in zip(compiled(h), layer.topk(h, k=2)):
        assert torch.equal(a, b)
