"""The vocabulary-parallel contract on gloo (CPU): bitwise the single-process answers at every world size,
one clear error on every rank instead of a hang, torch's ``parallelize_module``, the refresher and the
``lut`` sampled loss.

Each test spawns its ranks once (a fresh file store, 20 s process-group timeouts) and the parent
kills them and fails if they are not done by a deadline.
"""
from __future__ import annotations

from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from conftest import spawn_ranks

V, D, B = 1003, 32, 24
KW = dict(num_subspaces=16, progress=False, seed=0)
OUTLIERS = [5, 500, 900]  # rows far from the codebooks: the exact side list
DEADLINE_S = 240


def _run(world: int, checks: str, tmp_path, deadline: float = DEADLINE_S) -> None:
    spawn_ranks(_worker, world, (world, str(tmp_path / "store"), checks), checks, deadline)


def _worker(rank: int, world: int, store: str, checks: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=20))
    try:
        for check in checks.split(","):
            globals()[check](rank, world)
        # no rank tears the group down while another still waits in a collective (gloo then aborts it)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _data():
    gen = torch.Generator().manual_seed(0)
    centres = torch.randn(40, D, generator=gen)
    weight = centres[torch.randint(0, 40, (V,), generator=gen)] + 0.5 * torch.randn(V, D, generator=gen)
    weight[OUTLIERS] *= 8
    bias = 0.1 * torch.randn(V, generator=gen)
    h = 0.4 * (weight[torch.randint(0, V, (B,), generator=gen)] + 0.5 * torch.randn(B, D, generator=gen))
    target = torch.randint(0, V, (B,), generator=gen)
    return weight, bias, h, target


def _sizes(world: int):
    """Uneven slices (the last rank gets the remainder)."""
    base = [V // world - 7 * (r % 2) for r in range(world - 1)]
    return base + [V - sum(base)]


def _slice(t, rank, world):
    sizes = _sizes(world)
    start = sum(sizes[:rank])
    return t[start: start + sizes[rank]]


def _same_everywhere(t: torch.Tensor) -> None:
    got = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(got, t.contiguous())
    assert all(torch.equal(g, t) for g in got)


class _CountGathers:
    """Counts the all-gathers into one tensor (the layer's collectives) while active."""

    def __enter__(self):
        self.calls, self.saved = 0, {}
        for name in ("all_gather_single", "all_gather_into_tensor"):
            fn = getattr(dist, name, None)
            if fn is not None:
                self.saved[name] = fn
                setattr(dist, name, self._counted(fn))
        return self

    def _counted(self, fn):
        def call(*args, **kwargs):
            self.calls += 1
            return fn(*args, **kwargs)
        return call

    def __exit__(self, *exc):
        for name, fn in self.saved.items():
            setattr(dist, name, fn)


# --------------------------------------------------------------------------------------------
def _check_invariant(rank: int, world: int) -> None:
    """topk, log_softmax_topk and sample: bitwise the single-process layer, on every rank, side list included."""
    import torchaq
    from torchaq.distributed import VocabParallelQuantizedSoftmax

    weight, bias, h, _ = _data()
    ref = torchaq.QuantizedSoftmax(weight, bias, **KW)
    layer = VocabParallelQuantizedSoftmax(_slice(weight, rank, world), _slice(bias, rank, world), **KW)
    start = layer.offset
    assert ref.side_rows.tolist() == OUTLIERS  # the side list matters here
    assert (layer.local.side_rows + start).tolist() == [r for r in OUTLIERS if start <= r < start + layer.local_classes]
    assert layer.num_side_rows == len(OUTLIERS)
    h3 = h.reshape(4, 6, D)
    for k, cand in ((10, None), (10, 12), (5, 64), (1, 300), (3, V)):
        vals, idx = layer.topk(h3, k, cand)
        rvals, ridx = ref.topk(h3, k, cand)
        assert torch.equal(idx, ridx) and torch.equal(vals, rvals), (k, cand)
        logp, lidx = layer.log_softmax_topk(h, k, cand)
        rlogp, rlidx = ref.log_softmax_topk(h, k, cand)
        assert torch.equal(lidx, rlidx) and torch.equal(logp, rlogp), (k, cand)
        toks = layer.sample(h, top_k=k, top_p=0.9, temperature=0.8, candidates=cand, generator=torch.Generator().manual_seed(7))
        rtoks = ref.sample(h, top_k=k, top_p=0.9, temperature=0.8, candidates=cand, generator=torch.Generator().manual_seed(7),
                           method="candidates")
        assert torch.equal(toks, rtoks), (k, cand)
        for t in (vals, idx, logp, toks):
            _same_everywhere(t)
    # batch 1 and 3: the first payload rides with the header (one all-gather fewer per call)
    for rows in (h[:1], h[:3]):
        with _CountGathers() as count:
            vals, idx = layer.topk(rows, 10)
        assert world == 1 or count.calls == 2, count.calls  # header + scan scores, then the shortlist
        rvals, ridx = ref.topk(rows, 10)
        assert torch.equal(idx, ridx) and torch.equal(vals, rvals)
        assert torch.equal(layer.log_softmax_topk(rows, 5)[0], ref.log_softmax_topk(rows, 5)[0])
        toks = layer.sample(rows, top_k=20, generator=torch.Generator().manual_seed(3))
        assert torch.equal(toks, ref.sample(rows, top_k=20, generator=torch.Generator().manual_seed(3), method="candidates"))
    with _CountGathers() as count:
        layer.topk(h, 10)
    assert world == 1 or count.calls == 3  # 24 rows of scan scores do not fit: header, scan scores, shortlist
    # without a bias and with the int8 shortlist off: still the single-process answers
    nob = VocabParallelQuantizedSoftmax(_slice(weight, rank, world), **KW)
    refnb = torchaq.QuantizedSoftmax(weight, **KW)
    nob.local.shortlist = refnb.shortlist = False
    assert torch.equal(nob.topk(h, 10)[1], refnb.topk(h, 10)[1])
    assert torch.equal(nob.log_softmax_topk(h, 4)[0], refnb.log_softmax_topk(h, 4)[0])


def _per_rank(layer, call):
    """``call()`` with the layer in its cheaper mode (``invariant=False``)."""
    layer.invariant = False
    try:
        return call()
    finally:
        layer.invariant = True


def _check_faults(rank: int, world: int) -> None:
    """Each fault on one rank: the same clear error on every rank, quickly, and the group still works."""
    from torchaq.distributed import VocabParallelError, VocabParallelQuantizedSoftmax

    weight, bias, h, target = _data()
    layer = VocabParallelQuantizedSoftmax(_slice(weight, rank, world), _slice(bias, rank, world), **KW)
    good = layer.topk(h, 5)
    last = rank == world - 1
    nan_h = h.clone()
    nan_h[3, 2] = float("nan")
    other_h = h + 0.01
    bad_target = target.clone()
    bad_target[0] = V + 3
    faults = [
        ("batch", lambda: layer.topk(h[:6] if last else h[:7], 5), "batch size"),
        # one rank's scan scores ride with the header, the other's do not fit: still one clear error
        ("inline", lambda: layer.topk(h[:1] if last else h, 5), "batch size"),
        ("inline_sample", lambda: layer.sample(h[:1] if last else h, top_k=5), "batch size"),
        ("per_rank_k", lambda: _per_rank(layer, lambda: layer.topk(h[:2], 5 if last else 6)), "disagree on k"),
        ("per_rank_nan", lambda: _per_rank(layer, lambda: layer.log_softmax_topk(nan_h[2:4] if last else h[2:4], 5)), "NaN or Inf"),
        ("k", lambda: layer.topk(h, 5 if last else 7), "disagree on k"),
        ("nan", lambda: layer.topk(nan_h if last else h, 5), "NaN or Inf"),
        ("nan_loss", lambda: layer.sampled_softmax_loss(nan_h if last else h, target, num_sampled=64), "NaN or Inf"),
        ("target", lambda: layer.sampled_softmax_loss(h, bad_target if last else target, num_sampled=64), "target values"),
        ("other_target", lambda: layer.sampled_softmax_loss(h, target.roll(1) if last else target, num_sampled=64), "contents of target"),
        ("refit_one", lambda: layer.refresh(refit=True) if last else layer.topk(h, 5), "different calls"),
        ("other_h", lambda: layer.log_softmax_topk(other_h if last else h, 5), "contents of h"),
        ("dtype", lambda: layer.topk(h.double() if last else h, 5), "dtype"),
        ("candidates", lambda: layer.topk(h, 5, candidates=40 if last else 50), "candidates"),
        ("bad_k", lambda: layer.sample(h, top_k=0 if last else 5), "top_k must be"),
    ]
    for name, call, message in faults:
        # a rank left waiting would hit the 20 s process-group timeout and raise a RuntimeError
        # instead: the VocabParallelError on every rank shows the header caught the fault
        with pytest.raises(VocabParallelError, match=message) as info:
            call()
        texts = [None] * world
        dist.all_gather_object(texts, str(info.value))  # the group is usable, and the error is the same everywhere
        assert len(set(texts)) == 1, (name, texts)
        assert torch.equal(layer.topk(h, 5)[1], good[1]), name  # still in step
    # the one-rank refit was refused before any rank changed its index
    assert layer.generation == 1


def _check_style(rank: int, world: int) -> None:
    """parallelize_module with QuantizedVocabParallel: the single-process answers, 1-D and 2-D meshes."""
    import torchaq
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.parallel import parallelize_module
    from torchaq.distributed import QuantizedVocabParallel, VocabParallelHead

    weight, bias, h, target = _data()
    ref = torchaq.QuantizedSoftmax(weight, bias, **KW)
    meshes = [(init_device_mesh("cpu", (world,)), world)]
    if world == 4:
        meshes.append((init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp")), 2))
    for mesh, tp in meshes:
        for output in ("shard", "gather"):
            model = torch.nn.Sequential()
            model.add_module("lm_head", torch.nn.Linear(D, V))
            with torch.no_grad():
                model.lm_head.weight.copy_(weight)
                model.lm_head.bias.copy_(bias)
            parallelize_module(model, mesh, {"lm_head": QuantizedVocabParallel(output=output, **KW)})
            head = model.lm_head
            assert isinstance(head, VocabParallelHead) and head.world_size == tp
            sizes = [c.shape[0] for c in weight.chunk(tp)]
            assert head.shard_sizes == sizes
            vals, idx = head.topk(h, 10)
            rvals, ridx = ref.topk(h, 10)
            assert torch.equal(idx, ridx) and torch.equal(vals, rvals)
            assert torch.equal(head.log_softmax_topk(h, 5)[0], ref.log_softmax_topk(h, 5)[0])
            hg = h.clone().requires_grad_()
            logits = model(hg)
            full = F.linear(h, weight, bias)
            if output == "gather":
                torch.testing.assert_close(logits, full)
                F.cross_entropy(logits, target).backward()
                wf, hf = weight.clone().requires_grad_(), h.clone().requires_grad_()
                F.cross_entropy(F.linear(hf, wf, bias), target).backward()
                torch.testing.assert_close(hg.grad, hf.grad, rtol=1e-4, atol=1e-6)
                start, stop = head.vocab_range
                torch.testing.assert_close(head.weight.grad, wf.grad[start:stop], rtol=1e-4, atol=1e-6)
            else:
                start, stop = head.vocab_range
                torch.testing.assert_close(logits, full[:, start:stop])
            if tp == world:  # a Replicate DTensor input and a Shard(-1) DTensor output
                head.use_local_output, head.output = False, "shard"
                out = head(distribute_tensor(h, mesh, [Replicate()]))
                assert isinstance(out, DTensor) and out.placements == (Shard(1),)
                torch.testing.assert_close(out.full_tensor(), full)
    with pytest.raises(TypeError, match="nn.Linear"):
        parallelize_module(torch.nn.Sequential(torch.nn.ReLU()), meshes[0][0], {"0": QuantizedVocabParallel(**KW)})


def _check_refresher_and_loss(rank: int, world: int) -> None:
    """CodebookRefresher drives the layer; the lut sampled loss equals the single-device one for the same draws."""
    import torchaq
    from torchaq.distributed import VocabParallelQuantizedSoftmax

    weight, bias, h, target = _data()
    start = sum(_sizes(world)[:rank])
    ref = torchaq.QuantizedSoftmax(weight, bias, **KW)
    layer = VocabParallelQuantizedSoftmax(_slice(weight, rank, world), _slice(bias, rank, world), **KW)
    classes = torch.arange(0, V, 5)
    log_pi = -torch.rand(classes.numel(), generator=torch.Generator().manual_seed(1)) - 0.1
    # the draws' weight gradient (tail_grad_rows=0), and the tail's from every row (no row draw: the same rows)
    for lut_rows, tail in ((None, 0), (8, 0), (8, h.shape[0])):
        hv, hr = h.clone().requires_grad_(), h.clone().requires_grad_()
        kwargs = dict(num_sampled=300, draws=(classes, log_pi), lut_rows=lut_rows, tail_grad_rows=tail)
        lv = layer.sampled_softmax_loss(hv, target, generator=torch.Generator().manual_seed(0), **kwargs)
        lr = ref.sampled_softmax_loss(hr, target, generator=torch.Generator().manual_seed(0), **kwargs)
        lv.backward()
        lr.backward()
        torch.testing.assert_close(lv, lr, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(hv.grad, hr.grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(layer.weight.grad, ref.weight.grad[start: start + layer.local_classes], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(layer.bias.grad, ref.bias.grad[start: start + layer.local_classes], rtol=1e-4, atol=1e-6)
        layer.zero_grad()
        ref.zero_grad()
    # its own draws: an estimate of the full cross-entropy, the same on every rank
    with torch.no_grad():
        est = layer.sampled_softmax_loss(h, target, num_sampled=600, generator=torch.Generator().manual_seed(rank))
        _same_everywhere(est)
        assert abs(float(est) - float(F.cross_entropy(F.linear(h, weight, bias), target))) < 0.1
    # the refresher: re-encodes every 2 steps, re-fits every 4, on every rank in step
    refresher = torchaq.CodebookRefresher(layer, every=2, refit_every=4)
    refresher_ref = torchaq.CodebookRefresher(ref, every=2, refit_every=4)
    noise = 0.05 * torch.randn(V, D, generator=torch.Generator().manual_seed(3))
    kinds = []
    for _ in range(4):
        with torch.no_grad():
            layer.weight.add_(noise[start: start + layer.local_classes])
            ref.weight.add_(noise)
        kinds.append(refresher.step(h))
        refresher_ref.step(h)
    assert kinds == [None, "reencode", None, "refit"]
    assert torch.equal(layer.quantizer.codebooks, ref.quantizer.codebooks)
    assert torch.equal(layer.topk(h, 10)[1], ref.topk(h, 10)[1])


def test_one_rank_is_the_single_process_layer(tmp_path):
    threads = torch.get_num_threads()
    try:
        _worker(0, 1, str(tmp_path / "store"), "_check_invariant,_check_refresher_and_loss")
    finally:
        torch.set_num_threads(threads)


def test_two_ranks_contract(tmp_path):
    _run(2, "_check_invariant,_check_faults,_check_refresher_and_loss,_check_style", tmp_path)


def test_three_ranks_contract(tmp_path):
    _run(3, "_check_invariant,_check_faults,_check_refresher_and_loss", tmp_path)


def test_four_ranks_contract_and_2d_mesh(tmp_path):
    _run(4, "_check_invariant,_check_faults,_check_style", tmp_path)
