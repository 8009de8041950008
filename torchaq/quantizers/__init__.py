"""``torchaq.quantizers``: score-aware codebooks for the rows of an output layer.

=====================  ====================================================================
module                 what
=====================  ====================================================================
``loss``               the score-aware loss and the paper's eta (Guo et al. 2020)
``calibrate``          choosing the anisotropy from sample queries (retrieval recall)
``base``               what PQ and AQ share: rule, codebooks buffer, pack / score, state
``pq``                 :class:`AnisotropicPQ` (k-means start, anisotropic encode, joint update)
``kmeans``             per-subspace k-means (the PQ start)
``codebook_update``    the joint anisotropic codebook update (matrix-free CG)
``aq``                 :class:`AnisotropicAQ` (additive codes, LSQ++ search)
``aq_update``          AQ's least-squares codebook update
``aq_warm``            AQ's warm starts and perturbations
=====================  ====================================================================
"""
from torchaq.quantizers.aq import AnisotropicAQ
from torchaq.quantizers.loss import eta, score_aware_loss
from torchaq.quantizers.pq import AnisotropicPQ

__all__ = ["AnisotropicPQ", "AnisotropicAQ", "eta", "score_aware_loss"]
