"""Adapter for libraries that expect a dense logits tensor, such as Hugging Face ``generate()``.

``generate()`` calls ``model.lm_head(hidden_states)`` and then runs its logits processors
(greedy argmax, temperature, top-k, top-p, repetition penalty...) on a ``(..., V)`` tensor. The
adapter keeps that contract: in ``eval()`` mode it fills the exact logits of the layer's
re-scored candidates into a ``-inf`` tensor, so greedy decoding and top-k sampling (``top_k <=``
the number of candidates) give exactly the dense model's tokens whenever the true top classes
are among the candidates -- at the cost of the LUT scan, the re-score, and writing ``V`` floats
instead of reading ``V * d`` weights. In ``train()`` mode it returns the exact dense logits.

    model.eval()
    torchaq.hf.quantize_lm_head(model, num_subspaces=192, queries=hidden_states)
    model.generate(input_ids, max_new_tokens=20)                         # greedy
    model.generate(input_ids, do_sample=True, top_k=50, max_new_tokens=20)
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from torchaq.layer.softmax import QuantizedSoftmax


class CandidateLogitsHead(nn.Module):
    """Dense-logits view of a :class:`torchaq.QuantizedSoftmax` (exact on the candidates, -inf elsewhere).

    Args:
        layer: the quantized output layer.
        candidates: classes re-scored per row (default: the layer's default for ``k = 1``).
    """

    def __init__(self, layer: QuantizedSoftmax, candidates: Optional[int] = None):
        super().__init__()
        if not isinstance(layer, QuantizedSoftmax):
            raise TypeError(f"layer must be a torchaq.QuantizedSoftmax, got {type(layer).__name__}")
        self.layer = layer
        self.candidates = candidates

    @property
    def weight(self) -> Tensor:
        """The full-precision output weight (Hugging Face reads ``lm_head.weight``)."""
        return self.layer.weight

    def forward(self, h: Tensor) -> Tensor:
        if self.training:
            return self.layer(h)
        with torch.no_grad():
            logits, classes, _ = self.layer.candidate_logits(h, self.candidates)
        out = torch.full((classes.shape[0], self.layer.num_classes), -math.inf, device=h.device)
        out.scatter_(1, classes, logits)
        return out.reshape(h.shape[:-1] + (self.layer.num_classes,))


def quantize_lm_head(model: nn.Module, candidates: Optional[int] = None, **layer_kwargs) -> CandidateLogitsHead:
    """Replace a Hugging Face model's output layer with a :class:`CandidateLogitsHead`; returns it.

    The new layer shares the old ``nn.Linear``'s parameters (tied embeddings stay tied).
    ``layer_kwargs`` go to :class:`torchaq.QuantizedSoftmax` (``num_subspaces``, ``bits``,
    ``queries``, ...).
    """
    linear = model.get_output_embeddings()
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"model.get_output_embeddings() must be an nn.Linear, got {type(linear).__name__}")
    head = CandidateLogitsHead(QuantizedSoftmax.from_linear(linear, **layer_kwargs), candidates)
    model.set_output_embeddings(head)
    head.train(model.training)
    return head
