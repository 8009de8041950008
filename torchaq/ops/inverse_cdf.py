"""``torch.ops.torchaq.inverse_cdf``: categorical draws from block-summed weights, without an ``O(L)`` scan.

``inverse_cdf(weights (R, nb, m) float32, cum (R, nb) float64, rows (P,) int64, u (P, n) float64)
-> (P, n) int64``: for draw ``(p, j)`` on row ``r = rows[p]`` of a distribution whose ``L = nb m``
weights are ``weights[r]`` (``m`` per block) and whose cumulative block sums are ``cum[r]``, the
position ``i`` with ``F(i - 1) <= u T < F(i)``, ``T = cum[r, -1]`` (the inverse CDF at ``u``), in two
levels: the block ``k`` is the first with ``cum[r, k] > u T`` (capped at ``nb - 1``); inside it, the
first ``i`` whose float64 running sum of the block's weights exceeds ``u T - cum[r, k - 1]``
(clamped to ``[0, S (1 - 2^-40)]``, ``S`` the block's own sum, so rounding never steps past the
block; capped at ``m - 1``). ``k m + i`` is returned.

It serves :meth:`torchaq.QuantizedSoftmax.sample`'s proposal draws. The reference gathers each
draw's block (``(P, n, m)``) and runs ``torch.searchsorted`` twice; the C++ kernel does the same
arithmetic in float64 per draw (a binary search over the ``nb`` sums, then one running sum over at
most ``m`` weights), ``O(P n (log nb + m))`` with no temporaries, and returns the same positions.
"""
from __future__ import annotations

import torch
from torch import Tensor

from torchaq.ops.schemas import LIB


def check_inverse_cdf_args(weights: Tensor, cum: Tensor, rows: Tensor, u: Tensor) -> None:
    """Validate ``inverse_cdf``'s arguments (errors name the argument)."""
    torch._check_type(isinstance(weights, Tensor) and weights.dtype == torch.float32 and weights.dim() == 3,
                      lambda: f"weights must be a float32 (R, nb, m) tensor, got {getattr(weights, 'dtype', None)} "
                              f"of shape {tuple(getattr(weights, 'shape', ()))}")
    torch._check_type(isinstance(cum, Tensor) and cum.dtype == torch.float64 and tuple(cum.shape) == tuple(weights.shape[:2]),
                      lambda: f"cum must be a float64 {tuple(weights.shape[:2])} tensor, got {getattr(cum, 'dtype', None)} "
                              f"of shape {tuple(getattr(cum, 'shape', ()))}")
    torch._check_type(isinstance(rows, Tensor) and rows.dtype == torch.int64 and rows.dim() == 1,
                      lambda: f"rows must be an int64 (P,) tensor, got {getattr(rows, 'dtype', None)}")
    torch._check_type(isinstance(u, Tensor) and u.dtype == torch.float64 and u.dim() == 2 and u.shape[0] == rows.shape[0],
                      lambda: f"u must be a float64 ({rows.shape[0]}, n) tensor, got {getattr(u, 'dtype', None)} "
                              f"of shape {tuple(getattr(u, 'shape', ()))}")
    torch._check_value(weights.shape[1] > 0 and weights.shape[2] > 0,
                       lambda: f"weights must have at least one block of one weight, got shape {tuple(weights.shape)}")
    for name, t in (("cum", cum), ("rows", rows), ("u", u)):
        torch._check_value(t.device == weights.device, lambda: f"{name} is on {t.device} but weights is on {weights.device}")


@torch.library.register_fake("torchaq::inverse_cdf")
def _inverse_cdf_fake(weights: Tensor, cum: Tensor, rows: Tensor, u: Tensor) -> Tensor:
    check_inverse_cdf_args(weights, cum, rows, u)
    return u.new_empty(u.shape, dtype=torch.int64)


@torch.library.impl(LIB, "inverse_cdf", "CompositeExplicitAutograd")
def inverse_cdf_reference(weights: Tensor, cum: Tensor, rows: Tensor, u: Tensor) -> Tensor:
    check_inverse_cdf_args(weights, cum, rows, u)
    if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= weights.shape[0]):
        raise ValueError(f"rows must be in [0, {weights.shape[0]}), got values in [{int(rows.min())}, {int(rows.max())}]")
    m = weights.shape[2]
    c = cum[rows]                                                    # (P, nb)
    blk = torch.searchsorted(c, (u * c[:, -1:]).contiguous(), right=True).clamp_(max=cum.shape[1] - 1)
    start = torch.where(blk > 0, c.gather(1, (blk - 1).clamp(min=0)), 0.0)
    inner = weights[rows.unsqueeze(1), blk].cumsum(dim=2, dtype=torch.float64)   # (P, n, m)
    rest = torch.minimum((u * c[:, -1:] - start).clamp(min=0), inner[..., -1] * (1 - 2.0 ** -40))
    pos = torch.searchsorted(inner, rest.unsqueeze(2).contiguous(), right=True).squeeze(2).clamp_(max=m - 1)
    return blk * m + pos


def inverse_cdf(weights: Tensor, cum: Tensor, rows: Tensor, u: Tensor) -> Tensor:
    """``(P, n)`` int64 inverse-CDF positions of uniforms ``u`` on ``rows`` (module docstring)."""
    return torch.ops.torchaq.inverse_cdf(weights, cum, rows, u)
