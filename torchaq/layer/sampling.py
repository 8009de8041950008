"""Sampling helpers shared by the single-device and vocabulary-parallel layers: argument checks and draws."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from torchaq.checks import check_real


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
