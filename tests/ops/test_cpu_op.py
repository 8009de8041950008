"""The C++ CPU kernels (torchaq/csrc) against the pure-torch references in torchaq.ops.

Contract checked here (stated in torchaq/csrc/scan.cpp):

* ``lut_score`` and 8-bit ``lut_topk``: exact float32 sums (to float rounding).
* 4-bit ``lut_topk``: the LUT is quantized per query to uint8 with
  ``scale = min(255 / max_m range_m, (65535 - M) / sum_m range_m)``; every returned value is
  within ``M / (2 * scale)`` (plus float rounding) of the exact score of its class, and the
  returned classes are a valid top-k up to twice that bound. On gaussian LUTs the recall of the
  exact top-10 is >= 0.95 (RECALL_TOL below).
* Every kernel set (scalar, AVX2, AVX-512) returns identical values and indices; ties rank the
  smaller class index first.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import torchaq  # noqa: F401  (loads the C++ kernels)
from conftest import ISAS, isa
from torchaq import ops
from torchaq.backends import CPU_EXTENSION_LOADED

RECALL_TOL = 0.95  # mean recall@10 of the exact top-10 on gaussian LUTs, 4-bit scan

if CPU_EXTENSION_LOADED:
    from torchaq import _C



# that the extension loads at all is tested in test_backends.py, outside this module's skip
pytestmark = pytest.mark.skipif(not CPU_EXTENSION_LOADED, reason="torchaq._C not built")




def make_case(batch, n, m, bits, seed, scale=1.0, bias=False, lut_values=None):
    g = torch.Generator().manual_seed(seed)
    k_entries = 16 if bits == 4 else 256
    codes = torch.randint(0, k_entries, (n, m), dtype=torch.uint8, generator=g)
    if lut_values is None:
        lut = torch.randn(batch, m, k_entries, generator=g) * scale
    else:  # few distinct values: many tied scores
        lut = torch.tensor(lut_values, dtype=torch.float32)[
            torch.randint(0, len(lut_values), (batch, m, k_entries), generator=g)
        ]
    b = torch.randn(n, generator=g) * scale if bias else None
    return lut, ops.pack_codes(codes, bits), codes, b


def exact_scores(lut, codes, bias):
    """float64 scores, (B, N)."""
    m = lut.shape[1]
    s = lut.double()[:, torch.arange(m), codes.long()].sum(-1) if codes.numel() else lut.new_zeros(lut.shape[0], 0)
    s = s.double()
    return s + bias.double() if bias is not None else s


def quant_bound(lut, bias):
    """Per-query bound on |returned value - exact score| of the 4-bit scan, (B, 1) float64."""
    l = lut.double()
    m = l.shape[1]
    r = l.amax(-1) - l.amin(-1)
    maxr, sumr = r.amax(-1), r.sum(-1)
    scale = torch.minimum(255 / maxr, (65535 - m) / sumr)
    step = torch.where(maxr > 0, 1 / scale, torch.zeros_like(maxr))
    # float32 rounding of the sum and of the de-quantization, on the magnitudes involved
    mag = l.abs().amax(-1).sum(-1) + (bias.abs().max().double() if bias is not None and bias.numel() else 0)
    return (0.5 * m * step + 1e-5 * mag + 1e-30)[:, None]


def check_topk(values, indices, exact, bound, k):
    batch, n = exact.shape
    kk = min(k, n)
    assert values.shape == (batch, kk) and indices.shape == (batch, kk)
    assert values.dtype == torch.float32 and indices.dtype == torch.int64
    if batch == 0 or kk == 0:
        return
    assert bool((values[:, :-1] >= values[:, 1:]).all()), "values must be sorted best first"
    assert int(indices.min()) >= 0 and int(indices.max()) < n
    for q in range(batch):
        assert len(set(indices[q].tolist())) == kk, "duplicate indices"
    picked = exact.gather(1, indices)
    err = (values.double() - picked).abs()
    assert bool((err <= bound).all()), f"value error {float((err - bound).max())} above the bound"
    # valid top-k of the de-quantized scores: nothing left out beats a returned class by more
    # than the quantization error of both
    if kk < n:
        rest = exact.scatter(1, indices, float("-inf"))
        assert bool((picked.amin(1, keepdim=True) >= rest.amax(1, keepdim=True) - 2 * bound).all())


def run_all_isas(fn):
    outs = []
    for name in ISAS:
        with isa(name):
            outs.append(fn())
    for o in outs[1:]:
        for a, b in zip(outs[0], o):
            assert torch.equal(a, b), "kernel sets disagree"
    return outs[0]


# ------------------------------------------------------------------------------------------
# lut_topk, 4-bit
# ------------------------------------------------------------------------------------------
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    batch=st.integers(0, 6),
    n=st.integers(1, 400),
    m=st.integers(1, 21),
    k=st.integers(0, 60),
    log_scale=st.sampled_from([-30, -6, 0, 6, 30]),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_lut_topk_4bit(batch, n, m, k, log_scale, bias, seed):
    lut, packed, codes, b = make_case(batch, n, m, 4, seed, scale=10.0**log_scale, bias=bias)
    v, i = run_all_isas(lambda: ops.lut_topk(lut, packed, n, k, b))
    check_topk(v, i, exact_scores(lut, codes, b), quant_bound(lut, b), k)


@pytest.mark.parametrize("n,k", [(5000, 1), (5000, 10), (20011, 30), (20011, 100), (3000, 1000)])
@pytest.mark.parametrize("bias", [False, True])
def test_lut_topk_4bit_large(n, k, bias):
    """Enough blocks for the two-pass top-k (k >= 24) and for several buffer compactions."""
    lut, packed, codes, b = make_case(9, n, 24, 4, seed=n + k, bias=bias)
    v, i = run_all_isas(lambda: ops.lut_topk(lut, packed, n, k, b))
    check_topk(v, i, exact_scores(lut, codes, b), quant_bound(lut, b), k)


def test_lut_topk_4bit_rescan_path():
    """B * nblocks * 64 bytes above the 32 MB the two-pass top-k keeps its pass-1 sums in: pass 2
    re-scans its blocks instead, with the same results as a small batch (sums kept)."""
    n, k, batch = 262_000, 40, 66
    lut, packed, codes, b = make_case(batch, n, 4, 4, seed=11, bias=True)
    assert batch * packed.shape[0] * 64 > 32 << 20
    v, i = ops.lut_topk(lut, packed, n, k, b)
    for rows in (slice(0, 3), slice(64, 66)):
        v2, i2 = run_all_isas(lambda: ops.lut_topk(lut[rows], packed, n, k, b))
        assert torch.equal(v2, v[rows]) and torch.equal(i2, i[rows])
    check_topk(v[:3], i[:3], exact_scores(lut[:3], codes, b), quant_bound(lut[:3], b), k)


def test_lut_topk_4bit_codes_beyond_cache():
    """Codes over 16 MB (topk.h kCodesInCache: LLM-sized heads) run the two-pass top-k on larger
    sub-batches of queries (each code chunk read once for all of them): same results as one query
    at a time, on every ISA."""
    n, m, k, batch = 131_100, 256, 40, 9
    lut, packed, codes, b = make_case(batch, n, m, 4, seed=23, bias=True)
    assert packed.numel() > 16 << 20
    v, i = ops.lut_topk(lut, packed, n, k, b)
    for row in (0, 5, 8):
        v2, i2 = run_all_isas(lambda: ops.lut_topk(lut[row:row + 1], packed, n, k, b))
        assert torch.equal(v2, v[row:row + 1]) and torch.equal(i2, i[row:row + 1])
    check_topk(v[:2], i[:2], exact_scores(lut[:2], codes, b), quant_bound(lut[:2], b), k)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("batch", [5, 9])
def test_thread_split_gives_identical_results(bits, batch):
    """The scan splits code blocks (batch 5) or queries (batch 9: groups of four per thread, one
    short) over threads; the total order (key, then index) makes the merged top-k independent of
    the split. Also checks the op really runs threaded: the extension must be built with
    OpenMP, or at::parallel_for silently runs serially."""
    lut, packed, codes, b = make_case(batch, 20011, 12, bits, seed=5, bias=True)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.lut_topk(lut, packed, 20011, 60, b)
        torch.set_num_threads(max(2, old))
        many = ops.lut_topk(lut, packed, 20011, 60, b)
        threads = _C.parallel_threads()
    finally:
        torch.set_num_threads(old)
    assert torch.equal(one[0], many[0]) and torch.equal(one[1], many[1])
    assert threads >= 2, "torchaq._C runs at::parallel_for on one thread: built without -fopenmp?"


def test_lut_topk_4bit_recall():
    lut, packed, codes, _ = make_case(16, 20000, 32, 4, seed=7)
    _, i = ops.lut_topk(lut, packed, 20000, 10)
    ref = exact_scores(lut, codes, None).topk(10, dim=1).indices
    recall = sum(len(set(a.tolist()) & set(r.tolist())) for a, r in zip(i, ref)) / ref.numel()
    assert recall >= RECALL_TOL


@pytest.mark.parametrize("bits,n", [(4, 3000), (4, 9001), (8, 3000)])
def test_lut_topk_ties(bits, n):
    """Many equal scores: any valid top-k, identical on every kernel set (n = 9001 takes the
    two-pass path with a partial last block)."""
    lut, packed, codes, _ = make_case(5, n, 6, bits, seed=3, lut_values=[0.0, 1.0, 2.0])
    v, i = run_all_isas(lambda: ops.lut_topk(lut, packed, n, 50))
    bound = quant_bound(lut, None) if bits == 4 else 1e-5
    check_topk(v, i, exact_scores(lut, codes, None), bound, 50)


@pytest.mark.parametrize("bits", [4, 8])
def test_lut_topk_all_equal_prefers_small_indices(bits):
    k_entries = 16 if bits == 4 else 256
    lut = torch.full((2, 5, k_entries), 0.25)
    packed = ops.pack_codes(torch.randint(0, k_entries, (1000, 5), dtype=torch.uint8), bits)
    v, i = run_all_isas(lambda: ops.lut_topk(lut, packed, 1000, 40))
    assert torch.equal(i, torch.arange(40).expand(2, 40))
    torch.testing.assert_close(v, torch.full((2, 40), 1.25))


def test_lut_topk_no_overflow_at_uint16_limit():
    """M = 257 entries of 255 would overflow uint16; the scale must shrink instead."""
    m = 257
    lut = torch.zeros(1, m, 16)
    lut[..., 15] = 1.0
    codes = torch.full((100, m), 15, dtype=torch.uint8)
    codes[0] = 0  # one class scores 0, the rest score M
    packed = ops.pack_codes(codes, 4)
    v, i = ops.lut_topk(lut, packed, 100, 100)
    assert int(i[0, -1]) == 0
    assert abs(float(v[0, 0]) - m) <= float(quant_bound(lut, None))


# ------------------------------------------------------------------------------------------
# lut_topk, 8-bit (exact float sums)
# ------------------------------------------------------------------------------------------
@settings(max_examples=25, deadline=None)
@given(
    batch=st.integers(0, 4),
    n=st.integers(1, 300),
    m=st.integers(1, 9),
    k=st.integers(0, 40),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_lut_topk_8bit(batch, n, m, k, bias, seed):
    lut, packed, codes, b = make_case(batch, n, m, 8, seed, bias=bias)
    v, i = run_all_isas(lambda: ops.lut_topk(lut, packed, n, k, b))
    exact = exact_scores(lut, codes, b)
    check_topk(v, i, exact, 1e-5 * (1 + exact.abs().amax(1, keepdim=True)), k)
    rv, _ = ops.lut_topk_reference(lut, packed, n, k, b)
    torch.testing.assert_close(v, rv, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------
# lut_score and compute_lut (exact)
# ------------------------------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(
    batch=st.integers(0, 5),
    n=st.integers(0, 300),
    m=st.integers(1, 21),
    bits=st.sampled_from([4, 8]),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_lut_score(batch, n, m, bits, bias, seed):
    lut, packed, codes, b = make_case(batch, n, m, bits, seed, bias=bias)
    (s,) = run_all_isas(lambda: (ops.lut_score(lut, packed, n, b),))
    torch.testing.assert_close(s, ops.lut_score_reference(lut, packed, n, b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("k_entries", [16, 256, 5])
@pytest.mark.parametrize("dsub", [1, 2, 3, 4, 8, 16])
def test_compute_lut(k_entries, dsub):
    """Power-of-two dsub <= 16 reads the codebooks in place (pairwise sums), others transpose."""
    q, cb = torch.randn(7, 15 * dsub), torch.randn(15, k_entries, dsub)
    (lut,) = run_all_isas(lambda: (ops.compute_lut(q, cb),))
    torch.testing.assert_close(lut, ops.compute_lut_reference(q, cb), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ops.compute_lut(q.double(), cb), ops.compute_lut_reference(q.double(), cb))


# ------------------------------------------------------------------------------------------
# shapes: B = 0, N = 0, k = 0, k > N, non-contiguous inputs
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [4, 8])
def test_edge_shapes(bits):
    lut, packed, _, _ = make_case(3, 40, 5, bits, seed=1)
    v, i = ops.lut_topk(lut, packed, 40, 100)  # k > N returns N
    assert v.shape == (3, 40) and sorted(i[0].tolist()) == list(range(40))
    assert ops.lut_topk(lut, packed, 40, 0)[0].shape == (3, 0)
    assert ops.lut_topk(lut[:0], packed, 40, 5)[1].shape == (0, 5)
    assert ops.lut_score(lut[:0], packed, 40).shape == (0, 40)
    empty = ops.pack_codes(torch.zeros(0, 5, dtype=torch.uint8), bits)
    assert ops.lut_topk(lut, empty, 0, 5)[0].shape == (3, 0)
    assert ops.lut_score(lut, empty, 0).shape == (3, 0)


@pytest.mark.parametrize("bits", [4, 8])
def test_non_contiguous(bits):
    lut, packed, codes, b = make_case(4, 1000, 7, bits, seed=2, bias=True)
    lut_nc = lut.transpose(0, 1).contiguous().transpose(0, 1)
    wide = torch.zeros(*packed.shape[:2], 64, dtype=torch.uint8)
    wide[..., ::2] = packed
    packed_nc = wide[..., ::2]
    b_nc = torch.stack([b, b], 1)[:, 0]
    assert not (lut_nc.is_contiguous() or packed_nc.is_contiguous() or b_nc.is_contiguous())
    v, i = ops.lut_topk(lut_nc, packed_nc, 1000, 20, b_nc)
    v2, i2 = ops.lut_topk(lut, packed, 1000, 20, b)
    assert torch.equal(v, v2) and torch.equal(i, i2)
    torch.testing.assert_close(ops.lut_score(lut_nc, packed_nc, 1000, b_nc), ops.lut_score(lut, packed, 1000, b))
    q = torch.randn(60, 5).T  # (5, 60) non-contiguous
    cb = torch.randn(15, 16, 4)
    torch.testing.assert_close(ops.compute_lut(q, cb), ops.compute_lut_reference(q, cb), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------
# registration: torch.compile, the scalar switch (opcheck: tests/ops/test_opcheck.py)
# ------------------------------------------------------------------------------------------
def test_torch_compile_fullgraph():
    lut_cb = torch.randn(7, 16, 4)
    codes = torch.randint(0, 16, (300, 7), dtype=torch.uint8)

    def f(queries, packed):
        lut = ops.compute_lut(queries, lut_cb)
        v, i = ops.lut_topk(lut, packed, 300, 10)
        s = ops.lut_score(lut, packed, 300)
        return v, i, s.gather(1, i)

    packed = ops.pack_codes(codes, 4)
    q = torch.randn(4, 28)
    got = torch.compile(f, fullgraph=True)(q, packed)
    want = f(q, packed)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


_SCRIPT = """
import torch, torchaq
from torchaq import ops, _C
g = torch.Generator().manual_seed(0)
packed = ops.pack_codes(torch.randint(0, 16, (3000, 9), dtype=torch.uint8, generator=g), 4)
lut = torch.randn(5, 9, 16, generator=g)
bias = torch.randn(3000, generator=g)
v, i = ops.lut_topk(lut, packed, 3000, 17, bias)
torch.save((_C.cpu_isa(), v, i), {path!r})
"""


def test_force_scalar_env(tmp_path):
    """TORCHAQ_FORCE_SCALAR=1 (set before the process starts) selects the scalar kernels, which
    return exactly what the SIMD kernels return."""
    path = str(tmp_path / "out.pt")
    env = {**os.environ, "TORCHAQ_FORCE_SCALAR": "1"}
    env.pop("TORCHAQ_CPU_ISA", None)
    subprocess.run([sys.executable, "-c", _SCRIPT.format(path=path)], env=env, check=True)
    name, v, i = torch.load(path)
    assert name == "scalar"
    g = torch.Generator().manual_seed(0)
    packed = ops.pack_codes(torch.randint(0, 16, (3000, 9), dtype=torch.uint8, generator=g), 4)
    lut = torch.randn(5, 9, 16, generator=g)
    bias = torch.randn(3000, generator=g)
    v2, i2 = ops.lut_topk(lut, packed, 3000, 17, bias)
    assert torch.equal(v, v2) and torch.equal(i, i2)


# ------------------------------------------------------------------------------------------
# bad inputs: the C++ checks mirror torchaq.ops.check_lut_scan_args
# ------------------------------------------------------------------------------------------
def test_bad_inputs():
    lut, packed, _, _ = make_case(2, 100, 6, 4, seed=6)
    topk = torch.ops.torchaq.lut_topk
    with pytest.raises(TypeError, match="packed must be uint8"):
        topk(lut, packed.int(), 100, 5)
    with pytest.raises(ValueError, match="packed must be"):
        topk(lut, packed[..., :16], 100, 5)
    with pytest.raises(TypeError, match="lut must be float32"):
        topk(lut.double(), packed, 100, 5)
    with pytest.raises(ValueError, match="K = 16"):
        topk(lut[..., :8], packed, 100, 5)
    with pytest.raises(ValueError, match=r"lut must be \(B, M, K\)"):
        topk(lut[0], packed, 100, 5)
    with pytest.raises(ValueError, match="k must be >= 0"):
        topk(lut, packed, 100, -1)
    with pytest.raises(ValueError, match="mismatched num_subspaces"):
        topk(lut[:, :2], packed, 100, 5)
    with pytest.raises(ValueError, match="num_classes=200 does not match"):
        topk(lut, packed, 200, 5)
    with pytest.raises(ValueError, match="bias must have shape"):
        topk(lut, packed, 100, 5, torch.zeros(99))
    with pytest.raises(TypeError, match="bias must be float32"):
        topk(lut, packed, 100, 5, torch.zeros(100, dtype=torch.float64))
    with pytest.raises(ValueError, match="finite"):
        topk(lut.index_fill(1, torch.tensor([0]), float("inf")), packed, 100, 5)
    with pytest.raises(ValueError, match="mismatched num_subspaces"):
        torch.ops.torchaq.lut_score(lut[:, :2], packed, 100)
    with pytest.raises(ValueError, match="codebooks cover"):
        torch.ops.torchaq.compute_lut(torch.randn(2, 10), torch.randn(3, 16, 4))


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("where", ["lut", "bias"])
def test_non_finite_scores_are_refused(bits, bad, where):
    """A nan / inf LUT entry or bias has no place in a ranking (the kernels would rank it
    differently): every kernel set and the reference refuse it with a clear error."""
    n = 3001  # enough blocks for the two-pass top-k, a partial last block
    lut, packed, _, b = make_case(2, n, 6, bits, seed=6, bias=True)
    if where == "lut":
        lut[1, 3, 5] = bad
    else:
        b[n - 1 if bad != bad else 17] = bad  # in the partial last block, or a full one
    for name in ISAS:
        with isa(name), pytest.raises(ValueError, match=f"finite {'lut' if where == 'lut' else 'bias'}"):
            ops.lut_topk(lut, packed, n, 50, b)
    with pytest.raises(ValueError, match="finite"):
        ops.lut_topk_reference(lut, packed, n, 50, b)

