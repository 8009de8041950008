"""Is a layer's quantized index still the index of its weight? The checks behind the stale-index warning.

The packed codes, the side list, the residual norms and the int8 shortlist rows are all functions
of ``weight`` at the last :meth:`torchaq.QuantizedSoftmax.refresh`. The weight can change under
them in three ways, each seen by a different signal:

* an in-place update through autograd-visible ops (an optimiser step, a tied embedding's
  ``mul_``): ``weight._version`` moves;
* ``weight.data = W2`` (Hugging Face's ``_init_weights``, ``load_state_dict(assign=True)``): the
  storage pointer moves, the version does not;
* ``weight.data.copy_(W2)``: neither moves (``.data`` has its own version counter), so a copy of
  the leading :data:`SENTINEL_COLUMNS` values of a few fixed *sentinel rows* (up to
  :data:`SENTINEL_ROWS`, evenly strided; compared through a strided view, so the check allocates
  nothing) is compared too.

:func:`changed` runs all three per call: two integer compares and one ``torch.equal`` over
``SENTINEL_ROWS * SENTINEL_COLUMNS`` values (one cache line per row in float32), independent of
``V``, ``d`` and the batch. On CPU the sentinel values are compared as bytes through a numpy view of
the weight's memory (:func:`host_sentinels`): at batch 1 each torch op of a ``sample`` call costs
several times its own run time after the scan has filled the caches, and the check would otherwise
be two of them. A ``.data`` write that leaves those values bit-identical goes unseen by
the per-call check; :meth:`refresh` itself
fingerprints all ``V`` rows (:mod:`torchaq.layer.incremental`), so it re-encodes them anyway.
"""
from __future__ import annotations

import ctypes
from typing import NamedTuple, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

# rows copied per layer to detect writes through ``.data`` (evenly strided over the vocabulary)
SENTINEL_ROWS = 64
# leading values of each sentinel row compared: whole rows would read d / 16 cache lines per row
# on every call (from memory, for a table larger than the cache), for writes that replace the
# weight as a whole (load_state_dict, _init_weights) and so change every column anyway
SENTINEL_COLUMNS = 16


class Snapshot(NamedTuple):
    """What the index was built from: storage pointer, version counter, the sentinel rows' stride
    and count, and their copies; on CPU also the weight's shape and strides, a numpy view of the
    sentinel values (:func:`host_sentinels`) and their bytes."""

    pointer: int
    version: Optional[int]
    stride: int
    count: int
    values: Tensor
    layout: Optional[Tuple[Tuple[int, ...], Tuple[int, ...]]] = None
    host: Optional[np.ndarray] = None
    host_bytes: bytes = b""


def sentinels(weight: Tensor, stride: int, count: int) -> Tensor:
    """The sentinel values of ``weight``: a strided *view* (``weight[::stride][:count, :SENTINEL_COLUMNS]``),
    so the per-call comparison allocates nothing."""
    return weight.detach()[::stride][:count, :SENTINEL_COLUMNS]


def host_sentinels(w: Tensor, stride: int, count: int) -> Optional[np.ndarray]:
    """The bytes of the sentinel values of a CPU ``w`` with contiguous rows as a ``(count, columns *
    itemsize)`` uint8 numpy view of its memory, or None (another device, strided rows, no values).
    The view holds no reference to the storage (one that did would keep a replaced weight alive), so
    :func:`changed` reads it only once the pointer, shape and strides match the snapshot's: the
    storage is then the weight's, and the sentinels lie inside it."""
    if w.device.type != "cpu" or w.dim() != 2 or w.numel() == 0 or w.stride(1) != 1 or w.is_meta:
        return None
    size = w.element_size()
    cols = min(SENTINEL_COLUMNS, w.shape[1]) * size
    row = stride * w.stride(0) * size
    span = (count - 1) * row + cols
    memory = np.frombuffer((ctypes.c_char * span).from_address(w.data_ptr()), dtype=np.uint8)
    return np.lib.stride_tricks.as_strided(memory, (count, cols), (row, 1), writeable=False)


def version_of(weight: Tensor) -> Optional[int]:
    """``weight._version`` (None for inference tensors, which have no version counter)."""
    try:
        return weight._version
    except RuntimeError:
        return None


def snapshot(weight: Tensor) -> Snapshot:
    """The :class:`Snapshot` of ``weight`` now (``O(SENTINEL_ROWS * d)``)."""
    w = weight.detach()
    num = w.shape[0]
    stride = max(1, num // SENTINEL_ROWS)
    count = min(SENTINEL_ROWS, (num + stride - 1) // stride)
    values = sentinels(w, stride, count).clone()
    host = host_sentinels(w, stride, count)
    return Snapshot(w.data_ptr(), version_of(weight), stride, count, values, (tuple(w.shape), w.stride()), host,
                    b"" if host is None else host.tobytes())


def changed(weight: Tensor, snap: Optional[Snapshot]) -> Optional[str]:
    """What changed in ``weight`` since ``snap`` (a short description), or None if nothing did."""
    if snap is None:
        return None
    if weight.data_ptr() != snap.pointer:
        return "the weight's storage was replaced (weight.data = ... or a new tensor)"
    if version_of(weight) != snap.version:
        return "the weight was updated in place (optimiser step, tied embedding)"
    if snap.host is not None and weight.shape == snap.layout[0] and weight.stride() == snap.layout[1]:
        if snap.host.tobytes() != snap.host_bytes:  # (the same storage: see host_sentinels)
            return "the weight was written through .data (weight.data.copy_ / HF _init_weights)"
        return None
    w = weight.detach()
    values = snap.values
    if w.is_meta or values.device != w.device or w.dim() != 2:
        return None
    rows, cols = values.shape
    if w.shape[0] < (rows - 1) * snap.stride + 1 or w.shape[1] < cols:  # (sentinels() would differ in shape)
        return None
    # sentinels()'s view in one as_strided call instead of three slices: this runs on every call of
    # topk / sample, where at batch 1 each op counts (eager only: the compiled check slices)
    now = w.as_strided((rows, cols), (snap.stride * w.stride(0), w.stride(1)), w.storage_offset())
    if not torch.equal(now, values):
        return "the weight was written through .data (weight.data.copy_ / HF _init_weights)"
    return None


def message(cause: str, count: int) -> str:
    """The stale-index warning (numbered, so that Python's once-per-message filter shows each new one)."""
    return (
        f"QuantizedSoftmax: {cause} since the last refresh(); the quantized index is stale, so top-k / "
        f"sampling use outdated codes. Call layer.refresh() after updating the weight (stale index #{count})."
    )


def assert_fresh_in_graph(weight: Tensor, snap: Optional[Snapshot]) -> None:
    """The staleness check inside a ``torch.compile`` graph: the sentinel rows compared as tensor ops
    and ``torch._assert_async`` on the result, so a compiled call on a stale index raises (an error
    that says how to refresh) instead of warning -- no graph break, ``fullgraph=True`` holds. Every
    kind of change (in place, ``.data``, replaced storage) changes sentinel values, so all are seen
    as long as one sentinel value moved. Meta tensors (tracing without data) are skipped."""
    if snap is None or weight.device.type == "meta" or snap.values.device != weight.device:
        return
    same = (sentinels(weight, snap.stride, snap.count) == snap.values).all()
    torch._assert_async(same, "QuantizedSoftmax: the weight changed since the last refresh(), so the quantized "
                              "index is stale. Call layer.refresh() outside the compiled function after updating "
                              "the weight (the compiled function recompiles once for the new index).")
