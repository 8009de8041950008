"""Sampling helpers shared by the single-device and vocabulary-parallel layers: argument checks and draws."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from torchaq.checks import check_real, is_int


def check_sampling_args(top_p, temperature):
    """``(top_p, temperature)`` as floats after checking them (``top_p`` in (0, 1] or None, ``temperature`` > 0)."""
    if top_p is not None:
        top_p = check_real(top_p, "top_p", "a number in (0, 1]", lambda p: 0 < p <= 1)
    temperature = check_real(temperature, "temperature", "a finite number > 0", lambda t: 0 < t < math.inf)
    return top_p, temperature


def draw_top_p(logits: Tensor, top_p: Optional[float], temperature: float, generator: Optional[torch.Generator]) -> Tensor:
    """One draw per row from ``softmax(logits / temperature)`` over ``(B, k)`` logits sorted best first,
    restricted with ``top_p`` to the smallest prefix whose probability reaches it (Hugging Face's
    ``TopPLogitsWarper``); returns the ``(B, 1)`` positions drawn."""
    logits = logits / temperature
    if top_p is not None and top_p < 1:
        probs = logits.softmax(dim=1)
        before = probs.cumsum(dim=1) - probs  # mass of the strictly better classes
        logits = logits.masked_fill(before >= top_p, -math.inf)  # always keeps the best class
    probs = logits.softmax(dim=1)
    if generator is not None:
        probs = probs.to(generator.device)
    return torch.multinomial(probs, 1, generator=generator).to(logits.device)


def check_full_sampling_args(top_k, top_p, min_p, temperature, num_classes: int):
    """``(top_k or None, top_p, min_p or None, temperature)`` checked; errors name the argument.
    ``top_k`` None or 0 means no top-k (Hugging Face's convention)."""
    if (type(top_p) is float and type(temperature) is float and top_k is None and min_p is None and top_p == 1.0
            and temperature == 1.0):
        return None, 1.0, None, 1.0  # the defaults: nothing to check (batch-1 calls count every microsecond)
    if top_k is not None:
        if not is_int(top_k) or not 0 <= int(top_k) <= num_classes:
            raise ValueError(f"top_k must be None, 0 (no top-k) or an integer in [1, V={num_classes}], got {top_k!r}")
        top_k = int(top_k) or None
    top_p = 1.0 if top_p is None else check_real(top_p, "top_p", "a number in (0, 1]", lambda p: 0 < p <= 1)
    if min_p is not None:
        min_p = check_real(min_p, "min_p", "None or a number in (0, 1]", lambda p: 0 < p <= 1)
    temperature = check_real(temperature, "temperature", "a finite number > 0", lambda t: 0 < t < math.inf)
    return top_k, top_p, min_p, temperature


def row_seeds(seeds: Optional[Tensor], generator: Optional[torch.Generator], lead, device) -> Tensor:
    """int64 ``(B,)`` per-row seeds: ``seeds`` (shape ``h.shape[:-1]`` or ``(B,)``, an integer dtype),
    else one draw per row from ``generator`` (or torch's default generator)."""
    batch = math.prod(lead)
    if seeds is not None:
        if generator is not None:
            raise ValueError("pass generator or seeds, not both")
        if not isinstance(seeds, Tensor) or seeds.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            desc = seeds.dtype if isinstance(seeds, Tensor) else type(seeds).__name__
            raise ValueError(f"seeds must be an integer tensor (int64 or int32) of shape {tuple(lead)}, got {desc}")
        if tuple(seeds.shape) not in (tuple(lead), (batch,)):
            raise ValueError(f"seeds must have shape {tuple(lead)} (one per row of h), got {tuple(seeds.shape)}")
        if seeds.dim() == 1 and seeds.dtype == torch.int64 and seeds.device == device:
            return seeds
        return seeds.reshape(batch).to(device=device, dtype=torch.int64)
    gen_device = generator.device if generator is not None else "cpu"
    return torch.randint(-(2 ** 62), 2 ** 62, (batch,), generator=generator, device=gen_device).to(device)
