"""Plain product-quantization k-means: Lloyd's algorithm in every subspace at once.

This is the isotropic starting point of :class:`torchaq.AnisotropicPQ` (and the baseline the
joint anisotropic codebook update is tested against).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from torchaq import ops
from torchaq.ops.encode import l2_encode


def _sums_and_counts(x: Tensor, codes: Tensor, num_codewords: int):
    """Per-codeword sums ``(M, K, dsub)`` and point counts ``(M, K)`` of the subspace slices of ``x``.

    One pass of ``torch.ops.torchaq.anisotropic_normal_rhs`` with ``eta = 1`` and ``coef = 0``
    (its right-hand side is then the plain sum and its diagonal the count), so no ``(N * M,)``
    index tensor is built. Cost ``O(N M dsub)``.
    """
    n = x.shape[0]
    small = codes.to(torch.uint8) if num_codewords <= 256 else codes.long()
    ones, zeros = x.new_ones(n), x.new_zeros(n)
    sums, counts = ops.anisotropic_normal_rhs(x.float().contiguous(), small, ones, zeros, num_codewords)
    return sums, counts[..., 0]


def subspace_means(x: Tensor, codes: Tensor, num_codewords: int, previous: Optional[Tensor] = None) -> Tensor:
    """Per-subspace centroids ``C_m[j] = mean{x_m[n] : codes[n, m] = j}``.

    This is the minimiser of the L2 loss for fixed codes. A codeword with no point keeps its
    ``previous`` value (or zero).
    """
    return _means(*_sums_and_counts(x, codes, num_codewords), previous)


def _means(sums: Tensor, counts: Tensor, previous: Optional[Tensor]) -> Tensor:
    means = sums / counts.clamp_min(1).unsqueeze(-1)
    if previous is not None:
        means = torch.where(counts.unsqueeze(-1) > 0, means, previous)
    return means


def subspace_kmeans(
    x: Tensor,
    num_subspaces: int,
    num_codewords: int,
    iters: int,
    generator: torch.Generator,
    callback: Optional[Callable[[], None]] = None,
) -> Tensor:
    """Lloyd's k-means in each of the ``M`` subspaces of ``x`` (``(N, M * dsub)``); returns ``(M, K, dsub)``.

    Initialised with ``K`` distinct random rows (seeded by ``generator``, a CPU generator so the
    result does not depend on the device). An empty cluster is re-seeded with a random point.
    ``callback`` is called once per iteration (progress bars).
    """
    n, dim = x.shape
    m, k = num_subspaces, num_codewords
    dsub = dim // m
    init_rows = torch.randperm(n, generator=generator)[:k].to(x.device)
    codebooks = x[init_rows].reshape(k, m, dsub).transpose(0, 1).contiguous()
    for _ in range(iters):
        codes = l2_encode(x, codebooks)
        sums, counts = _sums_and_counts(x, codes, k)
        new = _means(sums, counts, None)
        empty = counts == 0
        if bool(empty.any()):
            # re-seed empty codewords with random points of that subspace
            sub, word = empty.nonzero(as_tuple=True)
            rows = torch.randint(0, n, (sub.numel(),), generator=generator).to(x.device)
            new[sub, word] = x.reshape(n, m, dsub)[rows, sub]
        codebooks = new
        if callback is not None:
            callback()
    return codebooks
