"""The shared index of the vocabulary-parallel layer: codebooks fitted once for the group, one global side list.

* :func:`fit_shared`: the rows the single-device layer would fit on are gathered to group rank 0,
  which fits the quantizer and broadcasts its state (FAISS ``IndexShardsIVF`` shares its coarse
  quantizer the same way), so every rank encodes with the same codebooks at every world size;
* :func:`global_side_rows`: the exact side list is chosen by the single-device rule
  (:func:`torchaq.layer.side_list.select_side_rows_from_norms`: robust z-scores over **all** ``V``
  rows) from every rank's row and residual norms (one all-gather of ``2 max(V_r)`` floats per
  rank), and each rank keeps the rows of its slice.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from torchaq.layer import side_list
from torchaq.quantizers.pq import MAX_FIT_ROWS

from torchaq.distributed.groups import gather_into


def fit_shared(layer, queries: Optional[Tensor], max_fit_rows: int = MAX_FIT_ROWS) -> None:
    """Fit the shared quantizer of ``layer`` (a :class:`VocabParallelQuantizedSoftmax`) on group rank 0 and broadcast it.

    The rows :meth:`torchaq.QuantizedSoftmax.refresh` fits on, in its order: all ``V`` rows minus the
    huge-norm ones it leaves out (:func:`torchaq.layer.side_list.fit_rows_mask`; above
    ``max_fit_rows`` rows the norms are gathered to decide), and above ``max_fit_rows`` kept rows
    the same seeded sample (``fit(..., sampled_from=)`` keeps the generator in step), so the
    codebooks are bitwise the single-device ones. Cost: the fit on one rank plus ``min(V,
    max_fit_rows) d`` values sent to rank 0 (and ``V`` norms above ``max_fit_rows``).
    """
    local, group = layer.local, layer.group
    q = local.quantizer
    if layer.num_classes < q.num_codewords:
        raise ValueError(
            f"the vocabulary has {layer.num_classes} classes but bits={q.bits} needs at least {q.num_codewords} to fit the codebooks"
        )
    weight = local.weight.detach()
    start, stop = layer.vocab_range
    sampled_from = None
    if layer.num_classes <= max_fit_rows:
        ids = None  # every row, in vocabulary order: the single-device fit's input exactly
        mine = weight
        counts = layer.shard_sizes
    else:
        # the single-device fit's rows: the huge-norm rows left out (robust z over all V norms,
        # gathered), then the seeded sample of max_fit_rows of the rest, in sample order
        norms = gather_rows_of(layer, weight.float().norm(dim=1))
        keep = side_list.fit_rows_mask_from_norms(norms)
        kept = keep.nonzero().squeeze(1).cpu() if int(keep.sum()) >= q.num_codewords else torch.arange(layer.num_classes)
        if kept.numel() > max_fit_rows:
            gen = torch.Generator().manual_seed(q.seed)
            ids = kept[torch.randperm(kept.numel(), generator=gen)[:max_fit_rows]]
            sampled_from = kept.numel()
        else:
            ids = kept
        owner = torch.bucketize(ids, torch.tensor(layer.offsets[1:]), right=True)
        counts = torch.bincount(owner, minlength=layer.world_size).tolist()
        mine_ids = ids[(ids >= start) & (ids < stop)]
        mine = weight.index_select(0, (mine_ids - start).to(weight.device))
    width = max(counts)
    send = weight.new_zeros((width, layer.dim))
    send[: mine.shape[0]] = mine
    gathered = [torch.empty_like(send) for _ in range(layer.world_size)] if layer.rank == 0 else None
    dist.gather(send, gathered, dst=layer.root, group=group)
    state = [None, None, None]  # error, state_dict, AQ warm starts (codes fit found: torchaq.quantizers.aq_warm)
    if layer.rank == 0:
        try:
            if ids is None:
                rows = torch.cat([g[:c] for g, c in zip(gathered, counts)])
                keep = side_list.fit_rows_mask(rows)  # as QuantizedSoftmax.refresh(refit=True)
                if int(keep.sum()) >= q.num_codewords:
                    rows = rows[keep]
                max_rows = max_fit_rows
            else:  # put the sampled rows back in the order of the seeded sample
                rows = weight.new_empty((ids.shape[0], layer.dim))
                for r, g in enumerate(gathered):  # each owner sent its rows in sample order
                    sel = ((ids >= layer.offsets[r]) & (ids < layer.offsets[r + 1])).nonzero().squeeze(1)
                    rows[sel.to(rows.device)] = g[: sel.shape[0]]
                max_rows = None if sampled_from is not None else max_fit_rows
            if queries is not None:
                queries = local.flat_features(queries, "queries")
            q.fit(rows, queries=queries, iters=local.fit_iters, progress=local.progress, max_rows=max_rows,
                  sampled_from=sampled_from)
            state[1] = {k: v.cpu() if isinstance(v, Tensor) else v for k, v in q.state_dict().items()}
            state[2] = q.warm_state() if hasattr(q, "warm_state") else None
        except (TypeError, ValueError, RuntimeError) as exc:
            state[0] = (type(exc).__name__, str(exc))
    dist.broadcast_object_list(state, src=layer.root, group=group)
    if state[0] is not None:
        kind, msg = state[0]
        raise (ValueError if kind == "ValueError" else TypeError if kind == "TypeError" else RuntimeError)(
            f"fitting the shared codebooks on group rank 0 failed: {msg}"
        )
    if layer.rank != 0:
        q.load_state_dict(state[1])
        if hasattr(q, "load_warm_state"):
            q.load_warm_state(state[2])


def gather_rows_of(layer, values: Tensor) -> Tensor:
    """Every rank's ``(V_r,)`` values concatenated in vocabulary order ``(V,)`` (one padded all-gather)."""
    width = max(layer.shard_sizes)
    mine = values.new_zeros((1, width))
    mine[0, : values.shape[0]] = values
    if layer.world_size > 1:
        every = values.new_empty((layer.world_size, width))
        gather_into(every, mine, layer.group)
    else:
        every = mine
    return torch.cat([every[r, :n] for r, n in enumerate(layer.shard_sizes)])


@torch.no_grad()
def global_side_rows(layer) -> int:
    """Replace each rank's side list by its slice of the single-device rule's choice over all ``V`` rows; returns ``S``."""
    local = layer.local
    weight = local.weight.detach()
    width = max(layer.shard_sizes)
    mine = torch.zeros((2, width), dtype=torch.float32, device=weight.device)
    mine[0, : layer.local_classes] = weight.float().norm(dim=1)
    mine[1, : layer.local_classes] = local.residual_norms.float()
    if layer.world_size > 1:
        every = torch.empty((layer.world_size * 2, width), dtype=torch.float32, device=weight.device)
        gather_into(every, mine, layer.group)
        every = every.view(layer.world_size, 2, width)
    else:
        every = mine.unsqueeze(0)
    norms = torch.cat([every[r, 0, :n] for r, n in enumerate(layer.shard_sizes)])
    res = torch.cat([every[r, 1, :n] for r, n in enumerate(layer.shard_sizes)])
    chosen = side_list.select_side_rows_from_norms(norms, res)
    start, stop = layer.vocab_range
    local.side_rows = (chosen[(chosen >= start) & (chosen < stop)] - start).to(weight.device)
    return int(chosen.numel())
