"""Triton kernels against the torch reference.

Without a GPU the kernels run under ``TRITON_INTERPRET=1`` (set in conftest.py) on CPU tensors:
these tests are never skipped on CPU. With a GPU the same tests run on CUDA tensors, and the
GPU-only tests below add dispatch through ``torch.ops.torchaq.*``, bf16 queries, large N and
``torch.compile``.
"""
import os

import pytest
import torch

triton = pytest.importorskip("triton")

from torchaq import ops  # noqa: E402
from torchaq.triton_kernels import triton_compute_lut, triton_lut_score, triton_lut_topk  # noqa: E402
from torchaq.triton_kernels.scan import decode_keys  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
DEV = "cuda" if HAS_CUDA else "cpu"
if not HAS_CUDA:
    assert os.environ.get("TRITON_INTERPRET") == "1", "conftest.py must set TRITON_INTERPRET=1 without a GPU"
gpu_only = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


def _problem(batch, m, n, bits, dsub=3, bias=True, seed=0, device=DEV, qdtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    k = 16 if bits == 4 else 256
    queries = torch.randn(batch, m * dsub, generator=g).to(device=device, dtype=qdtype)
    codebooks = torch.randn(m, k, dsub, generator=g).to(device)
    codes = torch.randint(0, k, (n, m), generator=g, dtype=torch.uint8).to(device)
    packed = ops.pack_codes_reference(codes, bits)
    b = torch.randn(n, generator=g).to(device) if bias else None
    return queries, codebooks, packed, b


def _check_topk(lut, packed, n, k, bias, vals, idx, atol=1e-4):
    ref_v, _ = ops.lut_topk_reference(lut.float(), packed, n, k, bias)
    kk = min(k, n)
    assert vals.shape == idx.shape == (lut.shape[0], kk)
    assert vals.dtype == torch.float32 and idx.dtype == torch.int64
    torch.testing.assert_close(vals, ref_v, atol=atol, rtol=1e-4)
    # the returned classes carry the returned scores, without repeats
    full = ops.lut_score_reference(lut.float(), packed, n, bias)
    torch.testing.assert_close(full.gather(1, idx), vals, atol=atol, rtol=1e-4)
    for row in idx:
        assert row.unique().numel() == kk


# ------------------------------------------------------------------------------------------------
# compute_lut
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("batch,m,bits,dsub", [(1, 3, 4, 2), (5, 4, 4, 3), (3, 2, 8, 5), (2, 3, 8, 17)])
def test_compute_lut(batch, m, bits, dsub):
    q, cb, _, _ = _problem(batch, m, 1, bits, dsub=dsub)
    torch.testing.assert_close(triton_compute_lut(q, cb), ops.compute_lut_reference(q, cb), atol=1e-4, rtol=1e-5)


def test_compute_lut_fp16_out_and_strided_queries():
    q, cb, _, _ = _problem(6, 4, 1, 4, dsub=2)
    wide = torch.randn(6, 2 * q.shape[1], device=DEV)
    wide[:, ::2] = q  # non-contiguous view with stride 2
    ref = ops.compute_lut_reference(q, cb)
    out = triton_compute_lut(wide[:, ::2], cb, out_dtype=torch.float16)
    assert out.dtype == torch.float16 and out.is_contiguous()
    torch.testing.assert_close(out.float(), ref, atol=1e-2, rtol=1e-3)


# ------------------------------------------------------------------------------------------------
# lut_score (dense, exact float sums)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "batch,m,n,bits,bias,gather",
    [(1, 5, 70, 4, True, False), (3, 4, 131, 4, False, True), (2, 3, 45, 8, True, True), (17, 2, 33, 8, False, False)],
)
def test_lut_score(batch, m, n, bits, bias, gather):
    q, cb, packed, b = _problem(batch, m, n, bits, bias=bias)
    lut = ops.compute_lut_reference(q, cb)
    out = triton_lut_score(lut, packed, n, b, use_gather=gather)
    torch.testing.assert_close(out, ops.lut_score_reference(lut, packed, n, b), atol=1e-4, rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# lut_topk (scan + fused per-block top-k + merge)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "batch,m,n,bits,k,bias,extra",
    [
        (1, 5, 300, 4, 10, True, {}),  # odd M (padding nibble), N not a multiple of 32 or the tile
        (3, 4, 300, 4, 10, False, {}),
        (2, 3, 200, 8, 7, True, {}),
        (1, 3, 150, 8, 1, False, {}),
        (3, 5, 300, 4, 150, True, {}),  # k > default tile (128): tile grows to 256
        (2, 5, 300, 4, 40, True, dict(block_n=32, num_splits=3)),  # k > block size asked for
        (17, 3, 97, 4, 5, True, dict(block_b=4)),  # several query tiles, partial last one
        (2, 3, 50, 8, 80, True, {}),  # k > N: returns all N
        (2, 5, 300, 4, 12, True, dict(use_gather=True)),
        (2, 3, 100, 8, 12, False, dict(use_gather=True, p_chunk=4)),
        (1, 7, 333, 4, 20, True, dict(num_splits=1)),  # one split: no merge step
    ],
)
def test_lut_topk(batch, m, n, bits, k, bias, extra):
    q, cb, packed, b = _problem(batch, m, n, bits, bias=bias, seed=n + k)
    lut = ops.compute_lut_reference(q, cb)
    vals, idx = triton_lut_topk(lut, packed, n, k, b, **extra)
    _check_topk(lut, packed, n, k, b, vals, idx)


@pytest.mark.parametrize("trend", [1.0, -1.0, 0.0])
def test_lut_topk_many_tiles_per_program(trend):
    # one program walks 11 tiles: with a rising bias every tile updates the running top-k, with a
    # falling one all tiles after the first are skipped by the k-th-best test, with none: a mix
    n = 700
    q, cb, packed, b = _problem(2, 3, n, 4, bias=True, seed=7)
    b = b + trend * torch.linspace(0, 50, n, device=DEV)
    lut = ops.compute_lut_reference(q, cb)
    vals, idx = triton_lut_topk(lut, packed, n, 5, b, num_splits=1, block_n=64, block_b=2)
    _check_topk(lut, packed, n, 5, b, vals, idx)


def test_lut_topk_fp16_lut():
    q, cb, packed, b = _problem(2, 4, 120, 4)
    lut = ops.compute_lut_reference(q, cb).half()
    vals, idx = triton_lut_topk(lut, packed, 120, 9, b)
    _check_topk(lut, packed, 120, 9, b, vals, idx)  # the reference sums the same fp16 entries


def test_lut_topk_large_k_falls_back_to_dense():
    n = 2100  # k = 2100 > largest register tile (2048): dense scores + torch.topk
    q, cb, packed, b = _problem(1, 2, n, 4, bias=True)
    lut = ops.compute_lut_reference(q, cb)
    vals, idx = triton_lut_topk(lut, packed, n, n, b)
    _check_topk(lut, packed, n, n, b, vals, idx)


def test_lut_topk_edge_shapes():
    q, cb, packed, b = _problem(2, 3, 40, 4)
    lut = ops.compute_lut_reference(q, cb)
    v, i = triton_lut_topk(lut, packed, 40, 0, b)
    assert v.shape == i.shape == (2, 0)
    with pytest.raises(ValueError):
        triton_lut_topk(lut, packed, 41, 3, b)  # shared argument checks from torchaq.ops


def test_decode_keys_roundtrip():
    s = torch.tensor([-float("inf"), -3.5, -0.0, 0.0, 1e-30, 2.25, float("inf")])
    bits = s.view(torch.int32)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    n = torch.arange(s.numel())
    keys = (ordered.long() << 32) | (4294967295 - n)
    vals, idx = decode_keys(keys)
    assert torch.equal(vals.view(torch.int32), bits) and torch.equal(idx, n)
    assert torch.equal(keys.argsort(), torch.arange(s.numel()))  # key order == score order


# ------------------------------------------------------------------------------------------------
# GPU only: dispatch, bf16 queries, large N, torch.compile
# ------------------------------------------------------------------------------------------------
@gpu_only
def test_cuda_dispatch_uses_triton():
    import torchaq  # noqa: F401  (loads the CUDA registrations)

    assert torch._C._dispatch_has_kernel_for_dispatch_key("torchaq::lut_topk", "CUDA")
    assert torch._C._dispatch_has_kernel_for_dispatch_key("torchaq::compute_lut", "CUDA")


@gpu_only
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("batch", [1, 8, 33])
def test_cuda_ops_bf16_large_n(bits, batch):
    import torchaq  # noqa: F401

    n, m = 100_003, 64 if bits == 4 else 32
    q, cb, packed, b = _problem(batch, m, n, bits, dsub=4, qdtype=torch.bfloat16)
    lut = torch.ops.torchaq.compute_lut(q, cb)
    torch.testing.assert_close(lut, ops.compute_lut_reference(q, cb), atol=1e-3, rtol=1e-4)
    score = torch.ops.torchaq.lut_score(lut, packed, n, b)
    torch.testing.assert_close(score, ops.lut_score_reference(lut, packed, n, b), atol=1e-3, rtol=1e-5)
    for k in (1, 100, 1000):
        vals, idx = torch.ops.torchaq.lut_topk(lut, packed, n, k, b)
        _check_topk(lut, packed, n, k, b, vals, idx, atol=1e-3)


@gpu_only
def test_cuda_torch_compile():
    import torchaq  # noqa: F401

    n = 5000
    q, cb, packed, b = _problem(4, 16, n, 4, dsub=2)

    def f(q):
        lut = torch.ops.torchaq.compute_lut(q, cb)
        return torch.ops.torchaq.lut_topk(lut, packed, n, 50, b)

    compiled = torch.compile(f, fullgraph=True)
    v, i = compiled(q)
    v_ref, i_ref = f(q)
    torch.testing.assert_close(v, v_ref)
    assert torch.equal(i, i_ref)


# ------------------------------------------------------------------------------------------------
# the ops' contract on the Triton path: strided inputs, non-finite refusal, opcheck
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [4, 8])
def test_strided_bias_reads_like_contiguous(bits):
    n, m = 300, 8
    q, cb, packed, _ = _problem(3, m, n, bits)
    lut = triton_compute_lut(q, cb)
    pair = torch.randn(n, 2, generator=torch.Generator().manual_seed(1)).to(DEV)
    strided = pair[:, 1]  # stride 2
    assert not strided.is_contiguous()
    v_s, i_s = triton_lut_topk(lut, packed, n, 7, strided)
    v_c, i_c = triton_lut_topk(lut, packed, n, 7, strided.contiguous())
    assert torch.equal(i_s, i_c) and torch.equal(v_s, v_c)
    torch.testing.assert_close(triton_lut_score(lut, packed, n, strided), triton_lut_score(lut, packed, n, strided.contiguous()))


@pytest.mark.parametrize("where", ["lut", "bias"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_refused_like_other_backends(where, bad):
    n, m = 100, 4
    q, cb, packed, b = _problem(2, m, n, 4)
    lut = triton_compute_lut(q, cb)
    if where == "lut":
        lut[1, 2, 3] = bad
    else:
        b[17] = bad
    with pytest.raises(ValueError, match="finite"):
        triton_lut_topk(lut, packed, n, 5, b)
    with pytest.raises(ValueError, match="finite"):
        ops.lut_topk_reference(lut, packed, n, 5, b)


def _opcheck_cases():
    q, cb, packed, b = _problem(3, 6, 70, 4, dsub=2)
    lut = ops.compute_lut_reference(q, cb)
    q8, cb8, packed8, _ = _problem(2, 3, 40, 8, dsub=2)
    lut8 = ops.compute_lut_reference(q8, cb8)
    return [
        (torch.ops.torchaq.compute_lut.default, (q, cb)),
        (torch.ops.torchaq.lut_score.default, (lut, packed, 70, b)),
        (torch.ops.torchaq.lut_topk.default, (lut, packed, 70, 9, b)),
        (torch.ops.torchaq.lut_topk.default, (lut8, packed8, 40, 5, None)),
        (torch.ops.torchaq.lut_score_quantized.default, (lut, packed, 70, b)),
    ]


@pytest.mark.skipif(HAS_CUDA, reason="the CUDA suite runs opcheck on the registered CUDA kernels")
def test_opcheck_triton_kernels_under_interpreter():
    """The Triton kernels keep the op contract (schema, fake kernel, autograd registration): registered
    for the CPU key in a scoped library, they run under TRITON_INTERPRET=1 through opcheck."""
    import warnings

    from torchaq.triton_kernels.register import register_kernels

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "overriding a previously registered kernel" (the C++ one)
        with torch.library._scoped_library("torchaq", "IMPL") as lib:
            register_kernels(lib, "CPU")
            for op, args in _opcheck_cases():
                # aot_dispatch traces with fake tensors, which the interpreter cannot read: the
                # compile path of the Triton kernels is checked on a GPU (test_cuda_opcheck)
                torch.library.opcheck(op, args, test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
            v, i = torch.ops.torchaq.lut_topk(*_opcheck_cases()[2][1])  # really ran the Triton kernel
            v_ref, _ = ops.lut_topk_reference(*_opcheck_cases()[2][1])
            torch.testing.assert_close(v, v_ref, atol=1e-4, rtol=1e-4)
            # lut_score_quantized on the Triton path: the exact float scores, step 0
            scores, step = torch.ops.torchaq.lut_score_quantized(*_opcheck_cases()[4][1])
            torch.testing.assert_close(scores, ops.lut_score_reference(*_opcheck_cases()[4][1]), atol=1e-4, rtol=1e-4)
            assert bool((step == 0).all())


@gpu_only
def test_cuda_opcheck():
    import torchaq  # noqa: F401  (loads the CUDA registrations)

    for op, args in _opcheck_cases():
        torch.library.opcheck(op, args)
