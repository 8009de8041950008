"""The score-aware quantization loss of Guo et al., "Accelerating Large-Scale Inference with
Anisotropic Vector Quantization", ICML 2020 (arXiv 1908.10396), section 3.

For a datapoint ``x``, its quantization ``x~`` and the residual ``r = x - x~``, split ``r`` along
the datapoint::

    r_par  = (<r, x> / |x|^2) x          r_perp = r - r_par

For queries ``q`` uniform on the unit sphere and the weight ``w(t) = 1[t >= T]`` the expected
weighted squared score error decomposes (paper, Theorem 3.2)::

    E_q[ w(<q, x>) <q, r>^2 ] = h_par |r_par|^2 + h_perp |r_perp|^2

    h_par  = E[ w(|x| t) t^2 ]                 t = <q, x/|x|>, density ~ (1 - t^2)^((d-3)/2)
    h_perp = E[ w(|x| t) (1 - t^2) ] / (d - 1)

and, in the large-d limit the paper and ScaNN use as exact, per datapoint::

    eta(T, d, |x|) = h_par / h_perp = (d - 1) (T/|x|)^2 / (1 - (T/|x|)^2)

The library works with ``h_perp = 1, h_par = eta`` (only the ratio changes the minimiser of a
single datapoint's loss).
"""
from __future__ import annotations

import math
from typing import Tuple, Union

import torch
from torch import Tensor

# T/|x| is clamped below 1 so that rows with |x| <= T (which the threshold says can never score
# above T, and for which the formula has no finite value; ScaNN has no guard here) get a large
# but finite eta instead of inf/negative values.
MAX_THRESHOLD_RATIO = 0.99


def eta(threshold: float, dim: int, norm: Union[Tensor, float]) -> Tensor:
    """Per-datapoint anisotropy ``eta = h_par / h_perp`` of the score-aware loss.

    ``eta(T, d, |x|) = (d - 1) * (T/|x|)^2 / (1 - (T/|x|)^2)`` (Guo et al. 2020, Theorem 3.3 in
    the large-d limit; e.g. T = 0.2, d = 100, |x| = 1 gives 4.125). ``T/|x|`` is clamped to at
    most ``MAX_THRESHOLD_RATIO`` = 0.99: rows with ``|x| <= T`` get the largest finite value.

    Args:
        threshold: the score threshold ``T`` (> 0) above which score errors matter.
        dim: the dimension ``d`` (>= 2).
        norm: ``|x|`` per datapoint (tensor or float).
    Returns:
        float32 tensor with the shape of ``norm``.
    """
    if not isinstance(threshold, (int, float)) or not threshold > 0 or not math.isfinite(threshold):
        raise ValueError(f"threshold must be a finite number > 0, got {threshold!r}")
    if int(dim) != dim or dim < 2:
        raise ValueError(f"dim must be an integer >= 2, got {dim!r}")
    norm = torch.as_tensor(norm, dtype=torch.float32)
    ratio = (threshold / norm.clamp_min(1e-30)).clamp(max=MAX_THRESHOLD_RATIO)
    r2 = ratio * ratio
    return (dim - 1) * r2 / (1 - r2)


def score_aware_weights(threshold: float, dim: int, norm: float, steps: int = 20001) -> Tuple[float, float]:
    """Exact ``(h_par, h_perp)`` for queries uniform on the unit sphere in ``dim`` dimensions.

    Numerical quadrature of the paper's Theorem 3.2 integrals with ``t = cos(theta)``, whose
    density is ``sin(theta)^(d-2)`` on ``[0, pi]`` (normalised)::

        h_par  = E[ 1(|x| t >= T) t^2 ],   h_perp = E[ 1(|x| t >= T) (1 - t^2) ] / (d - 1)

    Used by the tests to check the decomposition by Monte-Carlo and that ``h_par / h_perp``
    approaches :func:`eta` as ``dim`` grows.
    """
    theta = torch.linspace(0.0, math.pi, steps, dtype=torch.float64)
    density = torch.sin(theta) ** (dim - 2)
    t = torch.cos(theta)
    active = (norm * t >= threshold).double()
    z = torch.trapezoid(density, theta)
    h_par = torch.trapezoid(active * t * t * density, theta) / z
    h_perp = torch.trapezoid(active * (1 - t * t) * density, theta) / z / (dim - 1)
    return float(h_par), float(h_perp)


def parallel_perpendicular(x: Tensor, x_hat: Tensor) -> Tuple[Tensor, Tensor]:
    """``(|r_par|^2, |r_perp|^2)`` per row for ``r = x - x_hat``, split along ``x``.

    Rows with ``x = 0`` have no direction: all of their residual counts as perpendicular.
    """
    r = x - x_hat
    x_sq = (x * x).sum(-1)
    r_dot_x = (r * x).sum(-1)
    r_par_sq = torch.where(x_sq > 0, r_dot_x * r_dot_x / x_sq.clamp_min(1e-30), torch.zeros_like(x_sq))
    r_perp_sq = ((r * r).sum(-1) - r_par_sq).clamp_min(0)
    return r_par_sq, r_perp_sq


def score_aware_loss(x: Tensor, x_hat: Tensor, eta: Union[Tensor, float]) -> Tensor:
    """Per-row score-aware loss ``h_par |r_par|^2 + h_perp |r_perp|^2`` with ``h_par = eta, h_perp = 1``.

    ``eta = 1`` is the plain reconstruction (L2) loss ``|x - x_hat|^2``.

    Args:
        x: ``(N, d)`` datapoints.
        x_hat: ``(N, d)`` their quantizations.
        eta: scalar or ``(N,)`` per-row ``h_par / h_perp`` (see :func:`eta`).
    Returns:
        ``(N,)`` float32 tensor.
    """
    if x.shape != x_hat.shape:
        raise ValueError(f"x and x_hat must have the same shape, got {tuple(x.shape)} and {tuple(x_hat.shape)}")
    x = x.float()
    r_par_sq, r_perp_sq = parallel_perpendicular(x, x_hat.float())
    eta_t = torch.as_tensor(eta, dtype=torch.float32, device=x.device)
    if eta_t.dim() > 0 and eta_t.shape != r_par_sq.shape:
        raise ValueError(f"eta must be a scalar or have shape {tuple(r_par_sq.shape)}, got {tuple(eta_t.shape)}")
    return eta_t * r_par_sq + r_perp_sq
