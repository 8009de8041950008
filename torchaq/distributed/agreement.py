"""Per-call agreement of the vocabulary-parallel layer: one fixed-size all-gather before any other collective.

A collective hangs or aborts when the ranks disagree about its shapes, or when one rank raises
before it while the others wait. Every collective method of
:class:`~torchaq.distributed.VocabParallelQuantizedSoftmax` therefore starts with :func:`agree`:
one all-gather of a small int64 **header** per rank (``len(FIELDS)`` values and 64 bytes of
error text, 160 bytes), built
from what the call's later collectives depend on:

* which call it is (``op``: a rank in ``refresh(refit=True)`` while another is in ``topk`` is
  caught here), the index generation (refresh count: indexes out of step);
* the batch shape (rows ``B`` and a hash of the leading shape), ``d``, ``k``, ``candidates`` and
  the dtype code of ``h``;
* checksums of ``h`` and of the targets (the contract says they are replicated: different data
  of the same shape would be merged silently otherwise);
* an error code from the rank's own argument checks (NaN in ``h``, a target out of range, a bad
  ``k``): a rank whose checks failed sends the error instead of raising alone.

Every rank then holds the same ``(P, 20)`` table, so every rank raises the same
:class:`VocabParallelError` (the same message, naming the field, the call and the ranks' values)
or none does; all ranks made the same single collective, so the group stays usable for the next
call. The rank whose own check failed chains its original exception (``__cause__``).
Cost: one all-gather of ``160 P`` bytes and a checksum pass over ``h`` (``B d`` values).
"""
from __future__ import annotations

import zlib
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from torchaq.distributed.groups import gather_into

FIELDS = ("op", "generation", "batch", "shape", "dim", "k", "candidates", "dtype", "h_sum", "target_sum",
          "error", "error_arg")
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
}
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
           target: Optional[Tensor] = None, error: Optional[BaseException] = None, error_arg: int = 0) -> list:
    """This rank's header values (in :data:`FIELDS` order); tensors that failed their checks count as absent."""
    ok_h = isinstance(h, Tensor)
    batch = int(h.numel() // h.shape[-1]) if ok_h and h.dim() >= 1 and h.shape[-1] else 0
    return [
        OPS.index(op), int(generation), batch, shape_hash(h.shape[:-1]) if ok_h and h.dim() else 0,
        int(h.shape[-1]) if ok_h and h.dim() else 0, int(k) if isinstance(k, int) else -1,
        int(candidates) if isinstance(candidates, int) else -1,
        DTYPES.index(h.dtype) if ok_h and h.dtype in DTYPES else (len(DTYPES) if ok_h else 0),
        checksum(h) if ok_h and error is None else 0,
        checksum(target) if isinstance(target, Tensor) and error is None else 0,
        0 if error is None else error_code(error), int(error_arg),
    ] + encode_text("" if error is None else str(error))


def encode_text(text: str) -> list:
    """The first :data:`TEXT_BYTES` bytes of ``text`` (UTF-8, zero-padded) as ``TEXT_BYTES / 8`` int64."""
    raw = text.encode("utf-8")[:TEXT_BYTES].ljust(TEXT_BYTES, b"\0")
    return [int.from_bytes(raw[i: i + 8], "little", signed=True) for i in range(0, TEXT_BYTES, 8)]


def decode_text(words) -> str:
    raw = b"".join(int(w).to_bytes(8, "little", signed=True) for w in words).rstrip(b"\0")
    text = raw.decode("utf-8", errors="ignore")
    return text + ("..." if len(raw) >= TEXT_BYTES else "")


def agree(group, world_size: int, device, values: list, name: str, error: Optional[BaseException] = None) -> None:
    """All-gather the headers and raise the same :class:`VocabParallelError` on every rank if they disagree.

    ``values``: this rank's :func:`header`; ``name``: the layer method (for the message);
    ``error``: this rank's own failed check (chained on this rank).
    """
    start_agree(group, world_size, device, values, error)()


def start_agree(group, world_size: int, device, values: list, error: Optional[BaseException] = None):
    """:func:`agree` split in two: starts the header all-gather (asynchronously) and returns ``finish()``,
    which waits for it and raises as :func:`agree` does. Work that needs no collective (the LUT, the
    local scan) can run in between, hiding the header's latency; ``finish()`` must run before the
    call's next collective."""
    if world_size == 1:  # nothing to agree with: only this rank's own error
        def finish_one() -> None:
            problem = describe([values], "")
            if problem is not None:
                raise VocabParallelError(problem) from error

        return finish_one
    mine = torch.tensor(values, dtype=torch.int64, device=device)
    table = torch.empty((world_size * mine.numel(),), dtype=torch.int64, device=device)
    work = gather_into(table, mine, group, async_op=True)

    def finish() -> None:
        work.wait()
        problem = describe(table.view(world_size, mine.numel()).cpu().tolist(), "")
        if problem is not None:
            raise VocabParallelError(problem) from error
        if error is not None:  # pragma: no cover - a local error always shows in the table
            raise error

    return finish


def describe(table: list, name: str) -> Optional[str]:
    """The error message for a gathered header table (``None``: all agree and no rank failed)."""
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
    for field in FIELDS[1:10]:
        values = col[field]
        if len(set(values)) > 1:
            shown = values if field not in ("h_sum", "target_sum", "shape") else "differ"
            if field == "dtype":
                shown = [str(DTYPES[v]) if v < len(DTYPES) else "other" for v in values]
            return prefix + f"the ranks disagree on {WHAT[field]}: {shown} (rank order)"
    return None
