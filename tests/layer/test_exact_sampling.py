"""Full-vocabulary sampling, exact log-probabilities and batch invariance of QuantizedSoftmax.

Statistical tests compare draws with the exact (dense) softmax by a chi-square test at p = 1e-3:
a correct sampler fails one of them once in a thousand runs (the seeds are fixed, so the outcome is
deterministic); the old candidate-only sampler, run through the same test, fails by orders of
magnitude, which shows the test can see the mass outside the candidates.
"""
import contextlib
import copy
import math
import warnings

import pytest
import torch

import torchaq
from torchaq import ops
from torchaq.ops.counter_rng import mix32, uniforms
from torchaq.layer.exact_sampling import sample_many

V, D = 1500, 16
CHI2_P001 = {6: 22.46, 8: 26.12, 11: 31.26, 16: 39.25}  # chi-square critical values at p = 1e-3, by df


@pytest.fixture(scope="module")
def _fitted():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(12, D, generator=g)
    weight = centres[torch.randint(0, 12, (V,), generator=g)] + 0.6 * torch.randn(V, D, generator=g)
    bias = 0.1 * torch.randn(V, generator=g)
    h = 0.5 * (weight[torch.randint(0, V, (8,), generator=g)] + 0.5 * torch.randn(8, D, generator=g))
    layer = torchaq.QuantizedSoftmax(weight, bias, num_subspaces=8, progress=False, fit_iters=1).eval()
    return layer, h


@pytest.fixture
def setup(_fitted):
    layer, h = _fitted
    return copy.deepcopy(layer), h.clone()


def _exact(layer, h, temperature=1.0):
    return torch.softmax((h @ layer.weight.detach().T + layer.bias.detach()) / temperature, dim=-1)


def _chi2(draws, probs, bins):
    """Chi-square of ``draws`` against ``probs`` over the ``bins`` most likely classes plus one rest bin."""
    order = probs.argsort(descending=True)
    top = order[:bins]
    counts = torch.bincount(draws, minlength=probs.numel()).double()
    obs = torch.cat([counts[top], (counts.sum() - counts[top].sum()).reshape(1)])
    p = probs.double()
    exp = torch.cat([p[top], (1 - p[top].sum()).reshape(1)]) * draws.numel()
    keep = exp > 0
    return float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum())


def test_counter_uniforms_numpy_path_equals_torch_path():
    """key_uniforms hashes in numpy on CPU; the torch ops (every other device) give the same bits."""
    from torchaq.ops.counter_rng import hashed_counters, hashed_numbers, key_uniforms, row_keys

    keys = row_keys(torch.tensor([0, 1, -5, 2 ** 62, -(2 ** 62), 123456789]))
    for stream, n in ((0, 1), (3, 32), (17, 257)):
        via_torch = (hashed_numbers(keys.unsqueeze(1), hashed_counters(stream, n, keys.device), mix32).double() + 0.5) / 2.0 ** 53
        assert torch.equal(key_uniforms(keys, stream, n), via_torch)
    seeds = torch.tensor([0, 1, -1, -5, 2 ** 62, -(2 ** 63), 2 ** 63 - 1, 123456789])
    assert torch.equal(row_keys(seeds), mix32(seeds ^ mix32((seeds >> 32) ^ 0x9E3779B9)))  # Python integers
    many = torch.cat([seeds, torch.randint(-(2 ** 63), 2 ** 63 - 1, (100,), generator=torch.Generator().manual_seed(1))])
    assert torch.equal(row_keys(many), mix32(many ^ mix32((many >> 32) ^ 0x9E3779B9)))  # numpy
    assert torch.equal(row_keys(many)[:8], row_keys(seeds))


def test_counter_uniforms_are_the_hash_and_batch_free():
    def py(x):
        x &= 0xFFFFFFFF
        x ^= x >> 16
        x = (x * 0x7FEB352D) & 0xFFFFFFFF
        x ^= x >> 15
        x = (x * 0x846CA68B) & 0xFFFFFFFF
        return x ^ (x >> 16)

    xs = torch.randint(0, 2 ** 32, (2000,), generator=torch.Generator().manual_seed(0))
    assert [int(v) for v in mix32(xs)] == [py(int(x)) for x in xs]  # int64 wrap-around gives the exact hash
    u = uniforms(torch.arange(4000), 7, 16)
    assert u.dtype == torch.float64 and 0 < float(u.min()) and float(u.max()) < 1
    assert abs(float(u.mean()) - 0.5) < 0.01 and abs(float(u.var()) - 1 / 12) < 0.005
    seeds = torch.tensor([5, -3, 2 ** 40 + 1])
    assert torch.equal(uniforms(seeds, 2, 4)[1], uniforms(seeds[1:2], 2, 4)[0])
    assert not torch.equal(uniforms(seeds, 2, 4), uniforms(seeds, 3, 4))


def test_pure_sampling_matches_the_exact_softmax_outside_the_candidates(setup):
    """A small head (16 re-scored classes) leaves much of the mass to the tail: the rejection step must draw it."""
    layer, h = setup
    row = h[0]
    probs = _exact(layer, row)
    n = 20000
    draws, violations = sample_many(layer, row, torch.arange(n), candidates=16)
    assert violations == 0
    assert _chi2(draws, probs, 15) < CHI2_P001[16]
    # the same tokens as the batched public call with the same seeds
    assert torch.equal(draws[:300], layer.sample(row.expand(300, D), seeds=torch.arange(300), candidates=16))
    # mass outside the exact top-16 matches (binomial 4-sigma) -- and is mass the old sampler never draws
    outside = 1 - probs.sort(descending=True).values[:16].sum().item()
    assert outside > 0.1
    top16 = probs.topk(16).indices
    frac = 1 - torch.isin(draws, top16).double().mean().item()
    assert abs(frac - outside) < 4 * math.sqrt(outside * (1 - outside) / n)
    old = layer.sample(row.expand(n, D), top_k=16, candidates=16, method="candidates",
                       generator=torch.Generator().manual_seed(0))
    assert _chi2(old, probs, 15) > 100 * CHI2_P001[16]


@pytest.mark.parametrize("kwargs", [dict(top_k=7), dict(top_p=0.8), dict(min_p=0.05), dict(temperature=0.6, top_p=0.9),
                                    dict(top_k=30, top_p=0.7, min_p=0.02, temperature=1.3)])
def test_truncated_sampling_matches_the_exact_truncated_softmax(setup, kwargs):
    layer, h = setup
    row = h[1]
    t = kwargs.get("temperature", 1.0)
    logits = (row @ layer.weight.detach().T + layer.bias.detach()) / t
    keep = torch.ones(V, dtype=torch.bool)
    order = logits.argsort(descending=True)
    if "top_k" in kwargs:
        keep[order[kwargs["top_k"]:]] = False
    if "top_p" in kwargs:  # Hugging Face: on what top_k left, the smallest prefix reaching top_p
        p = logits.masked_fill(~keep, -math.inf).softmax(0)[order]
        drop = (p.cumsum(0) - p) >= kwargs["top_p"]
        keep[order[drop]] = False
    if "min_p" in kwargs:
        keep &= logits >= logits.max() + math.log(kwargs["min_p"])
    probs = logits.masked_fill(~keep, -math.inf).softmax(0)
    n = 8000
    draws, _ = sample_many(layer, row, torch.arange(n) + 11, candidates=16, **kwargs)
    assert keep[draws].all()  # nothing outside the exact truncated support
    bins = min(int(keep.sum()), 11) - 1
    if bins >= 1:
        df = bins if bins + 1 < int(keep.sum()) else bins  # rest bin counted when non-empty
        assert _chi2(draws, probs, bins) < CHI2_P001.get(df, 31.26), kwargs


def test_logprobs_are_exact(setup):
    layer, h = setup
    for kwargs in (dict(), dict(temperature=0.7), dict(top_k=5), dict(top_p=0.5), dict(min_p=0.2, candidates=16)):
        t = kwargs.get("temperature", 1.0)
        out = layer.sample(h, seeds=torch.arange(8), return_logprobs=True, **kwargs)
        exact = torch.log_softmax((h @ layer.weight.detach().T + layer.bias.detach()) / t, 1)
        torch.testing.assert_close(out.logprobs, exact.gather(1, out.tokens[:, None])[:, 0], atol=2e-5, rtol=0)
        assert (out.truncated_logprobs >= out.logprobs - 1e-6).all() and (out.truncated_logprobs <= 1e-6).all()
        assert torch.isfinite(out.logprobs).all() and out.tokens.dtype == torch.int64
    out = layer.sample(h, seeds=torch.arange(8), top_k=5, return_logprobs=True)
    top = (h @ layer.weight.detach().T + layer.bias.detach()).topk(5)
    trunc = torch.log_softmax(top.values, 1)[(top.indices == out.tokens[:, None])]
    torch.testing.assert_close(out.truncated_logprobs, trunc, atol=2e-5, rtol=0)
    # top_p: the truncated log-probability under Hugging Face's nucleus of the exact logits
    for p in (0.5, 0.9, 0.99):
        out = layer.sample(h, seeds=torch.arange(8), top_p=p, return_logprobs=True)
        logits = (h @ layer.weight.detach().T + layer.bias.detach()).double()
        values, order = logits.sort(dim=1, descending=True)
        probs = values.softmax(1)
        keep = (probs.cumsum(1) - probs) < p
        nucleus = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, order, keep)
        assert bool(nucleus.gather(1, out.tokens[:, None]).all()), "a token drawn outside the exact nucleus"
        trunc = torch.log_softmax(logits.masked_fill(~nucleus, -math.inf), 1).gather(1, out.tokens[:, None])[:, 0]
        torch.testing.assert_close(out.truncated_logprobs.double(), trunc, atol=1e-3, rtol=0)
    # a floor that is a class's logit from another kernel (one ulp above this pass's value) keeps
    # that class: a peaked row's nucleus of one token has truncated log-probability 0, not inf
    from torchaq.layer.logprobs import row_log_partition

    logits = h @ layer.weight.detach().T + layer.bias.detach()
    top = logits.max(1).values
    floor = torch.nextafter(top, torch.full_like(top, math.inf))
    both = row_log_partition(h, layer.weight, layer.bias, 1.0, floor)
    torch.testing.assert_close(both[:, 1], top, atol=1e-5, rtol=1e-6)
    # token_logprobs: one token per row or several, leading dims kept
    exact = torch.log_softmax(h @ layer.weight.detach().T + layer.bias.detach(), 1)
    tokens = torch.randint(0, V, (8, 3), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(layer.token_logprobs(h, tokens), exact.gather(1, tokens), atol=2e-5, rtol=0)
    torch.testing.assert_close(layer.token_logprobs(h.reshape(2, 4, D), tokens[:, 0].reshape(2, 4)),
                               exact.gather(1, tokens[:, :1]).reshape(2, 4), atol=2e-5, rtol=0)


def test_generator_reproducible_and_extreme_inputs_give_no_nan(setup):
    layer, h = setup
    a = layer.sample(h, generator=torch.Generator().manual_seed(3))
    b = layer.sample(h, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.shape == (8,)
    greedy = layer.topk(h, k=1)[1][:, 0]
    assert torch.equal(layer.sample(h, temperature=1e-4, seeds=torch.arange(8)), greedy)
    # top_p alone at a tiny temperature: the nucleus is placed against the exact top-1, not against a
    # tail bound far above it (whose reference would underflow every mass and empty the nucleus)
    for t in (1e-2, 1e-4):
        assert torch.equal(layer.sample(h, temperature=t, top_p=0.9, seeds=torch.arange(8)), greedy)
        assert torch.equal(layer.sample(h[:1], temperature=t, top_p=0.9, seeds=torch.arange(1)), greedy[:1])
    out = layer.sample(200 * h, seeds=torch.arange(8), return_logprobs=True, top_p=0.9, min_p=0.5)
    assert torch.isfinite(out.logprobs).all() and torch.isfinite(out.truncated_logprobs).all()
    assert torch.equal(out.tokens, layer.topk(200 * h, k=1)[1][:, 0])
    assert layer.sample(h.reshape(2, 4, D), top_k=0, seeds=torch.arange(8).reshape(2, 4)).shape == (2, 4)


@contextlib.contextmanager
def _backend(name):
    """Run the torchaq ops on CPU through the C++ kernels, the references, or the Triton kernels (interpreter)."""
    if name == "cpp":
        yield
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "overriding a previously registered kernel"
        with torch.library._scoped_library("torchaq", "IMPL") as lib:
            for op, ref in ops.REFERENCES.items():
                lib.impl(op, ref, "CPU")
            if name == "triton":  # as on CUDA: Triton LUT / scan kernels, references for the rest
                pytest.importorskip("triton")
                from torchaq.triton_kernels.register import KERNELS

                for op, fn in KERNELS.items():
                    lib.impl(op, fn, "CPU")
            yield


@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_a_row_is_the_same_alone_or_in_any_batch(setup, backend):
    layer, h = setup
    layer.shortlist = False  # the int8 shortlist is C++-only; the re-score itself is what is compared
    h = torch.cat([h, 3 * h[:2]])
    seeds = torch.arange(h.shape[0]) * 7919
    tokens = torch.randint(0, V, (h.shape[0], 2), generator=torch.Generator().manual_seed(0))
    calls = {
        "topk": lambda x, i: torch.cat(layer.topk(x, k=5), 1),
        "log_softmax_topk": lambda x, i: layer.log_softmax_topk(x, k=5)[0],
        "token_logprobs": lambda x, i: layer.token_logprobs(x, tokens[i]),
        "sample": lambda x, i: layer.sample(x, seeds=seeds[i], candidates=16),
        "sample top_p, logprobs": lambda x, i: torch.stack(
            [t.double() for t in layer.sample(x, seeds=seeds[i], top_p=0.8, return_logprobs=True)], -1),
        "sample top_k": lambda x, i: layer.sample(x, seeds=seeds[i], top_k=20, temperature=0.7),
    }
    with _backend(backend):
        for name, call in calls.items():
            idx = torch.arange(h.shape[0])
            full = call(h, idx)
            alone = torch.cat([call(h[i:i + 1], idx[i:i + 1]) for i in range(h.shape[0])])
            perm = torch.tensor([5, 0, 9, 3])
            other = call(h[perm], perm)
            assert torch.equal(full, alone), (backend, name)
            assert torch.equal(full[perm], other), (backend, name)


def test_triton_rows_are_the_same_alone_or_in_any_batch():
    """The Triton kernels (under the interpreter on CPU: seconds per call, so a tiny layer) keep each
    row's numbers independent of its batch; the layer on them (references for the other ops, as on
    CUDA) then gives a row the same top-k, log-probabilities and token alone or in a batch."""
    pytest.importorskip("triton")
    g = torch.Generator().manual_seed(0)
    weight, h = torch.randn(200, 8, generator=g), torch.randn(3, 8, generator=g)
    layer = torchaq.QuantizedSoftmax(weight, num_subspaces=4, progress=False, fit_iters=1).eval()
    layer.shortlist = False
    with _backend("triton"):
        for name, call in {
            "compute_lut": lambda x: torch.ops.torchaq.compute_lut(layer.quantizer.pad(x), layer.quantizer.codebooks),
            "lut_score": lambda x: torch.ops.torchaq.lut_score(layer.quantizer.lut(x), layer.packed_codes, 200, None),
            "lut_topk": lambda x: torch.cat(torch.ops.torchaq.lut_topk(layer.quantizer.lut(x), layer.packed_codes, 200,
                                                                       17, None), 1),
            "sample": lambda x: torch.stack([t.double() for t in layer.sample(
                x, seeds=torch.arange(x.shape[0]) if x.shape[0] > 1 else torch.tensor([2]), top_p=0.9,
                return_logprobs=True)], -1),
            "sample untruncated (layer_sample)": lambda x: layer.sample(  # the one-op path's composition
                x, seeds=torch.arange(x.shape[0]) if x.shape[0] > 1 else torch.tensor([2]), temperature=0.8),
        }.items():
            full = call(h)
            assert torch.equal(full[2:], call(h[2:])), name
            if not name.startswith("sample"):
                assert torch.equal(full[:2], call(h[:2])), name


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda l, h: l.sample(h, min_p=0.0), "min_p"),
        (lambda l, h: l.sample(h, min_p=1.5), "min_p"),
        (lambda l, h: l.sample(h, min_p=True), "min_p"),
        (lambda l, h: l.sample(h, top_p=0.0), "top_p"),
        (lambda l, h: l.sample(h, top_p=1.01), "top_p"),
        (lambda l, h: l.sample(h, top_k=-1), "top_k"),
        (lambda l, h: l.sample(h, top_k=2.5), "top_k"),
        (lambda l, h: l.sample(h, seeds=torch.arange(3)), "seeds must have shape"),
        (lambda l, h: l.sample(h, seeds=torch.zeros(8)), "seeds must be an integer tensor"),
        (lambda l, h: l.sample(h, seeds=[1] * 8), "seeds must be an integer tensor"),
        (lambda l, h: l.sample(h, seeds=torch.arange(8), generator=torch.Generator()), "generator or seeds"),
        (lambda l, h: l.sample(h, temperature=1e-44), "temperature"),
        (lambda l, h: l.sample(h, temperature=0.0), "temperature"),
        (lambda l, h: l.sample(h, candidates=0), "candidates"),
        (lambda l, h: l.sample(h, method="dense"), "method"),
        (lambda l, h: l.sample(h, method="candidates", min_p=0.1), "min_p"),
        (lambda l, h: l.token_logprobs(h, torch.zeros(8)), "tokens must be an int64"),
        (lambda l, h: l.token_logprobs(h, torch.zeros(7, dtype=torch.long)), "tokens must have shape"),
        (lambda l, h: l.token_logprobs(h, torch.full((8,), V)), "tokens must be class ids"),
        (lambda l, h: l.token_logprobs(h, torch.zeros(8, dtype=torch.long), temperature=-1.0), "temperature"),
    ],
)
def test_bad_inputs_name_the_argument(setup, call, match):
    layer, h = setup
    with pytest.raises(ValueError, match=match):
        call(layer, h)


def test_non_finite_error_scales_are_refused_after_every_change(setup):
    """The finiteness check of the error scales is cached per tensor version: a change re-arms it."""
    layer, h = setup
    layer.sample(h, seeds=torch.arange(8))  # checked and cached
    outside = next(i for i in range(V) if i not in set(layer.side_rows.tolist()))
    with torch.no_grad():
        layer.error_scales[outside] = math.inf  # an in-place write: a new version
    with pytest.raises(RuntimeError, match="error_scales is not finite"):
        layer.sample(h, seeds=torch.arange(8))
    layer.refresh(refit=True)
    layer.sample(h, seeds=torch.arange(8))
