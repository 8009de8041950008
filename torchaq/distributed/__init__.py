"""``torchaq.distributed``: the quantized output layer with its vocabulary split over ranks.

=====================  ====================================================================
module                 what
=====================  ====================================================================
``layer``              :class:`VocabParallelQuantizedSoftmax` (top-k, log-probs, sampling)
``loss``               its sampled softmax over all ranks
``mappings``           autograd-aware collectives (copy / reduce / log-sum-exp over ranks)
``groups``             process groups, DTensor / DeviceMesh resolution, shard sizes
=====================  ====================================================================
"""
from torchaq.distributed.groups import shard_sizes
from torchaq.distributed.layer import VocabParallelQuantizedSoftmax
from torchaq.distributed.loss import vocab_parallel_sampled_softmax_loss
from torchaq.distributed.mappings import copy_to_parallel_region, parallel_logsumexp, reduce_from_parallel_region

__all__ = [
    "VocabParallelQuantizedSoftmax",
    "copy_to_parallel_region",
    "reduce_from_parallel_region",
    "parallel_logsumexp",
    "shard_sizes",
    "vocab_parallel_sampled_softmax_loss",
]
