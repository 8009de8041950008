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

import numpy as np
import torch
from torch import Tensor

_M32 = 0xFFFFFFFF


def mix32(x: Tensor) -> Tensor:
    """``lowbias32``: a 32-bit integer hash of int64 ``x`` (its low 32 bits; a tensor or a Python integer),
    result in ``[0, 2**32)``.

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


def _mix32_numpy(x: np.ndarray) -> np.ndarray:
    """:func:`mix32` on uint64 numpy arrays (uint64 products wrap modulo 2**64: the same low 32 bits)."""
    x = x & _M32
    x = x ^ (x >> 16)
    x = (x * np.uint64(0x7FEB352D)) & _M32
    x = x ^ (x >> 15)
    x = (x * np.uint64(0x846CA68B)) & _M32
    return x ^ (x >> 16)


SMALL_BATCH = 16  # row_keys hashes this many seeds or fewer as Python integers (batch-1 sampling)


def _numpy_path(x: Tensor) -> bool:
    """Hash in numpy: on CPU in eager mode (under ``torch.compile`` dynamo would trace the numpy calls
    into uint64 tensor ops, which fake tensors do not support; the torch path gives the same bits)."""
    return x.device.type == "cpu" and not torch.compiler.is_compiling()


def row_keys(seeds: Tensor) -> Tensor:
    """int64 ``(B,)`` per-row keys in ``[0, 2**32)`` from int64 seeds (both halves of each seed)."""
    seeds = seeds.long()
    if _numpy_path(seeds) and seeds.numel() <= SMALL_BATCH:  # mix32 on Python integers: no array set-up
        return torch.tensor([mix32(s ^ mix32((s >> 32) ^ 0x9E3779B9)) for s in seeds.tolist()],
                            dtype=torch.int64)
    if _numpy_path(seeds):  # numpy, as in key_uniforms (only the low 32 bits of each word matter,
        # so the logical shift of uint64 gives what torch's arithmetic shift of int64 gives)
        with np.errstate(over="ignore"):
            s = seeds.numpy().view(np.uint64)
            return torch.from_numpy(_mix32_numpy(s ^ _mix32_numpy((s >> np.uint64(32)) ^ np.uint64(0x9E3779B9))).view(np.int64))
    return mix32(seeds ^ mix32((seeds >> 32) ^ 0x9E3779B9))


_COUNTERS: dict = {}


def hashed_counters(stream: int, n: int, device) -> Tensor:
    """The hashed counters ``mix32(j ^ mix32(stream + c))``, ``(1, n)``, cached per (stream, n, device)."""
    key = (stream, n, str(device))
    ctr = _COUNTERS.get(key)
    if ctr is None:
        j = torch.arange(n, device=device, dtype=torch.int64)
        ctr = mix32(j ^ mix32(torch.full_like(j, stream) + 0x27D4EB2F)).unsqueeze(0)
        if len(_COUNTERS) < 4096:
            _COUNTERS[key] = ctr
    return ctr


def hashed_numbers(keys, ctr, mix):
    """The uniforms of keys ``(B, 1)`` and hashed counters ``(1, n)`` with one ``mix32`` (torch or numpy)."""
    x = mix(keys ^ ctr) ^ keys
    hi = mix(x) >> 5                  # 27 bits
    lo = mix(x ^ 0x1B56C4E9) >> 6      # 26 bits
    return hi * 67108864 + lo           # hi * 2**26 + lo < 2**53: exact in float64


def key_uniforms(keys: Tensor, stream: int, n: int) -> Tensor:
    """``(B, n)`` float64 uniforms in ``(0, 1)`` from :func:`row_keys` ``(B,)`` and an integer ``stream``.

    On CPU the integer hashing runs in numpy: the same operations on the same integers (so the same
    numbers, bit for bit), without torch's per-op dispatch, which dominates at sampling's sizes
    (a few rows times a few dozen numbers)."""
    ctr = hashed_counters(stream, n, keys.device)
    if _numpy_path(keys):
        with np.errstate(over="ignore"):  # uint64 products wrap by design
            v = hashed_numbers(keys.numpy().astype(np.uint64)[:, None], ctr.numpy().astype(np.uint64), _mix32_numpy)
        return torch.from_numpy((v.astype(np.float64) + 0.5) / 9007199254740992.0)
    return (hashed_numbers(keys.unsqueeze(1), ctr, mix32).double() + 0.5) / 9007199254740992.0  # (v + 1/2) / 2**53


def uniforms(seeds: Tensor, stream: int, n: int) -> Tensor:
    """``(B, n)`` float64 uniforms in ``(0, 1)`` for int64 ``(B,)`` ``seeds`` and an integer ``stream``."""
    return key_uniforms(row_keys(seeds), stream, n)
