"""torch.ops.torchaq.pq_encode / anisotropic_encode: C++ kernel against the torch reference."""
import pytest
import torch

import torchaq
from torchaq import ops
from torchaq import backends
from torchaq.ops.encode import anisotropic_encode_reference, decode, pq_encode_reference
from torchaq.quantizers.loss import score_aware_loss

needs_cpp = pytest.mark.skipif(not backends.CPU_EXTENSION_LOADED, reason="C++ extension not built")


def _case(n, m, k, dsub, seed=0):
    """Low-rank rows (like real output layers) and codebooks drawn from them, varied eta."""
    gen = torch.Generator().manual_seed(seed)
    d = m * dsub
    x = torch.randn(n, 8, generator=gen) @ torch.randn(8, d, generator=gen) + 0.3 * torch.randn(n, d, generator=gen)
    cb = x[torch.randperm(n, generator=gen)[:k]].reshape(k, m, dsub).transpose(0, 1).contiguous()
    cb = cb + 0.05 * torch.randn(m, k, dsub, generator=gen)
    eta = 1 + 7 * torch.rand(n, generator=gen)
    return x, cb, eta


@needs_cpp
@pytest.mark.parametrize("n,m,k,dsub", [(400, 16, 16, 2), (300, 7, 16, 3), (300, 5, 256, 2), (50, 3, 5, 4)])
def test_cpp_matches_reference(n, m, k, dsub):
    x, cb, eta = _case(n, m, k, dsub)
    x[3] = 0  # a zero row: no parallel direction
    ref = anisotropic_encode_reference(x, cb, eta, 10)
    got = ops.anisotropic_encode(x, cb, eta, 10)
    assert got.dtype == torch.int64 and got.shape == (n, m)
    # same codes except where two candidates tie to float rounding (the sums run in another order)
    same_rows = (ref == got).all(1).float().mean()
    assert same_rows >= 0.98, same_rows
    loss_ref = score_aware_loss(x, decode(ref, cb), eta)
    loss_got = score_aware_loss(x, decode(got, cb), eta)
    torch.testing.assert_close(loss_got.sum(), loss_ref.sum(), rtol=1e-4, atol=1e-4)
    # plain PQ codes and zero rounds agree exactly with the reference's L2 start
    l2 = pq_encode_reference(x, cb)
    assert torch.equal(ops.pq_encode(x, cb), l2)
    assert torch.equal(ops.anisotropic_encode(x, cb, eta, 0), l2)
    # the descent lowers the loss of the L2 codes (and never raises any row's)
    loss_l2 = score_aware_loss(x, decode(l2, cb), eta)
    assert (loss_got <= loss_l2 * (1 + 1e-5) + 1e-6).all()
    assert loss_got.sum() < 0.99 * loss_l2.sum()


@needs_cpp
def test_cpp_rows_are_independent_and_isa_paths_agree(monkeypatch):
    x, cb, eta = _case(600, 24, 16, 2, seed=1)
    full = ops.anisotropic_encode(x, cb, eta, 10)
    part = ops.anisotropic_encode(x[100:157].contiguous(), cb, eta[100:157].contiguous(), 10)
    assert torch.equal(part, full[100:157])  # a re-encode of some rows gives the full encode's codes
    monkeypatch.setenv("TORCHAQ_FORCE_SCALAR", "1")
    assert torch.equal(ops.anisotropic_encode(x, cb, eta, 10), full)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert torch.equal(ops.anisotropic_encode(x, cb, eta, 10), full)
    finally:
        torch.set_num_threads(threads)


def test_reference_rows_are_independent():
    x, cb, eta = _case(200, 8, 16, 2, seed=2)
    full = anisotropic_encode_reference(x, cb, eta, 10)
    assert torch.equal(anisotropic_encode_reference(x[50:90], cb, eta[50:90], 10), full[50:90])





def test_bad_inputs():
    x, cb, eta = _case(20, 4, 16, 2, seed=4)
    with pytest.raises(ValueError, match="M \\* dsub"):
        ops.pq_encode(x[:, :7].contiguous(), cb)
    with pytest.raises(TypeError, match="x must be float32"):
        ops.pq_encode(x.double(), cb)
    with pytest.raises(TypeError, match="codebooks must be float32"):
        ops.pq_encode(x, cb.half())
    with pytest.raises(ValueError, match="codebooks must be"):
        ops.pq_encode(x, cb[0])
    with pytest.raises(ValueError, match="x must be"):
        ops.pq_encode(x[0], cb)
    with pytest.raises(ValueError, match="eta must have shape"):
        ops.anisotropic_encode(x, cb, eta[:5], 3)
    with pytest.raises(TypeError, match="eta must be float32"):
        ops.anisotropic_encode(x, cb, eta.double(), 3)
    with pytest.raises(ValueError, match="max_rounds"):
        ops.anisotropic_encode(x, cb, eta, -1)


def test_quantizer_encode_uses_the_op_and_keeps_quality():
    gen = torch.Generator().manual_seed(6)
    x = torch.nn.functional.normalize(torch.randn(1500, 32, generator=gen), dim=1)
    pq = torchaq.AnisotropicPQ(32, 8, threshold=0.4).fit(x, iters=2, progress=False)
    xp = pq.pad(x)
    ref = anisotropic_encode_reference(xp, pq.codebooks, pq.row_eta(xp), 10)
    codes = pq.encode(x).long()
    assert (codes == ref).all(1).float().mean() >= 0.98


@needs_cpp
@pytest.mark.parametrize("n", [1, 7, 9, 37])
def test_eight_row_blocks_match_the_row_kernel(monkeypatch, n):
    """The AVX2 K=16 descent runs eight rows per vector: short blocks, a zero row and large eta
    (many moves per round) give the per-row (baseline) kernel's codes exactly."""
    x, cb, _ = _case(64, 40, 16, 2, seed=7)
    x, eta = x[:n].contiguous(), 1 + 200 * torch.rand(n, generator=torch.Generator().manual_seed(8))
    if n > 1:
        x[n // 2] = 0
    got = ops.anisotropic_encode(x, cb, eta, 10)
    monkeypatch.setenv("TORCHAQ_FORCE_SCALAR", "1")
    row_kernel = ops.anisotropic_encode(x, cb, eta, 10)
    assert torch.equal(got, row_kernel)
    assert not torch.equal(got, ops.pq_encode(x, cb))  # the descent moved something
    for rounds in (1, 2):
        monkeypatch.delenv("TORCHAQ_FORCE_SCALAR")
        fast = ops.anisotropic_encode(x, cb, eta, rounds)
        monkeypatch.setenv("TORCHAQ_FORCE_SCALAR", "1")
        assert torch.equal(fast, ops.anisotropic_encode(x, cb, eta, rounds))
