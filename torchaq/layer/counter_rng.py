"""Counter-based uniforms: a row's random numbers depend on its seed and a counter, never on its batch.

``uniforms(seeds, stream, n)[b, j]`` is a pure function of ``(seeds[b], stream, j)``: a 32-bit
integer hash (Chris Wellons' ``lowbias32``: xor-shift / multiply rounds) of the seed's two halves, the
stream and the index, two words per number, giving a
53-bit uniform in the open interval ``(0, 1)`` as float64. So a row drawn alone or inside any
batch, at any position, gets the same numbers (what :meth:`torchaq.QuantizedSoftmax.sample`'s
``seeds=`` guarantees), on any device. Cost: about 25 elementwise int64 operations per number
(the counters' hashes are cached; the seeds' keys are computed once per call).
"""
from __future__ import annotations

import torch
from torch import Tensor

_M32 = 0xFFFFFFFF


def mix32(x: Tensor) -> Tensor:
    """``lowbias32``: a 32-bit integer hash of int64 ``x`` (its low 32 bits), result in ``[0, 2**32)``.

    The products ``x * c`` (``x, c < 2**32``) may pass ``2**63``: int64 multiplication wraps modulo
    ``2**64`` in torch's CPU and CUDA kernels (two's complement), and only the low 32 bits are kept, so
    the result is the exact 32-bit hash (``tests/layer/test_exact_sampling.py`` checks it against Python
    integers)."""
    x = x & _M32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def row_keys(seeds: Tensor) -> Tensor:
    """int64 ``(B,)`` per-row keys in ``[0, 2**32)`` from int64 seeds (both halves of each seed)."""
    seeds = seeds.long()
    return mix32(seeds ^ mix32((seeds >> 32) ^ 0x9E3779B9))


_COUNTERS: dict = {}


def _counters(stream: int, n: int, device) -> Tensor:
    """The hashed counters ``mix32(j ^ mix32(stream + c))``, ``(1, n)``, cached per (stream, n, device)."""
    key = (stream, n, str(device))
    ctr = _COUNTERS.get(key)
    if ctr is None:
        j = torch.arange(n, device=device, dtype=torch.int64)
        ctr = mix32(j ^ mix32(torch.full_like(j, stream) + 0x27D4EB2F)).unsqueeze(0)
        if len(_COUNTERS) < 4096:
            _COUNTERS[key] = ctr
    return ctr


def key_uniforms(keys: Tensor, stream: int, n: int) -> Tensor:
    """``(B, n)`` float64 uniforms in ``(0, 1)`` from :func:`row_keys` ``(B,)`` and an integer ``stream``."""
    ctr = _counters(stream, n, keys.device)
    key = keys.unsqueeze(1)
    x = mix32(key ^ ctr) ^ key
    hi = mix32(x) >> 5                  # 27 bits
    lo = mix32(x ^ 0x1B56C4E9) >> 6      # 26 bits
    return ((hi * 67108864 + lo).double() + 0.5) / 9007199254740992.0  # (hi * 2**26 + lo + 1/2) / 2**53


def uniforms(seeds: Tensor, stream: int, n: int) -> Tensor:
    """``(B, n)`` float64 uniforms in ``(0, 1)`` for int64 ``(B,)`` ``seeds`` and an integer ``stream``."""
    return key_uniforms(row_keys(seeds), stream, n)
