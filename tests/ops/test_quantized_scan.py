"""``lut_score_quantized``: every class's score from the uint8-quantized LUT of the 4-bit scans.

The C++ kernel sets must equal the pure-torch reference bit for bit on quantized queries (the
uint16 sums are exact and the de-quantization is the same float ops), stay within ``M * step / 2`` of the exact float sums,
fall back to exact scores (step 0) where one scale cannot resolve the table, and refuse bad input.
"""
from __future__ import annotations

import pytest
import torch

import torchaq  # noqa: F401  (loads the C++ kernels)
from conftest import ISAS, isa
from torchaq import ops
from torchaq.backends import CPU_EXTENSION_LOADED

needs_cpp = pytest.mark.skipif(not CPU_EXTENSION_LOADED, reason="torchaq._C not built")


def make_case(batch, n, m, seed, scale=1.0, bias=False, bits=4):
    g = torch.Generator().manual_seed(seed)
    k = 16 if bits == 4 else 256
    codes = torch.randint(0, k, (n, m), dtype=torch.uint8, generator=g)
    lut = torch.randn(batch, m, k, generator=g) * scale
    b = torch.randn(n, generator=g) * scale if bias else None
    return lut, ops.pack_codes(codes, bits), b


def check_against_reference(lut, packed, n, b):
    """Every kernel set equals the reference bitwise; the scores are within the stated bound."""
    ref_scores, ref_step = ops.lut_score_quantized_reference(lut, packed, n, b)
    if CPU_EXTENSION_LOADED:
        for name in ISAS:
            with isa(name):
                scores, step = ops.lut_score_quantized(lut, packed, n, b)
            assert torch.equal(step, ref_step), f"{name}: step differs from the reference"
            # quantized rows are bitwise equal; exact rows (step 0) are float sums, whose order
            # differs between the C++ kernels and torch's reduction (as for lut_score)
            quantized = step > 0
            assert torch.equal(scores[quantized], ref_scores[quantized]), f"{name}: scores differ from the reference"
            torch.testing.assert_close(scores[~quantized], ref_scores[~quantized], rtol=1e-5, atol=1e-4)
    exact = ops.lut_score_reference(lut, packed, n, b).double()
    m = lut.shape[1]
    slack = 1e-5 * (lut.abs().amax(2).sum(1) + (b.abs().max() if b is not None and n else 0)).double()
    bound = 0.5 * m * ref_step.double() + slack + 1e-30
    assert bool(((ref_scores.double() - exact).abs() <= bound.unsqueeze(1)).all())
    return ref_scores, ref_step


@pytest.mark.parametrize("batch,n,m", [(1, 1, 1), (3, 100, 7), (5, 257, 21), (6, 33, 2), (9, 2000, 24), (0, 50, 4),
                                       (4, 0, 4)])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("scale", [1e-30, 1.0, 1e30])
def test_matches_reference_and_bound(batch, n, m, bias, scale):
    lut, packed, b = make_case(batch, n, m, seed=batch * 1000 + n + m, scale=scale, bias=bias)
    scores, step = check_against_reference(lut, packed, n, b)
    assert scores.shape == (batch, n) and step.shape == (batch,)
    if batch and n:
        assert bool((step > 0).all()), "gaussian tables are never coarse"


def test_large_table_and_thread_split():
    """Enough blocks and queries for several tasks (both split directions); threads change nothing."""
    lut, packed, b = make_case(13, 20011, 24, seed=7, bias=True)
    one = check_against_reference(lut, packed, 20011, b)
    if CPU_EXTENSION_LOADED:
        threads = torch.get_num_threads()
        try:
            torch.set_num_threads(2)
            two = ops.lut_score_quantized(lut, packed, 20011, b)
        finally:
            torch.set_num_threads(threads)
        assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])


def test_coarse_query_gets_exact_scores():
    """A codeword far from the rest in every subspace leaves the typical entries < 4 uint8 steps: that
    query is scored with the exact float sums (step 0); the other query of the batch is not."""
    lut, packed, _ = make_case(2, 300, 16, seed=3)
    lut[0, :, 5] = 1e4
    scores, step = check_against_reference(lut, packed, 300, None)
    assert float(step[0]) == 0.0 and float(step[1]) > 0.0
    assert torch.equal(scores[0], ops.lut_score_reference(lut[:1], packed, 300, None)[0])


def test_constant_table():
    """Every range 0: scale 1, every score is the offset (exact)."""
    lut = torch.full((2, 5, 16), 0.25)
    packed = ops.pack_codes(torch.randint(0, 16, (40, 5), dtype=torch.uint8), 4)
    scores, _ = check_against_reference(lut, packed, 40, None)
    assert bool((scores == 1.25).all())


def test_eight_bit_is_exact():
    lut, packed, b = make_case(3, 70, 3, seed=5, bias=True, bits=8)
    scores, step = check_against_reference(lut, packed, 70, b)
    assert torch.equal(scores, ops.lut_score_reference(lut, packed, 70, b)) and bool((step == 0).all())


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpp", marks=needs_cpp)])
def test_bad_inputs(backend):
    fn = ops.lut_score_quantized_reference if backend == "reference" else ops.lut_score_quantized
    lut, packed, b = make_case(2, 40, 4, seed=1, bias=True)
    bad = lut.clone()
    bad[1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="finite"):
        fn(bad, packed, 40, b)
    with pytest.raises(ValueError, match="finite"):
        fn(lut, packed, 40, b.clone().fill_(float("inf")))
    with pytest.raises(ValueError, match="bias"):
        fn(lut, packed, 40, b[:5])
    with pytest.raises(ValueError, match="num_classes"):
        fn(lut, packed, 70, None)  # 3 blocks of 32, packed has 2
    with pytest.raises(ValueError, match="num_subspaces"):
        fn(lut[:, :2].contiguous(), packed, 40, None)
    with pytest.raises((ValueError, RuntimeError), match="columns"):
        fn(lut, packed, 40, b, -1)


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpp", marks=needs_cpp)])
@pytest.mark.parametrize("bits", [4, 8])
def test_columns_widen_the_buffer(backend, bits):
    """``columns``: the scores in the first N columns of a wider buffer, zeros after; the same scores
    as without (a coarse query included); fewer columns than classes changes nothing."""
    fn = ops.lut_score_quantized_reference if backend == "reference" else ops.lut_score_quantized
    lut, packed, b = make_case(3, 100, 7, seed=11, bias=True, bits=bits)
    if bits == 4:
        lut[1, :, 5] = 1e4  # a coarse query: exact scores
    plain, step = fn(lut, packed, 100, b)
    wide, wstep = fn(lut, packed, 100, b, 160)
    assert wide.shape == (3, 160) and torch.equal(wstep, step)
    assert torch.equal(wide[:, :100], plain) and bool((wide[:, 100:] == 0).all())
    narrow, _ = fn(lut, packed, 100, b, 50)
    assert torch.equal(narrow, plain)
