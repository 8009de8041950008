"""``torchaq.training``: losses for training large output layers.

=====================  ====================================================================
module                 what
=====================  ====================================================================
``conventions``        target checks and reductions every loss shares (``F.cross_entropy``'s)
``chunked_ce``         :func:`chunked_cross_entropy`: exact, in ``O(B chunk)`` memory
``proposals``          shared and per-row proposals of the sampled softmax, their draws
``lut_proposal``       the ``lut`` proposal: every row's LUT softmax over all ``V`` classes
``sampled_softmax``    the sampled-softmax estimators and the layer's loss method
=====================  ====================================================================
"""
from torchaq.training.chunked_ce import chunked_cross_entropy
from torchaq.training.sampled_softmax import layer_sampled_softmax_loss, sampled_softmax_loss

__all__ = ["chunked_cross_entropy", "layer_sampled_softmax_loss", "sampled_softmax_loss"]
