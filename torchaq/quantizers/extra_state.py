"""A quantizer's non-tensor state (fitted flag, anisotropy rule, calibration scores, fit dtype) as one tensor.

``nn.Module.get_extra_state`` may return anything, but ``safetensors`` (and so Hugging Face's
``save_pretrained``) stores tensors only: a dict there fails with ``'dict' object has no
attribute 'device'``. The state is therefore encoded as a float64 vector (stored as its int64 bit pattern)::

    [FORMAT, fitted, rule kind, rule value (NaN: none), fit dtype, n,
     kind_1, value_1, recall_1, ..., kind_n, value_n, recall_n]

with the calibration scores ``{str(rule): recall}`` as ``n`` triples. :func:`decode` also reads the
dict that earlier versions stored, so older checkpoints keep loading. Cost: ``O(n)``, ``n <= 10``.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

from torchaq.quantizers.calibrate import AnisotropyRule

FORMAT = 1.0
KINDS = ("isotropic", "eta", "threshold")
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _rule_from_text(text: str) -> AnisotropyRule:
    kind, _, value = text.partition("=")
    return AnisotropyRule(kind, float(value) if value else None)


def encode(fitted: bool, rule: AnisotropyRule, calibration: Optional[Dict[str, float]], fit_dtype) -> Tensor:
    """The float64 vector of the module docstring."""
    cal = calibration or {}
    out = [FORMAT, float(fitted), float(KINDS.index(rule.kind)), math.nan if rule.value is None else float(rule.value),
           float(DTYPES.index(fit_dtype) if fit_dtype in DTYPES else 0), float(len(cal) if calibration is not None else -1)]
    for text, recall in cal.items():
        r = _rule_from_text(text)
        out += [float(KINDS.index(r.kind)), math.nan if r.value is None else r.value, float(recall)]
    # stored as the int64 bit pattern of the float64 values: loaders that cast floating tensors to the
    # model's dtype (``from_pretrained(..., dtype=torch.bfloat16)``) leave integer tensors alone
    return torch.tensor(out, dtype=torch.float64).view(torch.int64)


def decode(state) -> Tuple[bool, AnisotropyRule, Optional[Dict[str, float]], torch.dtype]:
    """``(fitted, rule, calibration, fit_dtype)`` from :func:`encode`'s vector or an older version's dict."""
    if isinstance(state, dict):
        return (bool(state.get("fitted", True)), AnisotropyRule(*state["rule"]), state["calibration"],
                getattr(torch, state["fit_dtype"]))
    if isinstance(state, Tensor) and state.dtype == torch.int64:
        state = state.cpu().contiguous().view(torch.float64)
    if not isinstance(state, Tensor) or state.dim() != 1 or state.numel() < 6 or float(state[0]) != FORMAT:
        raise ValueError(f"quantizer extra state must be an int64 vector in format {FORMAT:g}, got {str(state)[:80]}")
    v = [float(x) for x in state.double().cpu()]

    def rule(kind, value):
        return AnisotropyRule(KINDS[int(kind)], None if math.isnan(value) else value)

    n = int(v[5])
    calibration = None if n < 0 else {str(rule(v[6 + 3 * i], v[7 + 3 * i])): v[8 + 3 * i] for i in range(n)}
    return bool(v[1]), rule(v[2], v[3]), calibration, DTYPES[int(v[4])]
