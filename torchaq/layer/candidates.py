"""How many classes :meth:`torchaq.QuantizedSoftmax.topk` re-scores: the defaults, as functions of ``k``."""
from __future__ import annotations

# Default number of LUT candidates re-scored exactly, as a function of k: enough that the exact
# top-k is almost always among them (benchmarks/layer.py measures recall@10 >= 0.99 on real
# data with d/2 subspaces), small enough that re-scoring costs far less than the dense layer.
MIN_CANDIDATES = 256
CANDIDATES_PER_K = 16


def default_candidates(k: int, num_classes: int) -> int:
    """``min(V, max(256, 16 k))`` candidates re-scored exactly by :meth:`QuantizedSoftmax.topk`."""
    return min(num_classes, max(MIN_CANDIDATES, CANDIDATES_PER_K * k))


# topk(k) re-scores exactly only the best max(32, 4 k) of its candidates by an int8 copy of the
# weight rows (:mod:`torchaq.ops.layer_topk`): int8 rows cost a quarter of the memory traffic of the float rows,
# and their ranking error is far below the LUT's (benchmarks/layer.py measures the recall).
MIN_SHORTLIST = 32
SHORTLIST_PER_K = 4


def default_shortlist(k: int) -> int:
    """``max(32, 4 k)`` candidates re-scored exactly by :meth:`QuantizedSoftmax.topk` after the int8 ranking."""
    return max(MIN_SHORTLIST, SHORTLIST_PER_K * k)
