"""torchaq.distributed.VocabParallelQuantizedSoftmax on gloo (CPU), world sizes 1-4, against the single-process layer.

Spawning processes is slow, so each test spawns once and runs a batch of checks on every rank;
an assertion error on any rank fails the test (``torch.multiprocessing`` re-raises it). Every
process group has a 20 s timeout, and the parent kills the ranks and fails the test if they are
not done by a deadline, so no test can hang CI.
"""
from __future__ import annotations

from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from conftest import spawn_ranks

V, D = 1003, 32
SHARDS = {1: [1003], 2: [400, 603], 3: [300, 350, 353], 4: [250, 260, 243, 250]}  # uneven on purpose
DEADLINE_S = 240  # parent-side: the whole spawned batch of checks
KW = dict(num_subspaces=16, progress=False, seed=0)


def _data(seed=0):
    """Clustered class vectors, a bias, hidden states near random classes (softmax entropy of a few nats)."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(40, D, generator=gen)
    weight = centres[torch.randint(0, 40, (V,), generator=gen)] + 0.5 * torch.randn(V, D, generator=gen)
    bias = 0.1 * torch.randn(V, generator=gen)
    h = 0.4 * (weight[torch.randint(0, V, (24,), generator=gen)] + 0.5 * torch.randn(24, D, generator=gen))  # ~2.3 nats
    target = torch.randint(0, V, (24,), generator=gen)
    return weight, bias, h, target


def _run(world: int, check: str, tmp_path, deadline: float = DEADLINE_S) -> None:
    """Spawn ``world`` ranks running ``check`` (a fresh file store per test), killed after ``deadline``."""
    spawn_ranks(_worker, world, (world, str(tmp_path / "store"), check), check, deadline)


def _worker(rank: int, world: int, store: str, checks: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world, timeout=timedelta(seconds=20))
    try:
        for check in checks.split(","):
            globals()[check](rank, world)
        # no rank tears the group down while another still waits in a collective (gloo then aborts it)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _same_everywhere(t: torch.Tensor) -> None:
    """``t`` is bitwise identical on every rank."""
    got = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(got, t.contiguous())
    for other in got:
        assert torch.equal(other, t)


def _shard(t: torch.Tensor, rank: int, sizes) -> torch.Tensor:
    start = sum(sizes[:rank])
    return t[start : start + sizes[rank]]


# --------------------------------------------------------------------------------------------
# the main batch: inference, gradients, training loss, refresh, state, meshes
# --------------------------------------------------------------------------------------------
def _check_layer(rank: int, world: int) -> None:
    import torchaq
    from torchaq.distributed import VocabParallelQuantizedSoftmax, parallel_logsumexp, reduce_from_parallel_region

    weight, bias, h, target = _data()
    sizes = SHARDS[world]
    start = sum(sizes[:rank])
    layer = VocabParallelQuantizedSoftmax(_shard(weight, rank, sizes), _shard(bias, rank, sizes), **KW)
    ref = torchaq.QuantizedSoftmax(weight, bias, **KW)  # the single-process layer
    assert layer.num_classes == V and layer.shard_sizes == sizes and layer.vocab_range == (start, start + sizes[rank])

    # shared codebooks, bitwise those of the single-process fit; codes do not depend on the rank
    assert torch.equal(layer.quantizer.codebooks, ref.quantizer.codebooks)
    codes = torchaq.ops.unpack_codes(layer.local.packed_codes, 16, 4, sizes[rank])
    ref_codes = torchaq.ops.unpack_codes(ref.packed_codes, 16, 4, V)
    assert torch.equal(codes, ref_codes[start : start + sizes[rank]])

    # topk: the single-process answer, identical on every rank
    vals, idx = layer.topk(h, k=10)
    rvals, ridx = ref.topk(h, k=10)
    assert torch.equal(idx, ridx)
    torch.testing.assert_close(vals, rvals, rtol=1e-5, atol=1e-5)
    _same_everywhere(vals), _same_everywhere(idx)
    v3, i3 = layer.topk(h.reshape(4, 6, D), k=3, candidates=64)
    assert v3.shape == i3.shape == (4, 6, 3)
    assert torch.equal(i3.reshape(24, 3), ref.topk(h, k=3, candidates=64)[1])

    # log_softmax_topk: same classes; log Z from the ranks' pieces close to single-process and exact
    logp, lidx = layer.log_softmax_topk(h, k=5)
    rlogp, rlidx = ref.log_softmax_topk(h, k=5)
    assert torch.equal(lidx, rlidx)
    exact_all = torch.log_softmax(h @ weight.T + bias, dim=1)
    exact = exact_all.gather(1, lidx)
    assert (logp - exact).abs().max() < 0.02
    assert torch.equal(logp, rlogp)  # bitwise the single-process value (fixed-point log Z)
    _same_everywhere(logp)
    # every class re-scored: log Z is exact, the same for every world size
    alogp, aidx = layer.log_softmax_topk(h, k=5, candidates=V)
    torch.testing.assert_close(alogp, exact_all.gather(1, aidx), rtol=0, atol=1e-5)

    # sample: same draw as the single-process layer with the same seed; identical on every rank
    # even when the ranks' own random states differ
    toks = layer.sample(h, top_k=20, top_p=0.9, temperature=0.8, generator=torch.Generator().manual_seed(7))
    # (the single-device layer's candidate sampler, which the vocabulary-parallel sample mirrors)
    rtoks = ref.sample(h, top_k=20, top_p=0.9, temperature=0.8, generator=torch.Generator().manual_seed(7),
                       method="candidates")
    assert torch.equal(toks, rtoks)
    torch.manual_seed(100 + rank)
    free = layer.sample(h, top_k=50)
    _same_everywhere(free)

    # few candidates: still the single-process answer (invariant mode, the default)
    exact_logits = h @ weight.T + bias
    true10 = exact_logits.topk(10).indices
    for cand in (12, 64):
        cv, ci = layer.topk(h, k=10, candidates=cand)
        rv, ri = ref.topk(h, k=10, candidates=cand)
        assert torch.equal(ci, ri) and torch.equal(cv, rv), cand
    # invariant=False, the cheaper mode: each rank re-scores its own candidates, a superset of the
    # single-process ones, so it is never less accurate; its values are exact logits
    layer.invariant = False
    dv, di = layer.topk(h, k=10, candidates=12)
    rv, ri = ref.topk(h, k=10, candidates=12)
    recall = lambda idx: (true10.unsqueeze(2) == idx.unsqueeze(1)).any(2).float().mean()  # noqa: E731
    assert recall(di) >= recall(ri)
    torch.testing.assert_close(dv, exact_logits.gather(1, di))
    # 24 rows of (value, id) pairs ride with the header; 120 rows do not fit and follow it: same rows
    bv, bi = layer.topk(h.repeat(5, 1), k=10, candidates=12)
    assert torch.equal(bi[:24], di) and torch.equal(bv[:24], dv)
    flogp, fidx = layer.log_softmax_topk(h, k=5)
    assert (flogp - torch.log_softmax(exact_logits, 1).gather(1, fidx)).abs().max() < 0.02
    _same_everywhere(flogp)
    layer.invariant = True

    # forward: exact local logits; Megatron-style cross-entropy over them gives the full gradients
    hg = h.clone().requires_grad_()
    local_logits = layer(hg)
    torch.testing.assert_close(local_logits, F.linear(h, weight, bias)[:, start : start + sizes[rank]])
    log_z = parallel_logsumexp(torch.logsumexp(local_logits, dim=1))
    owned = (target >= start) & (target < start + sizes[rank])
    picked = local_logits.gather(1, (target - start).clamp(0, sizes[rank] - 1).unsqueeze(1)).squeeze(1)
    target_logit = reduce_from_parallel_region(torch.where(owned, picked, torch.zeros_like(picked)))
    (log_z - target_logit).mean().backward()
    wf, bf, hf = weight.clone().requires_grad_(), bias.clone().requires_grad_(), h.clone().requires_grad_()
    full = F.cross_entropy(F.linear(hf, wf, bf), target)
    full.backward()
    torch.testing.assert_close(hg.grad, hf.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(layer.weight.grad, wf.grad[start : start + sizes[rank]], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(layer.bias.grad, bf.grad[start : start + sizes[rank]], rtol=1e-4, atol=1e-6)

    # sampled softmax (lut proposal) with every class in a hard set: exactly the full cross-entropy and its gradients
    layer.zero_grad()
    hg = h.clone().requires_grad_()
    loss = layer.sampled_softmax_loss(hg, target, num_sampled=8, num_hard=V, generator=torch.Generator().manual_seed(rank))
    torch.testing.assert_close(loss, full.detach(), rtol=1e-5, atol=1e-5)
    loss.backward()
    torch.testing.assert_close(hg.grad, hf.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(layer.weight.grad, wf.grad[start : start + sizes[rank]], rtol=1e-4, atol=1e-5)
    _same_everywhere(loss.detach())
    # the single-process layer gives the same exact value
    torch.testing.assert_close(ref.sampled_softmax_loss(h, target, num_sampled=8, num_hard=V).detach(), full.detach(), rtol=1e-5, atol=1e-5)
    # estimates converge: many draws (uniform), or hard negatives + draws (quantized)
    per_row = F.cross_entropy(F.linear(h, weight, bias), target, reduction="none")
    with torch.no_grad():
        gen = torch.Generator().manual_seed(11 + rank)
        est = layer.sampled_softmax_loss(h, target, num_sampled=30000, sampler="uniform", reduction="none", generator=gen)
        assert est.shape == target.shape and (est - per_row).abs().mean() < 0.15, (est - per_row).abs().mean()
        assert abs(float((est - per_row).mean())) < 0.05
        est = layer.sampled_softmax_loss(h, target, num_sampled=4096, reduction="none", generator=gen)
        assert (est - per_row).abs().mean() < 0.02, (est - per_row).abs().mean()
        counts = torch.arange(1, V + 1, dtype=torch.float64)
        est = layer.sampled_softmax_loss(
            h, target, num_sampled=30000, sampler="unigram", class_counts=_shard(counts, rank, sizes), generator=gen
        )
        assert abs(float(est) - float(full)) < 0.15, (float(est), float(full))
    layer.zero_grad()

    # refresh: re-encode after the weights moved (local), re-fit (collective): as single-process
    noise = 0.1 * torch.randn(V, D, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        layer.weight.add_(noise[start : start + sizes[rank]])
        ref.weight.add_(noise)
    layer.refresh()
    ref.refresh()
    codes = torchaq.ops.unpack_codes(layer.local.packed_codes, 16, 4, sizes[rank])
    assert torch.equal(codes, torchaq.ops.unpack_codes(ref.packed_codes, 16, 4, V)[start : start + sizes[rank]])
    layer.refresh(refit=True)
    ref.refresh(refit=True)
    assert torch.equal(layer.quantizer.codebooks, ref.quantizer.codebooks)
    assert torch.equal(layer.topk(h, k=10)[1], ref.topk(h, k=10)[1])

    # state_dict: this rank's shard and the shared codebooks; load into an unfitted layer
    state = layer.state_dict()
    assert state["local.weight"].shape == (sizes[rank], D)
    assert torch.equal(state["local.quantizer.codebooks"], ref.quantizer.codebooks)
    fresh = VocabParallelQuantizedSoftmax(torch.zeros(sizes[rank], D), torch.zeros(sizes[rank]), fit=False, **KW)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.topk(h, k=10)[1], ref.topk(h, k=10)[1])
    if world > 1:  # a shard saved by another rank is refused
        other = dict(state)
        other["_extra_state"] = {"shard_sizes": sizes, "rank": (rank + 1) % world}
        with pytest.raises(ValueError, match="saved by rank"):
            fresh.load_state_dict(other)


def _check_mesh(rank: int, world: int) -> None:
    """A DeviceMesh dimension as the group, and a DTensor weight sharded on dim 0 (torch.chunk slices)."""
    import torchaq
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    from torchaq.distributed import VocabParallelQuantizedSoftmax

    weight, bias, h, target = _data()
    sizes = SHARDS[world]
    ref = torchaq.QuantizedSoftmax(weight, bias, **KW)
    mesh = init_device_mesh("cpu", (world,))
    on_mesh = VocabParallelQuantizedSoftmax(_shard(weight, rank, sizes), _shard(bias, rank, sizes), group=mesh, **KW)
    assert torch.equal(on_mesh.topk(h, k=10)[1], ref.topk(h, k=10)[1])
    dweight = distribute_tensor(weight, mesh, [Shard(0)])
    dbias = distribute_tensor(bias, mesh, [Shard(0)])
    from_dtensor = VocabParallelQuantizedSoftmax(dweight, dbias, **KW)
    assert from_dtensor.shard_sizes == [c.shape[0] for c in weight.chunk(world)]
    assert torch.equal(from_dtensor.topk(h, k=10)[1], ref.topk(h, k=10)[1])
    assert (from_dtensor.log_softmax_topk(h, k=5)[0] - ref.log_softmax_topk(h, k=5)[0]).abs().max() < 5e-3
    with pytest.raises(ValueError, match="dim 0"):
        VocabParallelQuantizedSoftmax(distribute_tensor(weight, mesh, [Shard(1)]), **KW)
    # one named dimension of a 2-D mesh
    mesh2 = init_device_mesh("cpu", (1, world), mesh_dim_names=("dp", "tp"))
    on_tp = VocabParallelQuantizedSoftmax(_shard(weight, rank, sizes), _shard(bias, rank, sizes), group=mesh2, mesh_dim="tp", **KW)
    assert on_tp.world_size == world and torch.equal(on_tp.topk(h, k=10)[1], ref.topk(h, k=10)[1])
    with pytest.raises(ValueError, match="mesh_dim"):
        VocabParallelQuantizedSoftmax(_shard(weight, rank, sizes), group=mesh2, **KW)


def _check_sampled_fit(rank: int, world: int) -> None:
    """Above MAX_FIT_ROWS the codebooks are fitted on a seeded sample of global rows, the same for any world size."""
    import torchaq
    import torchaq.distributed.layer as td

    weight, bias, h, target = _data()
    sizes = SHARDS[world]
    saved = td.MAX_FIT_ROWS
    td.MAX_FIT_ROWS = 500
    try:
        layer = td.VocabParallelQuantizedSoftmax(_shard(weight, rank, sizes), **KW)
    finally:
        td.MAX_FIT_ROWS = saved
    # what QuantizedSoftmax.refresh(refit=True) fits with MAX_FIT_ROWS = 500: the rows fit_rows_mask
    # keeps, sampled by the quantizer's own seeded generator
    from torchaq.layer.side_list import fit_rows_mask

    rows = weight[fit_rows_mask(weight)]
    single = torchaq.AnisotropicPQ(D, 16, bits=4, threshold=None, seed=KW["seed"]).fit(rows, iters=5, progress=False, max_rows=500)
    assert torch.equal(layer.quantizer.codebooks, single.codebooks)
    # and with huge-norm rows, which the fit leaves out (their norms are gathered to decide)
    spiky = weight.clone()
    spiky[[3, 700]] *= 30
    td.MAX_FIT_ROWS = 500
    try:
        layer2 = td.VocabParallelQuantizedSoftmax(_shard(spiky, rank, sizes), **KW)
    finally:
        td.MAX_FIT_ROWS = saved
    keep = fit_rows_mask(spiky)
    assert not keep[3] and not keep[700]
    single2 = torchaq.AnisotropicPQ(D, 16, bits=4, threshold=None, seed=KW["seed"]).fit(spiky[keep], iters=5, progress=False, max_rows=500)
    assert torch.equal(layer2.quantizer.codebooks, single2.codebooks)
    # calibration queries: rank 0 calibrates, every rank gets the chosen rule and the scores
    calibrated = td.VocabParallelQuantizedSoftmax(_shard(weight, rank, sizes), _shard(bias, rank, sizes), queries=h, **KW)
    ref = torchaq.QuantizedSoftmax(weight, bias, queries=h, **KW)
    assert torch.equal(calibrated.quantizer.codebooks, ref.quantizer.codebooks)
    assert calibrated.quantizer.rule == ref.quantizer.rule and calibrated.quantizer.calibration == ref.quantizer.calibration
    assert calibrated.quantizer.calibration is not None


def _check_bad_input(rank: int, world: int) -> None:
    """Bad input on one rank: a ValueError on every rank, naming the problem, and no hang."""
    from torchaq.distributed import VocabParallelQuantizedSoftmax

    weight, bias, h, target = _data()
    sizes = SHARDS[world]
    w, b = _shard(weight, rank, sizes), _shard(bias, rank, sizes)
    last = rank == world - 1
    cases = [
        ("d", dict(weight_shard=w[:, :31] if last else w), "feature dimension"),
        ("dtype", dict(weight_shard=w.double() if last else w), "dtype"),
        ("empty", dict(weight_shard=w[:0] if last else w, bias_shard=None), "empty"),
        ("none", dict(weight_shard=None if last else w), "missing"),
        ("bias", dict(weight_shard=w, bias_shard=None if last else b), "bias presence"),
        ("nan", dict(weight_shard=w.clone().fill_(float("nan")) if last else w), "NaN"),
        ("total", dict(weight_shard=w, num_classes=V + 1), "num_classes"),
        ("kwargs", dict(weight_shard=w, bits=5), "bits"),
        ("options", dict(weight_shard=w, num_subspaces=8 if last else 16), "layer options"),
    ]
    if world == 1:  # nothing to mismatch with
        cases = [c for c in cases if c[0] not in ("d", "dtype", "bias", "options")]
    for name, kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            VocabParallelQuantizedSoftmax(**{"bias_shard": None, **kwargs}, **{k: v for k, v in KW.items() if k not in kwargs})
    # a fit that fails on rank 0 fails on every rank (here: too few queries for calibration)
    with pytest.raises(ValueError, match="queries"):
        VocabParallelQuantizedSoftmax(w, b, queries=h[:5], **KW)
    # the group is still in step after all of that
    layer = VocabParallelQuantizedSoftmax(w, b, **KW)
    for bad in (0, V + 1, True, 2.0):
        with pytest.raises(ValueError, match="k must be"):
            layer.topk(h, k=bad)
    with pytest.raises(ValueError, match="num_sampled"):
        layer.sampled_softmax_loss(h, target, num_sampled=world - 1 if world > 1 else 0)
    with pytest.raises(ValueError, match="target values"):
        layer.sampled_softmax_loss(h, target + V)
    with pytest.raises(ValueError, match="class_counts"):
        layer.sampled_softmax_loss(h, target, sampler="unigram")
    with pytest.raises(ValueError, match="tail_grad_rows"):
        layer.sampled_softmax_loss(h, target, tail_grad_rows=-1)
    with pytest.raises(TypeError, match="group"):
        VocabParallelQuantizedSoftmax(w, b, group="world", **KW)
    dist.barrier()


def test_one_rank_matches_single_process(tmp_path):
    # world size 1 runs in this process (no spawn): the same checks
    threads = torch.get_num_threads()
    try:
        _worker(0, 1, str(tmp_path / "store"), "_check_layer,_check_bad_input")
    finally:
        torch.set_num_threads(threads)


def test_two_ranks_match_single_process_and_refuse_bad_input(tmp_path):
    _run(2, "_check_layer,_check_sampled_fit,_check_bad_input", tmp_path)


def test_three_ranks_match_single_process_mesh_and_dtensor(tmp_path):
    _run(3, "_check_layer,_check_mesh,_check_sampled_fit,_check_bad_input", tmp_path)


def test_requires_initialized_process_group():
    from torchaq.distributed import VocabParallelQuantizedSoftmax

    if dist.is_initialized():  # pragma: no cover - another test left one open
        pytest.skip("a default process group is already initialized")
    with pytest.raises(RuntimeError, match="init_process_group"):
        VocabParallelQuantizedSoftmax(torch.randn(40, D), **KW)


def test_allocate_splits_draws_at_least_one_each():
    from torchaq.distributed import shard_sizes

    assert shard_sizes(10, [1.0, 1.0]) == [5, 5]
    assert shard_sizes(3, [1e-9, 1.0, 1e-9]) == [1, 1, 1]
    assert shard_sizes(100, [3.0, 1.0]) == [75, 25]
    assert sum(shard_sizes(1001, [0.2, 0.3, 0.5])) == 1001
