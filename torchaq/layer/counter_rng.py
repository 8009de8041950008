"""Counter-based uniforms: a row's random numbers depend on its seed and a counter, never on its batch.

``uniforms(seeds, stream, n)[b, j]`` is a pure function of ``(seeds[b], stream, j)``: a 32-bit
integer hash (Chris Wellons' ``lowbias32``: xor-shift / multiply rounds, bias ~0.17 of the best
known) applied to the seed's two halves, the stream and the index, two words per number, giving a
53-bit uniform in the open interval ``(0, 1)`` as float64. So a row drawn alone or inside any
batch, at any position, gets the same numbers (what :meth:`torchaq.QuantizedSoftmax.sample`'s
``seeds=`` guarantees), on any device. All arithmetic is int64 with operands below ``2**49``
(multiplications split in 16-bit halves), so no platform's overflow rule matters. Cost: about 30
elementwise int64 operations per number.
"""
from __future__ import annotations

import torch
from torch import Tensor

_M32 = 0xFFFFFFFF


def _mul32(x: Tensor, c: int) -> Tensor:
    """``(x * c) mod 2**32`` for ``0 <= x < 2**32`` without int64 overflow."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _M32


def mix32(x: Tensor) -> Tensor:
    """``lowbias32``: a 32-bit integer hash of int64 ``x`` (its low 32 bits), result in ``[0, 2**32)``."""
    x = x & _M32
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def uniforms(seeds: Tensor, stream: int, n: int) -> Tensor:
    """``(B, n)`` float64 uniforms in ``(0, 1)`` for int64 ``(B,)`` ``seeds`` and an integer ``stream``."""
    seeds = seeds.long()
    key = mix32((seeds >> 32) ^ 0x9E3779B9)
    key = mix32(seeds ^ key)                                           # (B,)
    j = torch.arange(n, device=seeds.device, dtype=torch.int64)
    ctr = mix32(j ^ mix32(torch.full_like(j, stream) + 0x27D4EB2F))  # (n,)
    key, ctr = key.unsqueeze(1), ctr.unsqueeze(0)
    x = mix32(mix32(key ^ ctr) ^ mix32(key + ctr))
    hi = mix32(x ^ 0x68E31DA4) >> 5                                    # 27 bits
    lo = mix32(x ^ 0x1B56C4E9) >> 6                                    # 26 bits
    return ((hi * 67108864 + lo).double() + 0.5) / 9007199254740992.0  # (hi * 2**26 + lo + 1/2) / 2**53
