"""Keeping a QuantizedSoftmax's index fresh while its weights train."""
from __future__ import annotations

import logging
import time
from typing import List, Optional

import torch
from torch import Tensor

from torchaq.checks import check_features, check_int, has_data
logger = logging.getLogger("torchaq")


def is_refreshable(layer) -> bool:
    """Whether ``layer`` has what :class:`CodebookRefresher` uses: ``refresh``, ``dim``, ``num_classes``, ``weight``."""
    return (callable(getattr(layer, "refresh", None)) and isinstance(getattr(layer, "dim", None), int)
            and isinstance(getattr(layer, "num_classes", None), int) and isinstance(getattr(layer, "weight", None), Tensor))


class CodebookRefresher:
    """Re-encodes a layer's rows every ``every`` steps and re-fits its codebooks every ``refit_every``.

    Rows move a little per optimiser step, and the codebooks stay good for rows that move a
    little, so the cheap re-encode (one encoding pass over ``V`` rows) runs often and the
    expensive re-fit (k-means plus anisotropic alternations) rarely. The re-fit calibrates the
    anisotropy on the most recent hidden states passed to :meth:`step` (up to ``max_queries``
    rows). Each refresh is logged on the ``"torchaq"`` logger with its cost, and recorded in
    :attr:`history` as ``{"step", "kind", "seconds"}``.

        refresher = torchaq.CodebookRefresher(layer, every=100, refit_every=2000)
        for batch in data:
            h = body(batch)
            loss = layer.sampled_softmax_loss(h, target)
            loss.backward(); opt.step(); opt.zero_grad()
            refresher.step(h)

    Any layer with the **refreshable protocol** works: ``refresh(refit: bool, queries: Optional[Tensor])``,
    ``dim``, ``num_classes`` and a ``weight`` parameter (its device) -- :class:`torchaq.QuantizedSoftmax`
    and :class:`torchaq.distributed.VocabParallelQuantizedSoftmax` (whose ``refresh`` is a collective:
    run one refresher per rank, stepped alike, and every rank refreshes at the same step; the
    re-fit calibrates on group rank 0's recent hidden states).

    Args:
        layer: the layer being trained (see the protocol above).
        every: re-encode every this many steps (``None``: never).
        refit_every: re-fit the codebooks every this many steps (``None``: never).
        max_queries: recent hidden-state rows kept for the re-fit's calibration.
    """

    def __init__(
        self,
        layer,
        every: Optional[int] = 100,
        refit_every: Optional[int] = None,
        max_queries: int = 4096,
    ):
        if not is_refreshable(layer):
            raise TypeError(f"layer must have refresh(refit, queries), dim, num_classes and weight (e.g. a "
                            f"torchaq.QuantizedSoftmax), got {type(layer).__name__}")
        every = None if every is None else check_int(every, "every", low=1)
        refit_every = None if refit_every is None else check_int(refit_every, "refit_every", low=1)
        max_queries = check_int(max_queries, "max_queries", low=20)
        self.layer, self.every, self.refit_every, self.max_queries = layer, every, refit_every, max_queries
        self.num_steps = 0
        self.history: List[dict] = []
        self._recent: Optional[Tensor] = None

    @torch.no_grad()
    def step(self, hidden: Optional[Tensor] = None) -> Optional[str]:
        """Count one training step; refresh when due. Returns ``"refit"``, ``"reencode"`` or ``None``."""
        if hidden is not None:
            # a wrong width would silently reshape into other rows, and one NaN row would break every
            # later refit until it scrolled out of the window: refuse both here, naming the argument
            check_features(hidden, self.layer.dim, "hidden", self.layer.weight.device, "layer")
            if has_data(hidden) and not bool(torch.isfinite(hidden).all()):
                raise ValueError("hidden contains NaN or Inf (not stored for calibration)")
            rows = hidden.detach().reshape(-1, self.layer.dim).float()
            self._recent = rows if self._recent is None else torch.cat([self._recent, rows])
            self._recent = self._recent[-self.max_queries :]
        self.num_steps += 1  # after the checks: a refused call is not a step
        kind = None
        if self.refit_every and self.num_steps % self.refit_every == 0:
            kind = "refit"
        elif self.every and self.num_steps % self.every == 0:
            kind = "reencode"
        if kind is None:
            return None
        start = time.perf_counter()
        queries = self._recent if kind == "refit" and self._recent is not None and len(self._recent) >= 20 else None
        self.layer.refresh(refit=kind == "refit", queries=queries)
        seconds = time.perf_counter() - start
        self.history.append({"step": self.num_steps, "kind": kind, "seconds": seconds})
        logger.info("torchaq: %s of %d rows at step %d took %.3f s", kind, self.layer.num_classes, self.num_steps, seconds)
        return kind
