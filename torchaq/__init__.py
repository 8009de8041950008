"""torchaq: anisotropic product quantization and lookup-table scoring for large output layers.

Public API::

    torchaq.QuantizedSoftmax      drop-in output layer: exact logits, fast topk / log_softmax_topk / sample
    torchaq.hf                    Hugging Face models: quantize_lm_head, fast greedy generate, from_pretrained
    torchaq.CodebookRefresher     keeps the index fresh while the layer trains (sampled softmax)
    torchaq.linear_cross_entropy  exact fused cross-entropy of a linear layer (Cut Cross-Entropy's signature)
    torchaq.chunked_cross_entropy the same loss under its earlier name and argument order
    torchaq.AnisotropicPQ         the quantizer (fit / encode / decode / lut / score)
    torchaq.AnisotropicAQ         additive codes, same API and scan (higher recall per bit, costlier LUT)
    torchaq.eta                   the paper's h_par / h_perp ratio per datapoint
    torchaq.score_aware_loss      h_par |r_par|^2 + h_perp |r_perp|^2 per row
    torchaq.ops                   the torch.ops.torchaq.* operators (LUT, pack, scan, top-k, ...)
    torchaq.distributed           the vocabulary-parallel layer (import it explicitly)

Subpackages, lowest first (each imports only those before it): ``ops``, ``quantizers``,
``training``, ``layer``, ``distributed``; ``checks`` and ``backends`` sit beside them at the root.
"""
from torchaq import ops
from torchaq.backends import load_cpu_extension, load_triton_kernels
from torchaq.quantizers import AnisotropicAQ, AnisotropicPQ, eta, score_aware_loss
from torchaq.training import chunked_cross_entropy, linear_cross_entropy
from torchaq.layer import CodebookRefresher, QuantizedSoftmax
from torchaq import hf

load_cpu_extension()
load_triton_kernels()

__version__ = "0.1.0"
__all__ = [
    "AnisotropicPQ",
    "AnisotropicAQ",
    "QuantizedSoftmax",
    "CodebookRefresher",
    "chunked_cross_entropy",
    "linear_cross_entropy",
    "eta",
    "score_aware_loss",
    "ops",
    "hf",
]
