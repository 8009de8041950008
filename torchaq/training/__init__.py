"""``torchaq.training``: losses for training large output layers.

=====================  ====================================================================
module                 what
=====================  ====================================================================
``conventions``        ignore_index, label smoothing, z-loss, softcap, reductions (``F.cross_entropy``'s)
``linear_ce``          :func:`linear_cross_entropy`: exact fused loss, CCE's signature
``chunked_ce``         :func:`chunked_cross_entropy`: the earlier name of the same loss
``proposals``          shared and per-row proposals of the sampled softmax, their draws
``lut_proposal``       the ``lut`` proposal: every row's LUT softmax over all ``V`` classes
``sampled_softmax``    the sampled-softmax estimators and the layer's loss method
=====================  ====================================================================
"""
from torchaq.training.chunked_ce import chunked_cross_entropy
from torchaq.training.linear_ce import linear_cross_entropy
from torchaq.training.sampled_softmax import layer_sampled_softmax_loss, sampled_softmax_loss

__all__ = ["chunked_cross_entropy", "layer_sampled_softmax_loss", "linear_cross_entropy", "sampled_softmax_loss"]
