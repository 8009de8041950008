"""QuantizedSoftmax(quantizer="aq"): outlier rows, the sampled softmax and the vocabulary-parallel layer on additive codes."""
from __future__ import annotations

from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from conftest import spawn_ranks

import torchaq

V, D, M = 1200, 32, 8
KW = dict(num_subspaces=M, quantizer="aq", fit_iters=2, progress=False, seed=0)


pytestmark = pytest.mark.usefixtures("one_thread")


def _data(seed=0, noise=0.5, batch=64):
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(30, D, generator=gen)
    weight = centres[torch.randint(0, 30, (V,), generator=gen)] + noise * torch.randn(V, D, generator=gen)
    bias = 0.05 * torch.randn(V, generator=gen)
    target = torch.randint(0, V, (batch,), generator=gen)
    h = 0.5 * (weight[target] + 0.5 * torch.randn(batch, D, generator=gen))
    return weight, bias, h, target


def _recall(idx, exact, k):
    true = exact.topk(k).indices
    return (true.unsqueeze(2) == idx.unsqueeze(1)).any(2).float().mean().item()


@pytest.fixture(scope="module")
def layer():
    weight, bias, _, _ = _data()
    return torchaq.QuantizedSoftmax(weight, bias, **KW)


# --------------------------------------------------------------------------------------------
# outlier rows
# --------------------------------------------------------------------------------------------
def test_huge_norm_row_goes_to_the_side_list_and_recall_holds(layer):
    weight, bias, h, _ = _data()
    base = _recall(layer.topk(h, 10)[1], h @ weight.T + bias, 10)
    big = weight.clone()
    big[123] *= 100
    big_layer = torchaq.QuantizedSoftmax(big, bias, **KW)
    assert isinstance(big_layer.quantizer, torchaq.AnisotropicAQ)
    assert 123 in big_layer.side_rows.tolist()
    exact = h @ big.T + bias
    values, idx = big_layer.topk(h, 10)
    torch.testing.assert_close(values, exact.gather(1, idx), rtol=1e-5, atol=1e-4)  # logits ~ 40
    hit = exact.topk(10).indices.eq(123).any(1)
    assert hit.any() and (~hit).sum() > 10
    assert (idx[hit] == 123).any(1).all()  # where the huge row belongs to the top-10, it is found
    # the other queries keep the recall of the layer without the huge row
    assert _recall(idx[~hit], exact[~hit], 10) >= base - 0.03


def test_planted_rows_are_found_with_additive_codes():
    """Rows along directions no cluster covers: top-1 finds them."""
    weight, bias, _, _ = _data(noise=0.15)
    rows = torch.arange(6) * 97 + 11
    dirs = torch.zeros(6, D)
    dirs[torch.arange(6), torch.arange(6) * 5] = 1.0
    dirs[torch.arange(6), torch.arange(6) * 5 + 1] = 1.0
    dirs = dirs / dirs.norm(dim=1, keepdim=True)
    weight[rows] = dirs * weight.norm(dim=1).median()
    layer = torchaq.QuantizedSoftmax(weight, bias, **KW)
    h = 2 * dirs + 0.05 * torch.randn(6, D, generator=torch.Generator().manual_seed(3))
    exact = h @ weight.T + bias
    assert torch.equal(exact.argmax(1), rows)
    # each planted row is either on the exact side list or represented well enough by the additive
    # codes (full-width codewords reach directions PQ's sub-spaces cannot): top-1 finds it either way
    for candidates in (None, 8):
        assert torch.equal(layer.topk(h, k=1, candidates=candidates)[1][:, 0], rows)


# --------------------------------------------------------------------------------------------
# sampled softmax
# --------------------------------------------------------------------------------------------
def test_sampled_softmax_partition_estimate_is_unbiased_with_aq(layer):
    """E[Z_hat] = Z with the AQ LUT as the proposal: mean over draws of exp(loss) matches the full softmax."""
    _, _, h, target = _data(2, batch=16)
    full = F.cross_entropy(layer(h), target, reduction="none").detach().double().exp()
    est = torch.stack([
        layer.sampled_softmax_loss(h, target, num_sampled=48, reduction="none", num_hard=4, num_candidates=24,
                                   generator=torch.Generator().manual_seed(s)).detach().double().exp()
        for s in range(80)
    ])
    ratio = est.mean(0) / full
    assert abs(float(ratio.mean()) - 1) < 0.05, ratio


def test_sampled_softmax_quantized_proposal_beats_uniform_with_aq(layer):
    _, _, h, target = _data(2, batch=48)
    full = F.cross_entropy(layer(h), target, reduction="none").detach()
    spread = {}
    for name, kw in (("uniform", dict(sampler="uniform")), ("quantized", {})):
        losses = torch.stack([
            layer.sampled_softmax_loss(h, target, num_sampled=32, reduction="none", num_hard=4, num_candidates=32,
                                       generator=torch.Generator().manual_seed(s), **kw).detach()
            for s in range(12)
        ])
        spread[name] = float(((losses - full) ** 2).mean())
    assert spread["quantized"] < spread["uniform"], spread
    # gradients reach the weight through the sampled classes
    w = layer.weight
    w.grad = None
    layer.sampled_softmax_loss(h, target, num_sampled=32, generator=torch.Generator().manual_seed(0)).backward()
    assert w.grad is not None and float(w.grad.abs().sum()) > 0
    w.grad = None


# --------------------------------------------------------------------------------------------
# the vocabulary-parallel layer (gloo, 2 processes)
# --------------------------------------------------------------------------------------------
SIZES = [500, 700]


def _worker(rank: int, world: int, store: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        _check_parallel(rank)
    finally:
        dist.destroy_process_group()


def _check_parallel(rank: int) -> None:
    from torchaq.distributed import VocabParallelQuantizedSoftmax

    weight, bias, h, _ = _data()
    start = sum(SIZES[:rank])
    mine = slice(start, start + SIZES[rank])
    layer = VocabParallelQuantizedSoftmax(weight[mine], bias[mine], **KW)
    ref = torchaq.QuantizedSoftmax(weight, bias, **KW)
    assert isinstance(layer.quantizer, torchaq.AnisotropicAQ)
    assert torch.equal(layer.quantizer.codebooks, ref.quantizer.codebooks)
    # every rank encodes its rows as the single-device layer does (warm starts sent with the fit)
    codes = torchaq.ops.unpack_codes(layer.local.packed_codes, M, 4, SIZES[rank])
    ref_codes = torchaq.ops.unpack_codes(ref.packed_codes, M, 4, V)
    assert torch.equal(codes, ref_codes[mine])
    vals, idx = layer.topk(h, k=10)
    rvals, ridx = ref.topk(h, k=10)
    assert torch.equal(idx, ridx)
    torch.testing.assert_close(vals, rvals, rtol=1e-5, atol=1e-5)


def test_vocab_parallel_layer_with_aq(tmp_path):
    spawn_ranks(_worker, len(SIZES), (len(SIZES), str(tmp_path / "store")), "the AQ vocabulary-parallel check", 240)
