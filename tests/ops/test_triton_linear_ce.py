"""The Triton linear cross-entropy kernels against linear_ce_reference (TRITON_INTERPRET=1 on CPU,
set by conftest.py; CUDA tensors when a GPU is present): loss, lse and every gradient, with bias,
softcap, label smoothing, z-loss, ignored rows, tails of every tile and several class spans."""
import os

import pytest
import torch

triton = pytest.importorskip("triton")

from torchaq import ops  # noqa: E402
from torchaq.triton_kernels import triton_linear_ce  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
DEV = "cuda" if HAS_CUDA else "cpu"
if not HAS_CUDA:
    assert os.environ.get("TRITON_INTERPRET") == "1", "conftest.py must set TRITON_INTERPRET=1 without a GPU"


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("opts", [(0.0, 0.0, 0.0), (3.0, 0.1, 1e-2)])
@pytest.mark.parametrize("splits", [None, 2])
def test_triton_linear_ce_matches_reference(bias, opts, splits):
    g = torch.Generator().manual_seed(0)
    n, v, d = 21, 75, 20  # no tile divides these
    e, c = torch.randn(n, d, generator=g), torch.randn(v, d, generator=g)
    b = torch.randn(v, generator=g) if bias else None
    t = torch.randint(0, v, (n,), generator=g)
    t[3] = -100
    rg = torch.rand(n, generator=g)
    args = [x.to(DEV) if x is not None else None for x in (e, c, b, t, rg)]
    out = triton_linear_ce(*args, -100, *opts, block_m=16, block_v=16, block_d=16, splits=splits)
    ref = ops.linear_ce_reference(e, c, b, t, rg, -100, *opts, 16, 0)
    for o, r in zip(out, ref):
        assert o.shape == r.shape and o.dtype == r.dtype
        torch.testing.assert_close(o.cpu(), r, rtol=1e-4, atol=1e-4)
    loss, lse, *grads = triton_linear_ce(*args[:4], None, -100, *opts, block_m=16, block_v=16, block_d=16)
    torch.testing.assert_close(loss.cpu(), ref[0], rtol=1e-4, atol=1e-4)
    assert all(x.numel() == 0 for x in grads)


def test_triton_linear_ce_refuses_bad_targets():
    e, c = torch.randn(4, 16, device=DEV), torch.randn(20, 16, device=DEV)
    with pytest.raises(ValueError, match="targets"):
        triton_linear_ce(e, c, None, torch.tensor([0, 1, 25, 2], device=DEV))
