"""torch.ops.torchaq.anisotropic_normal_apply: the product A c of the joint codebook update."""
import pytest
import torch

from torchaq import ops

from torchaq import backends
from torchaq.ops.normal_apply import anisotropic_normal_apply_reference

needs_cpp = pytest.mark.skipif(not backends.CPU_EXTENSION_LOADED, reason="C++ extension not built")


def _case(n, m, k, dsub, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, m * dsub, generator=gen)
    codes = torch.randint(0, k, (n, m), generator=gen)
    eta = 1 + 9 * torch.rand(n, generator=gen)
    x_sq = (x * x).sum(1)
    coef = (eta - 1) / x_sq
    cb = torch.randn(m, k, dsub, generator=gen)
    return x, codes, coef, cb, eta


def test_reference_is_the_dense_normal_matrix():
    """(A c) against A = sum_i B_i^T W_i B_i formed densely, W_i = I + (eta_i - 1) u_i u_i^T."""
    n, m, k, dsub = 30, 3, 4, 2
    x, codes, coef, cb, eta = _case(n, m, k, dsub)
    big = torch.zeros(m * k * dsub, m * k * dsub, dtype=torch.float64)
    for i in range(n):
        sel = torch.zeros(m * dsub, m * k * dsub, dtype=torch.float64)  # B_i: picks codeword codes[i, s]
        for s in range(m):
            for t in range(dsub):
                sel[s * dsub + t, (s * k + codes[i, s]) * dsub + t] = 1
        u = (x[i] / x[i].norm()).double()
        w = torch.eye(m * dsub, dtype=torch.float64) + (eta[i] - 1).double() * torch.outer(u, u)
        big += sel.T @ w @ sel
    want = (big @ cb.double().reshape(-1)).reshape(m, k, dsub).float()
    torch.testing.assert_close(anisotropic_normal_apply_reference(x, codes, coef, cb), want, rtol=1e-4, atol=1e-4)


@needs_cpp
@pytest.mark.parametrize("n,m,k,dsub", [(300, 16, 16, 2), (200, 7, 16, 3), (100, 5, 256, 1), (64, 9, 16, 4), (1, 2, 16, 2)])
@pytest.mark.parametrize("code_dtype", [torch.int64, torch.uint8])
def test_cpp_matches_reference(n, m, k, dsub, code_dtype):
    x, codes, coef, cb, _ = _case(n, m, k, dsub, seed=n + m)
    codes = codes.to(code_dtype)
    got = ops.anisotropic_normal_apply(x, codes, coef, cb)
    ref = anisotropic_normal_apply_reference(x, codes, coef, cb)
    assert got.shape == (m, k, dsub) and got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
    # an unused codeword gets exactly zero
    unused = torch.ones(m, k, dtype=torch.bool)
    unused[torch.arange(m).expand(n, m), codes.long()] = False
    assert (got[unused] == 0).all()


@needs_cpp
def test_cpp_does_not_depend_on_threads_or_strides():
    x, codes, coef, cb, _ = _case(500, 24, 16, 2, seed=3)
    full = ops.anisotropic_normal_apply(x, codes, coef, cb)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert torch.equal(ops.anisotropic_normal_apply(x, codes, coef, cb), full)
    finally:
        torch.set_num_threads(threads)
    xt = x.T.contiguous().T  # a non-contiguous view of the same values
    assert torch.equal(ops.anisotropic_normal_apply(xt, codes, coef, cb), full)





@pytest.mark.parametrize("impl", ["op", "reference"])
def test_bad_inputs(impl):
    fn = ops.anisotropic_normal_apply if impl == "op" else anisotropic_normal_apply_reference
    x, codes, coef, cb, _ = _case(20, 4, 16, 2, seed=5)
    with pytest.raises(ValueError, match="M \\* dsub"):
        fn(x[:, :7].contiguous(), codes, coef, cb)
    with pytest.raises(TypeError, match="x must be float32"):
        fn(x.double(), codes, coef, cb)
    with pytest.raises(TypeError, match="coef must be float32"):
        fn(x, codes, coef.double(), cb)
    with pytest.raises(TypeError, match="codes must be int64 or uint8"):
        fn(x, codes.int(), coef, cb)
    with pytest.raises(ValueError, match="codes must have shape"):
        fn(x, codes[:5], coef, cb)
    with pytest.raises(ValueError, match="coef must have shape"):
        fn(x, codes, coef[:3], cb)
    with pytest.raises(ValueError, match="codebooks must be"):
        fn(x, codes, coef, cb[0])
    bad = codes.clone()
    bad[3, 2] = 16
    with pytest.raises(ValueError, match="codes must be in"):
        fn(x, bad, coef, cb)
    bad[3, 2] = -1
    with pytest.raises(ValueError, match="codes must be in"):
        fn(x, bad, coef, cb)


# --------------------------------------------------------------------------------- anisotropic_normal_rhs
def test_rhs_reference_is_the_dense_system():
    """b = sum_i B_i^T W_i x_i = sum_i B_i^T eta_i x_i, and diag A matches the dense A's diagonal."""
    n, m, k, dsub = 30, 3, 4, 2
    x, codes, coef, _, eta = _case(n, m, k, dsub, seed=9)
    from torchaq.ops.normal_apply import anisotropic_normal_rhs_reference

    rhs, diag = anisotropic_normal_rhs_reference(x, codes, eta, coef, k)
    want_b = torch.zeros(m, k, dsub, dtype=torch.float64)
    want_diag = torch.zeros(m, k, dsub, dtype=torch.float64)
    for i in range(n):
        u = (x[i] / x[i].norm()).double()
        w = torch.eye(m * dsub, dtype=torch.float64) + (eta[i] - 1).double() * torch.outer(u, u)
        wx = w @ x[i].double()
        for s in range(m):
            want_b[s, codes[i, s]] += wx[s * dsub : (s + 1) * dsub]
            want_diag[s, codes[i, s]] += w.diagonal()[s * dsub : (s + 1) * dsub]
    torch.testing.assert_close(rhs, want_b.float(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(diag, want_diag.float(), rtol=1e-4, atol=1e-4)


@needs_cpp
@pytest.mark.parametrize("n,m,k,dsub", [(300, 16, 16, 2), (200, 7, 16, 3), (100, 5, 256, 1), (64, 9, 16, 4)])
@pytest.mark.parametrize("code_dtype", [torch.int64, torch.uint8])
def test_rhs_cpp_matches_reference(n, m, k, dsub, code_dtype):
    from torchaq.ops.normal_apply import anisotropic_normal_rhs_reference

    x, codes, coef, _, eta = _case(n, m, k, dsub, seed=n + 2 * m)
    codes = codes.to(code_dtype)
    rhs, diag = ops.anisotropic_normal_rhs(x, codes, eta, coef, k)
    ref_rhs, ref_diag = anisotropic_normal_rhs_reference(x, codes, eta, coef, k)
    torch.testing.assert_close(rhs, ref_rhs, rtol=1e-4, atol=1e-4 * float(ref_rhs.abs().max()))
    torch.testing.assert_close(diag, ref_diag, rtol=1e-4, atol=1e-4 * float(ref_diag.abs().max()))
    counts = torch.zeros(m, k)
    counts[torch.arange(m).expand(n, m), codes.long()] = 1
    assert ((diag.amax(-1) > 0) == (counts > 0)).all()  # exactly the used codewords get a diagonal





@pytest.mark.parametrize("impl", ["op", "reference"])
def test_rhs_bad_inputs(impl):
    from torchaq.ops.normal_apply import anisotropic_normal_rhs_reference

    fn = ops.anisotropic_normal_rhs if impl == "op" else anisotropic_normal_rhs_reference
    x, codes, coef, _, eta = _case(20, 4, 16, 2, seed=11)
    with pytest.raises(ValueError, match="not a multiple of M"):
        fn(x[:, :7].contiguous(), codes, eta, coef, 16)
    with pytest.raises(TypeError, match="eta must be float32"):
        fn(x, codes, eta.double(), coef, 16)
    with pytest.raises(ValueError, match="eta must have shape"):
        fn(x, codes, eta[:4], coef, 16)
    with pytest.raises(TypeError, match="x must be float32"):
        fn(x.double(), codes, eta, coef, 16)
    with pytest.raises(TypeError, match="codes must be int64 or uint8"):
        fn(x, codes.int(), eta, coef, 16)
    with pytest.raises(ValueError, match="coef must have shape"):
        fn(x, codes, eta, coef[:2], 16)
    with pytest.raises(ValueError, match="num_codewords"):
        fn(x, codes, eta, coef, 0)
    with pytest.raises(ValueError, match="codes must be in"):
        fn(x, codes, eta, coef, 8)  # codes up to 15 with 8 codewords
