"""Fast checks of the helpers behind ``benchmarks/llm_heads.py`` (small shapes; no timing asserted)."""
import math

import pytest
import torch

import torchaq
from benchmarks import ann_curves, llm_generate, llm_headroom, llm_layer_ops, llm_tables
from torchaq import ops


def test_llm_head_shape_norms_and_spectrum():
    rows, q = llm_tables.llm_head(4096, 64, 32, seed=0, norm_sigma=0.3, logit_std=4.0)
    assert rows.shape == (4096, 64) and q.shape == (32, 64)
    log_norms = rows.norm(dim=1).log()
    assert abs(log_norms.std().item() - 0.3) < 0.03  # log-normal(0, 0.3) row norms
    s = torch.linalg.svdvals(rows / rows.norm(dim=1, keepdim=True))
    energy = (s ** 2).cumsum(0) / (s ** 2).sum()
    assert energy[max(32, 64 // 8) - 1] > 0.75  # the rank-r signal carries ~80% of the energy
    assert s[-1] > 0  # full rank (the isotropic part)
    std = (q @ rows.T).std(dim=1)
    assert torch.allclose(std, torch.full_like(std, 4.0), rtol=0.1)


def test_llm_head_is_deterministic():
    a, qa = llm_tables.llm_head(512, 32, 8, seed=3)
    b, qb = llm_tables.llm_head(512, 32, 8, seed=3)
    assert torch.equal(a, b) and torch.equal(qa, qb)


def test_table_rejects_unknown_name():
    with pytest.raises(ValueError, match="table"):
        llm_tables.table("gpt5")


def test_recall_and_exact_top():
    rows = torch.randn(300, 16)
    q = torch.randn(20, 16)
    true = llm_layer_ops.exact_top(rows, q, k=10, chunk=7)
    assert torch.equal(true, torch.topk(q @ rows.T, 10).indices)
    assert llm_layer_ops.recall(true, true) == 1.0
    assert llm_layer_ops.recall(true[:, :5], true) == 0.5


def test_verdict_table_compares_best_at_each_recall():
    pts = [("torchaq M=8", 1, "C=16", 0.95, 2000.0), ("torchaq M=8", 1, "C=64", 0.995, 1000.0),
           ("ScaNN tree+AH+reorder", 1, "x", 0.99, 500.0), ("FAISS IVF-PQfs+RFlat", 1, "y", 0.92, 4000.0)]
    assert ann_curves.best_at(pts, "torchaq", 1, 0.99) == 1000.0
    assert ann_curves.best_at(pts, "FAISS", 1, 0.95) is None
    text = ann_curves.verdict_table(pts, [1], levels=(0.9, 0.99))
    assert "2.00x" in text  # torchaq 1000 q/s vs ScaNN 500 q/s at recall >= 0.99
    assert "0.50x" in text  # torchaq 2000 q/s vs FAISS 4000 q/s at recall >= 0.9


def test_zero_and_timed_heads():
    head = llm_generate.TimedHead(llm_generate.ZeroHead(11))
    for _ in range(3):
        out = head.module(torch.randn(2, 3, 5))  # the hooks time the module itself
    assert out.shape == (2, 3, 11) and not out.any()
    steps, heads = head.steps()
    assert len(steps) == 2 and len(heads) == 2  # the first call (prefill) is not a decode step
    assert all(s >= 0 and not math.isnan(s) for s in steps + heads)


def test_build_model_rejects_unknown_name():
    with pytest.raises(ValueError, match="model"):
        llm_generate.build_model("gpt5", torch.float32)


def test_kmeans_lists_assign_each_row_to_its_nearest_centroid():
    gen = torch.Generator().manual_seed(0)
    rows = torch.randn(300, 8, generator=gen)
    centroids, lists = llm_headroom.kmeans_lists(rows, 6, iters=4, chunk=64)
    assert centroids.shape == (6, 8) and lists.shape == (300,)
    assert torch.equal(lists, torch.cdist(rows, centroids).argmin(1))


def test_greedy_ranks_count_the_coded_classes_scanned_above_the_token():
    gen = torch.Generator().manual_seed(1)
    rows = torch.randn(512, 16, generator=gen)
    rows[:4] *= 40  # outlier rows: the layer keeps them in its exact side list
    layer = torchaq.QuantizedSoftmax(rows, num_subspaces=8, progress=False)
    side = layer.side_rows
    assert side.numel() > 0
    states = torch.randn(6, 16, generator=gen)
    score = ops.lut_score(layer.quantizer.lut(states), layer.packed_codes, 512, layer.scan_bias())
    order = score.argsort(dim=1, descending=True)  # side rows last (the scan's bias excludes them)
    for r in (0, 3, 100):
        assert llm_headroom.greedy_ranks(layer, states, order[:, r], chunk=4).tolist() == [r] * 6
    assert llm_headroom.greedy_ranks(layer, states, side[:1].expand(6)).tolist() == [0] * 6
