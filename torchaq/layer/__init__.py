"""``torchaq.layer``: the drop-in output layer and what keeps its index honest.

=====================  ====================================================================
module                 what
=====================  ====================================================================
``softmax``            :class:`QuantizedSoftmax` (exact logits, top-k, log-probs, sampling, entropy)
``indexed``            its index half: refresh, stale-index warning, side list, state_dict loading
``construction``       its two signatures (from a weight; ``nn.Linear``-shaped) into parameters
``state``              load-time checks of a state_dict (errors name the key)
``staleness``          what changed in the weight since the last refresh (version, storage, .data)
``exact``              exact scoring in bounded memory: tiny tables, the entropy, row chunks
``probe``              measured recall after fitting narrow tables (a warning with the number)
``fast_topk``          its one-op top-k fast path and the cache of what that op reads
``candidates``         how many classes top-k re-scores exactly (defaults as functions of k)
``sampling``           top-p / temperature checks and draws (shared with the distributed layer)
``exact_sampling``     ``sample``: draws from the full-vocabulary softmax (rejection from a bounded LUT proposal)
``logprobs``           exact, batch-invariant log-probabilities of given tokens (``token_logprobs``)
``side_list``          rows the codes cannot represent: the exact side list, the residual bound
``error_model``        the sampler's per-class LUT error scale (``error_scales``)
``partition``          the log-partition estimate behind ``log_softmax_topk``
``incremental``        refresh re-encodes only the rows that moved
``refresher``          :class:`CodebookRefresher`: refresh / refit on a schedule while training
``faster_path``        :class:`FasterPath`: the faster of two paths per call shape, from timed first calls
=====================  ====================================================================
"""
from torchaq.layer.candidates import default_candidates, default_shortlist
from torchaq.layer.refresher import CodebookRefresher
from torchaq.layer.softmax import QuantizedSoftmax

__all__ = ["QuantizedSoftmax", "CodebookRefresher", "default_candidates", "default_shortlist"]
