"""``torchaq.distributed``: the quantized output layer with its vocabulary split over ranks.

=====================  ====================================================================
module                 what
=====================  ====================================================================
``layer``              :class:`VocabParallelQuantizedSoftmax` (top-k, log-probs, sampling)
``invariant``          the single-device candidates and ``log Z`` over a split vocabulary
``agreement``          the per-call header all-gather (errors instead of hangs)
``fit``                shared codebooks and the global exact side list
``loss``, ``lut_loss`` its sampled softmax over all ranks (``lut`` proposal by default)
``style``              :class:`QuantizedVocabParallel`, a torch tensor-parallel ``ParallelStyle``
``mappings``           autograd-aware collectives (copy / reduce / log-sum-exp over ranks)
``groups``             process groups, DTensor / DeviceMesh resolution, shard sizes
=====================  ====================================================================

``QuantizedVocabParallel`` / ``VocabParallelHead`` are imported on first use (importing
``torch.distributed.tensor.parallel`` costs seconds).
"""
from torchaq.distributed.agreement import VocabParallelError
from torchaq.distributed.groups import shard_sizes
from torchaq.distributed.layer import VocabParallelQuantizedSoftmax
from torchaq.distributed.loss import vocab_parallel_sampled_softmax_loss
from torchaq.distributed.mappings import copy_to_parallel_region, parallel_logsumexp, reduce_from_parallel_region

__all__ = [
    "QuantizedVocabParallel",
    "VocabParallelError",
    "VocabParallelHead",
    "VocabParallelQuantizedSoftmax",
    "copy_to_parallel_region",
    "reduce_from_parallel_region",
    "parallel_logsumexp",
    "shard_sizes",
    "vocab_parallel_sampled_softmax_loss",
]


def __getattr__(name):
    if name in ("QuantizedVocabParallel", "VocabParallelHead"):
        from torchaq.distributed import style

        return getattr(style, name)
    raise AttributeError(f"module 'torchaq.distributed' has no attribute {name!r}")
