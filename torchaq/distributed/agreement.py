"""Per-call agreement of the vocabulary-parallel layer: one fixed-size all-gather before any other collective.

A collective hangs or aborts when the ranks disagree about its shapes, or when one rank raises
before it while the others wait. Every collective method of
:class:`~torchaq.distributed.VocabParallelQuantizedSoftmax` therefore starts with an
:class:`Agreement`: one all-gather of a small int64 **header** per rank (``len(FIELDS)`` values
and 64 bytes of error text, 168 bytes), built from what the call's later collectives depend on:

* which call it is (``op``: a rank in ``refresh(refit=True)`` while another is in ``topk`` is
  caught here), the index generation (refresh count: indexes out of step);
* the batch shape (rows ``B`` and a hash of the leading shape), ``d``, ``k``, ``candidates`` and
  the dtype code of ``h``;
* checksums of ``h`` and of the targets (the contract says they are replicated: different data
  of the same shape would be merged silently otherwise);
* the size of the payload that rides with the header (below);
* an error code from the rank's own argument checks (NaN in ``h``, a target out of range, a bad
  ``k``): a rank whose checks failed sends the error instead of raising alone.

Every rank then holds the same ``(P, 21)`` table, so every rank raises the same
:class:`VocabParallelError` (the same message, naming the field, the call and the ranks' values)
or none does; all ranks made the same single collective, so the group stays usable for the next
call. The rank whose own check failed chains its original exception (``__cause__``).

**The header rides with the call's first payload.** On a loopback gloo group a round trip costs
far more than the bytes it carries, so a header sent on its own adds a whole collective's latency
to a batch-1 call. The header's all-gather therefore always has the same size on every rank: the
header plus :data:`INLINE_WORDS` int32 words, where the call's first payload (the scan scores of
the invariant mode, the ``(value, id)`` pairs of ``invariant=False``) travels when it fits --
batch 1 to 8 at the default 256 candidates. Ranks that disagree about everything still make the
same collective; a larger payload follows in its own all-gather once the ranks have agreed.
Cost: ``4 (2 len(FIELDS) + 16 + INLINE_WORDS)`` bytes per rank in the one all-gather, a checksum
pass over ``h`` (``B d`` values); none of it at ``P = 1``, where only the rank's own checks run.
"""
from __future__ import annotations

import zlib
from typing import Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from torchaq.distributed.groups import all_gather_rows, gather_into

FIELDS = ("op", "generation", "batch", "shape", "dim", "k", "candidates", "dtype", "h_sum", "target_sum",
          "inline", "error", "error_arg")
# the fields every rank must agree on (after "op", which is reported first)
AGREED = FIELDS[1: FIELDS.index("error")]
# the first TEXT_BYTES bytes of a failed check's message travel with the header
TEXT_BYTES = 64
WHAT = {
    "op": "the call (every rank must make the same collective call)",
    "generation": "the index generation (number of refresh() calls: refresh is a collective, call it on every rank)",
    "batch": "the batch size (rows of h)",
    "shape": "the leading shape of h",
    "dim": "the feature dimension of h",
    "k": "k",
    "candidates": "candidates",
    "dtype": "the dtype of h",
    "h_sum": "the contents of h (checksums differ: h must be replicated, the same on every rank)",
    "target_sum": "the contents of target (checksums differ: targets must be replicated)",
    "inline": "the size of the call's first payload (int32 words sent with the header)",
}
#: int32 words of a call's first payload that travel in the header's own all-gather (8 KB)
INLINE_WORDS = 2048
OPS = ("none", "forward", "topk", "log_softmax_topk", "sample", "sampled_softmax_loss", "refresh", "refresh(refit=True)",
       "gather_logits")
DTYPES = (None, torch.float32, torch.float16, torch.bfloat16, torch.float64)
# error codes a rank's own checks report (the message is rebuilt from the code, the same on every rank)
ERRORS = ("", "h contains NaN or Inf", "target values out of range [0, V)", "invalid argument",
          "h has the wrong type, shape or device", "target has the wrong type, shape or device",
          "codebooks not fitted")


class VocabParallelError(ValueError):
    """Raised on every rank of the group when the ranks' calls disagree or one rank's checks failed."""


def error_code(exc: BaseException) -> int:
    """The :data:`ERRORS` code of a local check's exception."""
    text = str(exc)
    if "NaN or Inf" in text and "target" not in text:
        return 1
    if "target values" in text:
        return 2
    if text.startswith("target"):
        return 5
    if text.startswith("h ") or " h " in text[:40]:
        return 4
    if "not fitted" in text:
        return 6
    return 3


def checksum(t: Optional[Tensor]) -> int:
    """A checksum of a tensor's bytes and shape: CRC-32 on CPU (``zlib``, a few microseconds at batch 1),
    a position-weighted int64 sum (wrapping) on other devices; 0 for None."""
    if t is None or t.numel() == 0:
        return 0
    if t.device.type == "cpu":
        if t.dtype in (torch.float32, torch.float64, torch.float16, torch.int64, torch.int32) and t.is_contiguous():
            return zlib.crc32(t.detach().numpy())  # the buffer as it is: no torch views to build
        return zlib.crc32(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy())
    raw = t.detach().contiguous().reshape(-1).view(torch.uint8)
    pad = (-raw.numel()) % 8
    if pad:
        raw = torch.cat([raw, raw.new_zeros(pad)])
    words = raw.view(torch.int64)
    weights = torch.arange(1, words.numel() + 1, device=words.device, dtype=torch.int64)
    return int((words * weights).sum() + words.sum() * 1000003)


def shape_hash(shape: Sequence[int]) -> int:
    value = len(shape)
    for s in shape:
        value = (value * 1000003 + int(s)) % (1 << 61)
    return value


def header(op: str, generation: int, h: Optional[Tensor] = None, k: int = 0, candidates: int = 0,
           target: Optional[Tensor] = None, error: Optional[BaseException] = None, error_arg: int = 0,
           checksums: bool = True) -> list:
    """This rank's header values (in :data:`FIELDS` order; ``inline`` is filled in when it is sent);
    tensors that failed their checks count as absent. ``checksums=False`` (one rank: nothing to
    compare them with) leaves the checksum fields 0."""
    ok_h = isinstance(h, Tensor)
    checksums = checksums and error is None
    batch = int(h.numel() // h.shape[-1]) if ok_h and h.dim() >= 1 and h.shape[-1] else 0
    return [
        OPS.index(op), int(generation), batch, shape_hash(h.shape[:-1]) if ok_h and h.dim() else 0,
        int(h.shape[-1]) if ok_h and h.dim() else 0, int(k) if isinstance(k, int) else -1,
        int(candidates) if isinstance(candidates, int) else -1,
        DTYPES.index(h.dtype) if ok_h and h.dtype in DTYPES else (len(DTYPES) if ok_h else 0),
        checksum(h) if ok_h and checksums else 0,
        checksum(target) if isinstance(target, Tensor) and checksums else 0,
        0, 0 if error is None else error_code(error), int(error_arg),
    ] + (NO_TEXT if error is None else encode_text(str(error)))


def encode_text(text: str) -> list:
    """The first :data:`TEXT_BYTES` bytes of ``text`` (UTF-8, zero-padded) as ``TEXT_BYTES / 8`` int64."""
    raw = text.encode("utf-8")[:TEXT_BYTES].ljust(TEXT_BYTES, b"\0")
    return [int.from_bytes(raw[i: i + 8], "little", signed=True) for i in range(0, TEXT_BYTES, 8)]


NO_TEXT = encode_text("")


def decode_text(words) -> str:
    raw = b"".join(int(w).to_bytes(8, "little", signed=True) for w in words).rstrip(b"\0")
    text = raw.decode("utf-8", errors="ignore")
    return text + ("..." if len(raw) >= TEXT_BYTES else "")


def agree(group, world_size: int, device, values: list, error: Optional[BaseException] = None) -> None:
    """All-gather the headers and raise the same :class:`VocabParallelError` on every rank if they disagree.

    ``values``: this rank's :func:`header`; ``error``: this rank's own failed check (chained on this rank).
    """
    Agreement(group, world_size, device, values, error)()


class Agreement:
    """A call's agreement, sent alone (call it) or with the call's first payload (:meth:`gather`).

    Work that needs no collective (the argument checks, the LUT, the local scan) runs between
    :meth:`torchaq.distributed.VocabParallelQuantizedSoftmax.begin`, which builds it, and the
    first collective, which must go through it. ``values=None``: the agreement is switched off
    (``layer.agreement = False``, to measure what it costs): :meth:`gather` is a plain all-gather.
    """

    def __init__(self, group, world_size: int, device, values: Optional[list], error: Optional[BaseException] = None):
        self.group, self.world_size, self.device = group, world_size, device
        self.values, self.error, self.pending = values, error, values is not None

    def __call__(self) -> None:
        """Agree with no payload (a no-op once agreed)."""
        self.gather(None)

    def gather(self, payload: Optional[Tensor]) -> Optional[Tensor]:
        """Agree (if not yet done), then all-gather ``payload`` (any 4-byte dtype; the same shape on
        every rank once they agree): ``(P,) + payload.shape``, rank order. Raises
        :class:`VocabParallelError` on every rank when the ranks disagree or one rank's checks failed."""
        if not self.pending:
            return None if payload is None else all_gather_rows(payload, self.group, self.world_size)
        self.pending = False
        if self.world_size == 1:  # nothing to agree with: only this rank's own error
            if self.error is not None:
                raise VocabParallelError(describe([self.values], "")) from self.error
            return None if payload is None else payload.unsqueeze(0)
        words = 0 if payload is None else payload.numel()
        inline = 0 < words <= INLINE_WORDS and payload.element_size() == 4
        values = list(self.values)
        values[FIELDS.index("inline")] = words if inline else 0
        # built on the host with numpy: a handful of torch calls would cost more than the transfer
        n_head = 2 * len(values)
        buf = np.zeros(n_head + INLINE_WORDS, dtype=np.int32)
        buf[:n_head] = np.asarray(values, dtype=np.int64).view(np.int32)
        mine = torch.from_numpy(buf)
        on_host = self.device.type == "cpu"
        if not on_host:
            mine = mine.to(self.device)
        if inline:
            flat = payload.detach().contiguous().reshape(-1).view(torch.int32)
            if on_host:
                buf[n_head: n_head + words] = flat.numpy()
            else:
                mine[n_head: n_head + words] = flat
        table = torch.empty((self.world_size * mine.numel(),), dtype=torch.int32, device=self.device)
        gather_into(table, mine, self.group)
        table = table.view(self.world_size, mine.numel())
        heads = (table[:, :n_head] if on_host else table[:, :n_head].cpu()).numpy()
        problem = describe(np.ascontiguousarray(heads).view(np.int64).tolist(), "")
        if problem is not None:
            raise VocabParallelError(problem) from self.error
        if self.error is not None:  # pragma: no cover - a local error always shows in the table
            raise self.error
        if payload is None:
            return None
        if not inline:  # too large to ride with the header: its own all-gather, now that the ranks agree
            return all_gather_rows(payload, self.group, self.world_size)
        body = table[:, n_head: n_head + words].contiguous().view(payload.dtype)
        return body.view((self.world_size,) + tuple(payload.shape))


def describe(table: list, name: str) -> Optional[str]:
    """The error message for a gathered header table (``None``: all agree and no rank failed)."""
    error_at = FIELDS.index("error")
    first = table[0][:error_at]
    if all(row[:error_at] == first and row[error_at] == 0 for row in table):  # the usual case, quickly
        return None
    col = {f: [row[i] for row in table] for i, f in enumerate(FIELDS)}
    same_call = len(set(col["op"])) == 1  # the message must be the same text on every rank
    prefix = f"VocabParallelQuantizedSoftmax.{OPS[col['op'][0]]}: " if same_call else "VocabParallelQuantizedSoftmax: "
    failed = [r for r, e in enumerate(col["error"]) if e]
    if failed:
        parts = []
        for r in failed:
            text = decode_text(table[r][len(FIELDS):])
            parts.append(f"rank {r}: {ERRORS[col['error'][r]]}: {text}")
        return prefix + "bad input on some ranks -- " + "; ".join(parts) + " (every rank raises this error)"
    ops = col["op"]
    if len(set(ops)) > 1:
        calls = ", ".join(f"rank {r} {OPS[o]}" for r, o in enumerate(ops))
        return prefix + f"the ranks are in different calls: {calls}; every rank must make the same collective call"
    for field in AGREED:
        values = col[field]
        if len(set(values)) > 1:
            shown = values if field not in ("h_sum", "target_sum", "shape") else "differ"
            if field == "dtype":
                shown = [str(DTYPES[v]) if v < len(DTYPES) else "other" for v in values]
            return prefix + f"the ranks disagree on {WHAT[field]}: {shown} (rank order)"
    return None
