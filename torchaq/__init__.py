"""torchaq: anisotropic product quantization and lookup-table scoring for large output layers.

Public API::

    torchaq.AnisotropicPQ        the quantizer (fit / encode / decode / lut / score)
    torchaq.AnisotropicAQ        additive codes, same API and scan (higher recall per bit, costlier LUT)
    torchaq.eta                  the paper's h_par / h_perp ratio per datapoint
    torchaq.score_aware_loss     h_par |r_par|^2 + h_perp |r_perp|^2 per row
    torchaq.QuantizedSoftmax     drop-in output layer: exact logits, fast topk / log_softmax_topk / sample
    torchaq.hf                   adapter for Hugging Face generate()
    torchaq.CodebookRefresher    keeps the index fresh while the layer trains (sampled softmax)
    torchaq.chunked_cross_entropy exact cross-entropy of a linear layer in O(B chunk) memory
    torchaq.ops                  the torch.ops.torchaq.* operators (LUT, pack, scan, top-k)
"""
from . import ops
from ._backends import load_cpu_extension as _load_cpu_extension
from ._backends import load_triton_kernels as _load_triton_kernels
from .loss import eta, score_aware_loss
from .quantizer import AnisotropicPQ
from .aq import AnisotropicAQ
from .layer import QuantizedSoftmax
from . import hf
from .refresher import CodebookRefresher
from .chunked_ce import chunked_cross_entropy

_load_cpu_extension()
_load_triton_kernels()

__version__ = "0.1.0"
__all__ = [
    "AnisotropicPQ",
    "AnisotropicAQ",
    "QuantizedSoftmax",
    "CodebookRefresher",
    "chunked_cross_entropy",
    "eta",
    "score_aware_loss",
    "ops",
    "hf",
]
