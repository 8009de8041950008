"""torch.ops.torchaq.linear_ce: the registered CPU kernel against linear_ce_reference (every output,
row chunks and class blocks that do not divide N and V, bf16 / float64, the C++ target check)."""
import pytest
import torch

from torchaq import ops


def _case(n, v, d, dtype=torch.float32, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    e = torch.randn(n, d, generator=g).to(dtype)
    c = torch.randn(v, d, generator=g).to(dtype)
    b = torch.randn(v, generator=g).to(dtype) if bias else None
    t = torch.randint(0, v, (n,), generator=g)
    t[0] = -100
    return e, c, b, t, torch.rand(n, generator=g, dtype=ops.acc_dtype(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("opts", [(0.0, 0.0, 0.0), (3.0, 0.1, 1e-2)])
@pytest.mark.parametrize("blocks", [(7, 3), (512, 0)])
def test_kernel_matches_reference(dtype, bias, opts, blocks):
    e, c, b, t, rg = _case(11, 50, 8, dtype, bias)
    for row_grad in (None, rg):
        out = ops.linear_ce(e, c, b, t, row_grad, -100, *opts, *blocks)
        ref = ops.linear_ce_reference(e, c, b, t, row_grad, -100, *opts, 16, 0)
        tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else {}
        for o, r in zip(out, ref):
            assert o.dtype == r.dtype and o.shape == r.shape
            torch.testing.assert_close(o, r, **tol)


def test_kernel_refuses_out_of_range_targets():
    e, c, b, t, _ = _case(4, 10, 3)
    t[1] = 10
    with pytest.raises((RuntimeError, ValueError), match="targets"):
        ops.linear_ce(e, c, b, t)
