"""``torchaq.distributed.VocabParallelQuantizedSoftmax``: the quantized output layer with its vocabulary split over ranks.

Each rank of a process group holds one contiguous slice of the output weight's rows (rank order
= vocabulary order; uneven slices allowed), as in Megatron's vocab-parallel embedding / output
layer or torchtitan's tensor parallelism. The hidden states ``h`` are replicated on every rank.
Only per-row scalars and short top-k lists cross the wire, never ``(B, V)`` logits -- the
pattern of Megatron's ``vocab_parallel_cross_entropy``, torch's ``loss_parallel`` and Apple's Cut
Cross-Entropy (all-reduce of per-row maxima and exp-sums), and of vLLM's ``get_top_tokens``
(gather each shard's top candidates with global ids):

* every rank holds a local :class:`torchaq.QuantizedSoftmax` over its slice, built around the
  **same codebooks** (fitted once on rows gathered from the whole group, then broadcast: FAISS's
  ``IndexShardsIVF`` shares its coarse quantizer for the same reason), so a row's codes do not
  depend on which rank holds it;
* :meth:`~VocabParallelQuantizedSoftmax.topk`: each rank scans its slice, re-scores its
  ``candidates`` best exactly and keeps its ``k`` best with global ids; **one all-gather** of
  those ``(value, id)`` pairs (``B k P`` pairs) and a deterministic merge (value descending,
  ties to the lower id) give every rank the same answer;
* :meth:`~VocabParallelQuantizedSoftmax.log_softmax_topk`: ``log Z = logsumexp_r log Z_r`` over
  the ranks' log-partition pieces (the max-then-sum of an all-reduce), carried in the same
  all-gather (one extra scalar per row and rank);
* :meth:`~VocabParallelQuantizedSoftmax.sample`: drawn from the merged candidates on group rank
  0 and broadcast (per-rank ``multinomial`` calls would diverge);
* :meth:`~VocabParallelQuantizedSoftmax.sampled_softmax_loss`: a stratified estimator of the
  global partition function (per-rank hard sets and draws, combined with the same max-then-sum);
* gradients: ``h`` is replicated, so its gradient is summed over ranks in backward (Megatron's
  ``copy_to_tensor_model_parallel_region``); each rank's weight slice gets its own gradient only.

World-size independence. The codebooks are fitted from the same rows whatever the world size
(all rows when ``V <= torchaq.quantizers.pq.MAX_FIT_ROWS``, so they are bitwise those of the
single-device layer; otherwise the same seeded row sample), so every class gets the same codes
and LUT scores with 1, 2 or 3 ranks. Two ways to pick the classes re-scored exactly:

* default: each rank re-scores its own ``candidates`` LUT-best classes. Their union contains the
  single-device candidates (the global LUT-best ``candidates``; up to ties of LUT scores at the
  cut), so the merged top-k is the exact top-k of a superset of the single-device candidates: it
  is never less accurate, and it equals the single-device answer (for every world size)
  whenever that one is the true top-k. Communication ``O(B k P)``.
* ``consistent_candidates=True``: the ranks first all-gather their LUT-best scores (``B
  candidates`` floats per rank), and each re-scores only its classes at or above the global
  ``candidates``-th best score -- the single-device candidate set, split over the ranks -- so
  ``topk``, ``log_softmax_topk`` and ``sample`` give the single-device answer for every world
  size (up to float rounding of the values and ties of LUT scores at the cut). Communication
  ``O(B (candidates + k) P)``, one more all-gather.

In both modes every rank merges the same gathered data the same way, so the answer is identical
on every rank. ``log Z`` counts the re-scored classes exactly and the others by their LUT
score; in the default mode it differs across world sizes by the LUT error on the extra
candidates' (small) probability mass.
"""
from __future__ import annotations

import math
import sys
from typing import List, Optional, Tuple, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from torchaq import ops
from torchaq.checks import check_int, is_int
from torchaq.distributed.groups import describe, resolve_group
from torchaq.distributed.loss import vocab_parallel_sampled_softmax_loss
from torchaq.distributed.mappings import copy_to_parallel_region
from torchaq.layer.partition import log_partition
from torchaq.ops.rescore import exact_logits
from torchaq.layer.candidates import default_candidates
from torchaq.layer.sampling import check_sampling_args, draw_top_p
from torchaq.layer.softmax import QuantizedSoftmax
from torchaq.quantizers.pq import MAX_FIT_ROWS

# --------------------------------------------------------------------------------------------
# the layer
# --------------------------------------------------------------------------------------------
class VocabParallelQuantizedSoftmax(nn.Module):
    """A :class:`torchaq.QuantizedSoftmax` whose ``V`` classes are split over the ranks of a process group.

    Every rank constructs the layer with its own contiguous slice of the weight (rank ``r`` of
    ``group`` holds rows ``offset_r .. offset_r + V_r - 1`` of the full ``(V, d)`` weight, with
    ``offset_r = V_0 + ... + V_{r-1}``; slice sizes may differ and are exchanged here) and the
    same replicated hidden states ``h`` at every call; every method is a collective that all
    ranks of ``group`` must call with the same arguments. See the module docstring for the
    algorithms; the per-call communication is

    ============================  ==========================================================
    ``layer(h)``                   none forward (local logits ``(..., V_r)``, exactly
                                   ``F.linear`` of the slice); backward: all-reduce of
                                   ``dL/dh`` (``B d`` floats)
    ``topk``                       one all-gather of ``B k`` (value, id) pairs per rank
                                   (``consistent_candidates``: first one of ``B candidates``
                                   LUT scores per rank)
    ``log_softmax_topk``           the same all-gather plus one scalar per row and rank
    ``sample``                     the top-k all-gather, then a broadcast of ``B`` ids
    ``sampled_softmax_loss``       a few all-reduces of ``B`` and ``P`` floats; backward:
                                   all-reduce of ``dL/dh``
    ============================  ==========================================================

    against ``B V`` floats to gather the full logits. Local work per rank is the single-device
    layer's on ``V_r`` rows (LUT scan of ``V_r`` classes, exact re-score of ``candidates``).

    Args:
        weight_shard: this rank's ``(V_r, d)`` rows (``V_r >= 1``); an ``nn.Parameter`` is kept
            as is (trained in place), a ``DTensor`` sharded on dim 0 is used through
            ``to_local()`` (its mesh dimension is the group unless ``group`` is given).
        bias_shard: optional ``(V_r,)`` bias slice (all ranks, or none).
        group: ``None`` (the default group), a ``ProcessGroup``, or a ``DeviceMesh`` (with
            ``mesh_dim`` naming the vocabulary dimension when it has several).
        queries: optional ``(B, d)`` hidden states to calibrate the anisotropy (group rank 0's
            are used).
        num_classes: optional expected total ``V``; a mismatch (e.g. a rank's slice missing)
            raises on every rank.
        mesh_dim: see ``group``.
        fit: fit the shared codebooks now (``False`` to load a ``state_dict``).
        consistent_candidates: re-score exactly the single-device candidate set (results
            independent of the world size, one more all-gather per call; module docstring).
            An attribute: it can be switched later.
        **kwargs: the :class:`torchaq.QuantizedSoftmax` arguments (``num_subspaces``, ``bits``,
            ``threshold``, ``eta``, ``candidates``, ``fit_iters``, ``seed``, ``progress``).

    Bad input on any rank (a ``None`` or empty slice, mismatched ``d``, dtype, device type or
    bias, a wrong total) raises ``ValueError`` on **every** rank after one metadata exchange,
    so no rank is left waiting in a collective.
    """

    def __init__(
        self,
        weight_shard: Tensor,
        bias_shard: Optional[Tensor] = None,
        group=None,
        queries: Optional[Tensor] = None,
        *,
        num_classes: Optional[int] = None,
        mesh_dim: Optional[Union[int, str]] = None,
        fit: bool = True,
        consistent_candidates: bool = False,
        **kwargs,
    ):
        super().__init__()
        if "weight" in kwargs or "bias" in kwargs:
            raise TypeError("pass weight_shard= / bias_shard=, not weight= / bias=")
        if num_classes is not None and (not is_int(num_classes) or num_classes < 1):
            raise ValueError(f"num_classes must be a positive integer or None, got {num_classes!r}")
        weight_shard, group = resolve_group(weight_shard, group, mesh_dim)
        tensor_mod = sys.modules.get("torch.distributed.tensor")
        if tensor_mod is not None and isinstance(bias_shard, tensor_mod.DTensor):
            local_bias = bias_shard.to_local()
            bias_shard = nn.Parameter(local_bias.detach()) if isinstance(bias_shard, nn.Parameter) else local_bias
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)

        # local checks are collected, not raised, so that every rank learns of every error
        error = None
        local = None
        if weight_shard is None:
            error = "weight_shard is None (this rank's slice of the vocabulary is missing)"
        elif not isinstance(weight_shard, Tensor) or weight_shard.dim() != 2 or not weight_shard.is_floating_point():
            error = f"weight_shard must be a floating-point (V_r, d) tensor, got {describe(weight_shard)}"
        elif weight_shard.shape[0] == 0:
            error = f"weight_shard is empty (shape {tuple(weight_shard.shape)}): every rank needs at least one class"
        elif not bool(torch.isfinite(weight_shard.detach()).all()):
            error = "weight_shard contains NaN or Inf"
        else:
            try:
                local = QuantizedSoftmax(weight_shard, bias_shard, fit=False, **kwargs)
            except (TypeError, ValueError) as exc:
                error = f"{type(exc).__name__}: {exc}"
        mine = {
            "error": error,
            "rows": int(weight_shard.shape[0]) if local is not None else -1,
            "dim": int(weight_shard.shape[1]) if local is not None else -1,
            "dtype": str(weight_shard.dtype) if local is not None else None,
            "device": weight_shard.device.type if local is not None else None,
            "bias": bias_shard is not None,
            # the layer's options must agree too (codebook shapes, rule, seed, candidates)
            "options": None if local is None else repr(
                (local.quantizer.num_subspaces, local.quantizer.bits, str(local.quantizer.rule), local.quantizer.seed,
                 local.candidates, local.fit_iters)
            ),
        }
        everyone: List[dict] = [None] * self.world_size  # type: ignore[list-item]
        dist.all_gather_object(everyone, mine, group=group)
        problems = [f"rank {r}: {m['error']}" for r, m in enumerate(everyone) if m["error"]]
        if not problems:
            for key, what in (("dim", "feature dimension d"), ("dtype", "weight dtype"), ("device", "device type"), ("bias", "bias presence"),
                              ("options", "layer options (num_subspaces, bits, rule, seed, candidates, fit_iters)")):
                values = [m[key] for m in everyone]
                if len(set(values)) > 1:
                    problems.append(f"mismatched {what} across ranks: {values} (rank order)")
            total = sum(m["rows"] for m in everyone)
            if num_classes is not None and total != num_classes:
                problems.append(
                    f"the ranks' slices {[m['rows'] for m in everyone]} cover {total} classes but num_classes={num_classes}: "
                    "a rank's slice is missing or wrong"
                )
        if problems:
            raise ValueError("VocabParallelQuantizedSoftmax: bad input on some ranks -- " + "; ".join(problems))

        self.local = local
        self.shard_sizes = [m["rows"] for m in everyone]
        self.offsets = [0]
        for size in self.shard_sizes:
            self.offsets.append(self.offsets[-1] + size)
        self.offset = self.offsets[self.rank]
        self.num_classes = self.offsets[-1]
        self.local_classes = self.shard_sizes[self.rank]
        self.dim = local.dim
        self._root = dist.get_global_rank(group, 0) if group is not dist.group.WORLD else 0
        if not isinstance(consistent_candidates, bool):
            raise TypeError(f"consistent_candidates must be a bool, got {consistent_candidates!r}")
        #: re-score exactly the single-device candidate set (see the class docstring)
        self.consistent_candidates = consistent_candidates
        if fit:
            self.refresh(refit=True, queries=queries)

    # ---------------------------------------------------------------------------------------
    # convenience
    # ---------------------------------------------------------------------------------------
    @property
    def weight(self) -> Tensor:
        """This rank's ``(V_r, d)`` weight slice (an ``nn.Parameter``)."""
        return self.local.weight

    @property
    def bias(self) -> Optional[Tensor]:
        """This rank's ``(V_r,)`` bias slice, or ``None``."""
        return self.local.bias

    @property
    def quantizer(self):
        """The shared quantizer (identical codebooks on every rank)."""
        return self.local.quantizer

    @property
    def candidates(self) -> Optional[int]:
        return self.local.candidates

    @property
    def vocab_range(self) -> Tuple[int, int]:
        """``(start, stop)``: the global class ids this rank holds."""
        return self.offset, self.offset + self.local_classes

    # ---------------------------------------------------------------------------------------
    # shared codebooks
    # ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def refresh(self, refit: bool = False, queries: Optional[Tensor] = None) -> "VocabParallelQuantizedSoftmax":
        """Re-encode this rank's rows against the shared codebooks; ``refit=True`` re-learns them first.

        ``refit=False`` is local (no communication): each rank encodes its ``V_r`` rows.
        ``refit=True`` is a collective: the rows the single-device layer would fit on (all
        ``V`` rows when ``V <= MAX_FIT_ROWS``, else a seeded sample of ``MAX_FIT_ROWS`` rows
        drawn from the global ids, the same for every world size) are gathered to group rank 0,
        which fits :class:`torchaq.AnisotropicPQ` (with its ``queries`` for calibration) and
        broadcasts the quantizer's state; then every rank encodes its rows. Cost: the fit on one
        rank (as on a single device; the other ranks wait in the broadcast, so the process
        group's timeout must exceed it) plus ``min(V, MAX_FIT_ROWS) d`` values sent to rank 0.
        """
        if refit:
            self._fit_shared(queries)
        self.local.refresh(refit=False)
        return self

    def _fit_shared(self, queries: Optional[Tensor]) -> None:
        local, group = self.local, self.group
        q = local.quantizer
        if self.num_classes < q.num_codewords:
            raise ValueError(
                f"the vocabulary has {self.num_classes} classes but bits={q.bits} needs at least {q.num_codewords} to fit the codebooks"
            )
        weight = local.weight.detach()
        start, stop = self.vocab_range
        if self.num_classes <= MAX_FIT_ROWS:
            ids = None  # every row, in vocabulary order: the single-device fit's input exactly
            mine = weight
            counts = self.shard_sizes
        else:
            gen = torch.Generator().manual_seed(q.seed)
            ids = torch.randperm(self.num_classes, generator=gen)[:MAX_FIT_ROWS]
            owner = torch.bucketize(ids, torch.tensor(self.offsets[1:]), right=True)
            counts = torch.bincount(owner, minlength=self.world_size).tolist()
            mine_ids = ids[(ids >= start) & (ids < stop)]
            mine = weight.index_select(0, (mine_ids - start).to(weight.device))
        width = max(counts)
        send = weight.new_zeros((width, self.dim))
        send[: mine.shape[0]] = mine
        gathered = [torch.empty_like(send) for _ in range(self.world_size)] if self.rank == 0 else None
        dist.gather(send, gathered, dst=self._root, group=group)
        state = [None, None, None]  # error, state_dict, AQ warm starts (codes fit found: torchaq.quantizers.aq_warm)
        if self.rank == 0:
            try:
                if ids is None:
                    rows = torch.cat([g[:c] for g, c in zip(gathered, counts)])
                    max_rows = MAX_FIT_ROWS
                else:  # put the sampled rows back in the order of the seeded sample
                    rows = weight.new_empty((ids.shape[0], self.dim))
                    for r, g in enumerate(gathered):  # each owner sent its rows in sample order
                        sel = ((ids >= self.offsets[r]) & (ids < self.offsets[r + 1])).nonzero().squeeze(1)
                        rows[sel.to(rows.device)] = g[: sel.shape[0]]
                    max_rows = None
                if queries is not None:
                    queries = local.flat_features(queries, "queries")
                q.fit(rows, queries=queries, iters=local.fit_iters, progress=local.progress, max_rows=max_rows)
                state[1] = {k: v.cpu() if isinstance(v, Tensor) else v for k, v in q.state_dict().items()}
                state[2] = q.warm_state() if hasattr(q, "warm_state") else None
            except (TypeError, ValueError, RuntimeError) as exc:
                state[0] = (type(exc).__name__, str(exc))
        dist.broadcast_object_list(state, src=self._root, group=group)
        if state[0] is not None:
            kind, msg = state[0]
            raise (ValueError if kind == "ValueError" else TypeError if kind == "TypeError" else RuntimeError)(
                f"fitting the shared codebooks on group rank 0 failed: {msg}"
            )
        if self.rank != 0:
            q.load_state_dict(state[1])
            if hasattr(q, "load_warm_state"):
                q.load_warm_state(state[2])

    # ---------------------------------------------------------------------------------------
    # the layer
    # ---------------------------------------------------------------------------------------
    def forward(self, h: Tensor) -> Tensor:
        """This rank's exact logits ``h @ W_r.T + b_r``: ``(..., V_r)``, like Megatron's ``ColumnParallelLinear``.

        ``h`` is replicated; in backward its gradient is summed over the ranks (every rank must
        run backward), the weight slice's gradient stays local. This layer does the sum itself
        (:func:`copy_to_parallel_region`): do not also wrap ``h`` in Megatron's
        ``copy_to_tensor_model_parallel_region``, or the gradient is summed twice.
        """
        if torch.is_grad_enabled() and h.requires_grad:
            h = copy_to_parallel_region(h, self.group)
        return F.linear(h, self.local.weight, self.local.bias)

    def _check_k(self, k, name: str = "k") -> int:
        return check_int(k, name, 1, self.num_classes, f"in [1, V={self.num_classes}]")

    def _candidates(self, candidates: Optional[int], k: int) -> int:
        if candidates is None:
            candidates = self.local.candidates or default_candidates(k, self.num_classes)
        if not is_int(candidates) or candidates < k:
            raise ValueError(f"candidates must be an integer >= k={k}, got {candidates!r}")
        return int(candidates)

    def _local_best(self, flat: Tensor, k: int, candidates: int, with_log_z: bool) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
        """This rank's ``k`` best (exact logits, global ids) padded to ``k``, and its log-partition piece."""
        local = self.local
        k_r = min(k, self.local_classes)
        c_r = min(candidates, self.local_classes)
        if self.consistent_candidates:
            logits, classes, lut = self._consistent_candidates(flat, candidates, c_r)
        else:
            logits, classes, lut = local.candidate_logits(flat, c_r, k_r)
        log_z = None
        if with_log_z:  # log Z_r: exact candidates + the slice's rest, as the single-device layer estimates it
            approx = ops.lut_score(lut, local.packed_codes, self.local_classes, local.float_bias())
            # consistent_candidates drops some candidates (logit -inf): pointing them at the best kept
            # class (a repeat) leaves them in the rest, where they count with their LUT score
            kept = torch.isfinite(logits)
            classes_z = torch.where(kept, classes, classes[:, :1])
            bias = None if local.bias is None else local.bias.detach()
            log_z = log_partition(flat, local.weight.detach(), bias, logits, classes_z, approx)
        values, ids = logits[:, :k_r], classes[:, :k_r] + self.offset
        ids = torch.where(torch.isfinite(values), ids, self.num_classes)  # dropped: lose every comparison
        if k_r < k:  # a slice smaller than k: pad with entries that lose every comparison
            pad = k - k_r
            values = torch.cat([values, values.new_full((values.shape[0], pad), -math.inf)], 1)
            ids = torch.cat([ids, ids.new_full((ids.shape[0], pad), self.num_classes)], 1)
        return values, ids, log_z

    def _consistent_candidates(self, flat: Tensor, candidates: int, c_r: int) -> Tuple[Tensor, Tensor, Tensor]:
        """The global LUT-best ``candidates`` that live on this rank, re-scored exactly (sorted, best first).

        Each rank's LUT-best ``c_r`` scores are all-gathered (``B candidates`` floats per rank),
        the global ``candidates``-th best score ``tau`` is read off their union, and the rank keeps
        its classes scoring ``>= tau``: the single-device candidate set, split over the ranks
        (classes tied with ``tau`` may add a few). Classes dropped here get logit ``-inf`` and are
        moved to the end; they count with their LUT score in ``log Z``.
        """
        local = self.local
        lut = local.quantizer.lut(flat)
        scores, classes = ops.lut_topk(lut, local.packed_codes, self.local_classes, c_r, local.float_bias())
        width = min(candidates, self.num_classes)
        padded = scores.new_full((scores.shape[0], width), -math.inf)
        padded[:, :c_r] = scores
        everyone = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(everyone, padded.contiguous(), group=self.group)
        tau = torch.cat(everyone, 1).topk(width, dim=1).values[:, -1:]  # (B, 1)
        logits = exact_logits(flat, local.weight.detach(), None if local.bias is None else local.bias.detach(), classes)
        logits = logits.masked_fill(scores < tau, -math.inf)
        logits, order = logits.sort(dim=1, descending=True)
        return logits, classes.gather(1, order), lut

    def _merged(self, h: Tensor, k: int, candidates: Optional[int], with_log_z: bool = False):
        """Gather every rank's best ``k`` (and log Z piece) and merge: identical on every rank."""
        self._check_k(k)
        candidates = self._candidates(candidates, k)
        flat = self.local.flat_features(h)
        values, ids, log_z = self._local_best(flat, k, candidates, with_log_z)
        batch = flat.shape[0]
        # one int32 payload per rank: k float32 values (bit pattern), k ids, [log Z piece]
        parts = [values.float().contiguous().view(torch.int32), ids.to(torch.int32)]
        if with_log_z:
            parts.append(log_z.float().unsqueeze(1).contiguous().view(torch.int32))
        payload = torch.cat(parts, 1).contiguous()
        gathered = [torch.empty_like(payload) for _ in range(self.world_size)]
        dist.all_gather(gathered, payload, group=self.group)
        allp = torch.stack(gathered, 1)  # (B, P, width)
        all_values = allp[:, :, :k].contiguous().view(torch.float32).reshape(batch, -1)
        all_ids = allp[:, :, k : 2 * k].long().reshape(batch, -1)
        # deterministic merge: value descending, ties to the lower id (stable sorts)
        by_id = all_ids.argsort(dim=1, stable=True)
        all_values, all_ids = all_values.gather(1, by_id), all_ids.gather(1, by_id)
        order = all_values.argsort(dim=1, descending=True, stable=True)[:, :k]
        top_values, top_ids = all_values.gather(1, order), all_ids.gather(1, order)
        total_log_z = None
        if with_log_z:
            pieces = allp[:, :, 2 * k].contiguous().view(torch.float32)  # (B, P)
            total_log_z = torch.logsumexp(pieces, dim=1)  # max then sum, the same order on every rank
        return top_values, top_ids, total_log_z

    @torch.no_grad()
    def topk(self, h: Tensor, k: int = 10, candidates: Optional[int] = None) -> Tuple[Tensor, Tensor]:
        """Approximate global top-``k``: ``(values, global ids)`` of shape ``(..., k)``, identical on every rank.

        Per rank: LUT scan of its ``V_r`` classes, exact re-score of its ``candidates`` best
        (default :func:`torchaq.layer.default_candidates` of the global ``V``), its ``k`` best
        with global ids; then one all-gather of ``B k`` (value, id) pairs per rank and a merge
        (value descending, ties to the lower id). Values are exact logits.
        """
        values, ids, _ = self._merged(h, k, candidates)
        lead = h.shape[:-1]
        return values.reshape(lead + (k,)), ids.reshape(lead + (k,))

    @torch.no_grad()
    def log_softmax_topk(self, h: Tensor, k: int = 10, candidates: Optional[int] = None) -> Tuple[Tensor, Tensor]:
        """Log-probabilities of the approximate global top-``k``: ``(logp, global ids)``, identical on every rank.

        ``log Z = logsumexp_r log Z_r`` with each rank's piece ``log Z_r = logsumexp(exact logits
        of its candidates, LUT scores of its other classes)`` (the single-device estimate on the
        slice); the pieces travel with the top-k all-gather (one float per row and rank) and
        are combined as an all-reduce would (max, then sum of exponentials). Costs a LUT score
        pass over the slice on top of :meth:`topk`.
        """
        values, ids, log_z = self._merged(h, k, candidates, with_log_z=True)
        lead = h.shape[:-1]
        return (values - log_z.unsqueeze(1)).reshape(lead + (k,)), ids.reshape(lead + (k,))

    @torch.no_grad()
    def sample(
        self,
        h: Tensor,
        top_k: int = 50,
        top_p: Optional[float] = None,
        temperature: float = 1.0,
        generator: Optional[torch.Generator] = None,
        candidates: Optional[int] = None,
    ) -> Tensor:
        """Top-k (and top-p) sampling of one global class id per row, identical on every rank.

        The merged global top-``top_k`` (as :meth:`topk`) is sampled exactly as
        :meth:`torchaq.QuantizedSoftmax.sample` does; group rank 0's draw is broadcast to all
        ranks (every rank also draws, so generators seeded alike stay in step), so the result
        does not rely on per-rank random states agreeing. With the same ``generator`` seed the
        draw equals the single-device layer's whenever the merged top-``top_k`` does.
        """
        top_k = self._check_k(top_k, "top_k")
        top_p, temperature = check_sampling_args(top_p, temperature)
        values, ids, _ = self._merged(h, top_k, candidates)
        choice = draw_top_p(values, top_p, temperature, generator)
        tokens = ids.gather(1, choice.to(ids.device)).squeeze(1).contiguous()
        dist.broadcast(tokens, src=self._root, group=self.group)
        return tokens.reshape(h.shape[:-1])

    sampled_softmax_loss = vocab_parallel_sampled_softmax_loss

    # ---------------------------------------------------------------------------------------
    # state
    # ---------------------------------------------------------------------------------------
    def get_extra_state(self) -> dict:
        return {"shard_sizes": list(self.shard_sizes), "rank": self.rank}

    def set_extra_state(self, state: dict) -> None:
        if list(state["shard_sizes"]) != self.shard_sizes or state["rank"] != self.rank:
            raise ValueError(
                f"state_dict was saved by rank {state['rank']} of shards {state['shard_sizes']}, "
                f"but this is rank {self.rank} of shards {self.shard_sizes}"
            )

    def extra_repr(self) -> str:
        return f"V={self.num_classes}, rank={self.rank}/{self.world_size}, slice=[{self.offset}, {self.offset + self.local_classes})"
