"""Warm starts for additive-code encoding: the codes ``fit`` found for the rows it trained on.

Encoding additive codes is a hard discrete search: local search (ICM + iterated local search)
started from scratch ends in a worse local optimum than the codes the training alternation
reached for its own rows, where codes and codebooks adapted to each other over many rounds
(LSQ++'s observation that training codes beat re-encoded ones; Martinez et al., ECCV 2018).
When a table is fitted and then encoded -- the usual case for an output layer, whose rows are the
training set -- :class:`torchaq.AnisotropicAQ` therefore starts the search of a row that ``fit``
saw from the codes ``fit`` ended with (the search only ever lowers a row's loss from its start).

Rows are matched exactly, by a 60-bit key of their float32 bit patterns: the bits of each entry
split into two 16-bit halves, each multiplied by a fixed (seeded) integer weight below ``2**23``
and summed over the row; all integer, so the key of a row never depends on the batch it comes in
(a matmul fingerprint would: BLAS blocking changes the rounding). Two different rows share a
key with negligible probability, and even then only the start of their search is shared.

The same keys seed each row's perturbations in :meth:`torchaq.AnisotropicAQ.encode`
(:func:`row_perturbations`), so a row's codes never depend on the batch it is encoded in (a
shard of a vocabulary-parallel layer, a refresh of the rows that changed, the whole table).

Cost: ``O(N d)`` integer operations for the keys, ``O(N log T)`` to look ``N`` rows up among
``T`` training rows (a sorted key array), ``T (8 + M)`` bytes kept.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

# integer weights of the key: 16-bit halves times weights < 2**WEIGHT_BITS, summed over d < 2**20
# columns, stay below 2**(16 + WEIGHT_BITS + 20) < 2**63 (no overflow)
WEIGHT_BITS = 23
_SEED = 0xA9


def _weights(dim: int, device) -> Tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(_SEED)
    w = torch.randint(1, 2**WEIGHT_BITS, (2, dim), generator=gen, dtype=torch.int64)
    return w[0].to(device), w[1].to(device)


def row_keys(x: Tensor) -> Tensor:
    """``(N,)`` int64 exact keys of the float32 rows of ``x`` ``(N, d)`` (see the module docstring)."""
    if x.shape[1] >= 2**20:
        raise ValueError(f"row keys support d < 2**20, got d = {x.shape[1]}")
    bits = x.float().contiguous().view(torch.int32).to(torch.int64)
    lo, hi = bits & 0xFFFF, (bits >> 16) & 0xFFFF
    w_lo, w_hi = _weights(x.shape[1], x.device)
    return (lo * w_lo).sum(1) + (hi * w_hi).sum(1)


# the perturbations: v = ((key mod P) * A + B) mod P per (round, slot), P prime, A, B < P drawn
# from the quantizer's seed; products stay below 2**62
_PRIME = 2**31 - 1


def row_perturbations(keys: Tensor, rounds: int, count: int, mk: int, seed: int) -> Tensor:
    """``(rounds, N, count)`` int64 in ``[0, mk)``: pseudo-random perturbations that depend only on each row's key and ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    ab = torch.randint(1, _PRIME, (2, rounds, 1, count), generator=gen, dtype=torch.int64).to(keys.device)
    base = (keys % _PRIME).view(1, -1, 1)
    mixed = (base * ab[0] + ab[1]) % _PRIME
    mixed = (mixed * ab[0].flip(0) + ab[1].flip(2)) % _PRIME  # a second round decorrelates nearby keys
    return mixed % mk


class WarmStarts:
    """Codes of known rows, looked up by :func:`row_keys`."""

    def __init__(self, x: Tensor, codes: Tensor):
        keys = row_keys(x)
        self.keys, order = keys.sort()
        self.codes = codes[order].to(torch.uint8)

    def lookup(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        """``(found (N,) bool, codes (N, M) int64)``: the stored codes of rows of ``x`` seen before (0 elsewhere)."""
        keys = row_keys(x).to(self.keys.device)
        pos = torch.searchsorted(self.keys, keys).clamp_max(self.keys.shape[0] - 1)
        found = self.keys[pos] == keys
        codes = torch.where(found.unsqueeze(1), self.codes[pos].long(), torch.zeros_like(self.codes[pos].long()))
        return found.to(x.device), codes.to(x.device)


def lookup(cache: Optional[WarmStarts], x: Tensor) -> Optional[Tuple[Tensor, Tensor]]:
    """:meth:`WarmStarts.lookup`, or None without a cache or when no row of ``x`` is known."""
    if cache is None or x.shape[0] == 0:
        return None
    found, codes = cache.lookup(x)
    return (found, codes) if bool(found.any()) else None
