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
* :meth:`~VocabParallelQuantizedSoftmax.topk`: each rank scans its slice; the ranks' scan scores
  and then their best re-scored candidates are all-gathered and merged (value descending, ties to
  the lower id) into the single-device answer (``invariant=False``: each rank re-scores its own
  ``candidates`` and only ``B k`` (value, id) pairs per rank are gathered);
* :meth:`~VocabParallelQuantizedSoftmax.log_softmax_topk`: ``log Z`` from fixed-point integer
  sums over the ranks' slices (``invariant=False``: ``logsumexp_r log Z_r`` of per-rank pieces);
* :meth:`~VocabParallelQuantizedSoftmax.sample`: drawn from the merged candidates on group rank
  0 and broadcast (per-rank ``multinomial`` calls would diverge);
* :meth:`~VocabParallelQuantizedSoftmax.sampled_softmax_loss`: the single-device ``lut``
  proposal and control variate with the sums split over the ranks (:mod:`torchaq.distributed.lut_loss`;
  ``proposal="shared"``: a stratified estimator with per-rank hard sets and draws);
* gradients: ``h`` is replicated, so its gradient is summed over ranks in backward (Megatron's
  ``copy_to_tensor_model_parallel_region``); each rank's weight slice gets its own gradient only.

World-size invariance (the default, ``invariant=True``). The codebooks are fitted from the
same rows whatever the world size and the exact side list is chosen by the single-device rule over
all ``V`` rows (:mod:`torchaq.distributed.fit`), so every class has the same codes and scores with
1, 2 or 4 ranks; :mod:`torchaq.distributed.invariant` then reproduces the single-device candidate
choice (scan, int8 shortlist, exact re-score, ties to the lower id) from per-rank lists and sums
``log Z`` in fixed-point integers, so ``topk``, ``log_softmax_topk`` and ``sample`` (same seed)
are **bitwise** those of :class:`torchaq.QuantizedSoftmax` on the whole weight, on every rank and
at every world size. Cost: two all-gathers per call (``B scan_k`` scan scores, then ``B (3 R +
1)`` or ``B 2 k`` values per rank), three more small ones for ``log Z``.

``invariant=False`` (the cheaper mode): each rank re-scores its own ``candidates`` LUT-best
classes and the ranks exchange their ``k`` best only (``B k`` pairs per rank, one all-gather);
the union of the ranks' candidates contains the single-device ones, so the result is never less
accurate, but it (and ``log Z``, summed from per-rank estimates) depends on the world size.

Every collective method starts with one fixed-size header all-gather
(:mod:`torchaq.distributed.agreement`): ranks that disagree on the call, the batch shape, ``k``,
``candidates``, the dtype or the contents of ``h`` / the targets, or whose own checks failed, make
every rank raise the same :class:`~torchaq.distributed.agreement.VocabParallelError` instead of
hanging, and the group stays usable. The header travels with the call's first payload when that
fits in :data:`~torchaq.distributed.agreement.INLINE_WORDS` (batch 1 to 8 at the default
candidates), so at small batches it costs no round trip of its own.
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
from torchaq.distributed import agreement
from torchaq.distributed.fit import fit_shared, global_side_rows
from torchaq.distributed.groups import all_gather_rows, describe, resolve_group
from torchaq.distributed.invariant import best_first, invariant_candidates, invariant_topk
from torchaq.distributed.loss import vocab_parallel_sampled_softmax_loss
from torchaq.distributed.mappings import copy_to_parallel_region
from torchaq.layer.partition import log_partition
from torchaq.layer.candidates import default_candidates
from torchaq.layer.sampling import check_sampling_args, draw_top_p
from torchaq.layer.softmax import QuantizedSoftmax
from torchaq.training.conventions import check_targets
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
    every method below            first one all-gather of the 168-byte header and an 8 KB
                                   slot per rank, which carries the first payload below when
                                   it fits (then that payload is not sent again)
    ``topk``                       all-gathers of ``B scan_k`` scan scores and ``B (3 R + 1)``
                                   (int8 score, logit, id) values per rank (``invariant=False``:
                                   one all-gather of ``B k`` (value, id) pairs per rank)
    ``log_softmax_topk``           the same with ``B k`` pairs, then ``B`` maxima, ``2 B`` int64
                                   totals and ``B n`` sampled ratios for ``log Z``
    ``sample``                     the top-k all-gathers, then a broadcast of ``B`` ids
    ``refresh``                    an all-gather of ``2 max(V_r)`` norms (the global side list)
    ``sampled_softmax_loss``       an all-gather of ``B C`` scan scores, all-reduces of
                                   ``O(B)`` values, a broadcast of ``P`` counts; backward:
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
        invariant: ``True`` (default): results bitwise those of the single-device layer at every
            world size; ``False``: the cheaper per-rank candidates (module docstring). An
            attribute: it can be switched later.
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
        invariant: bool = True,
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
        #: the global rank of group rank 0 (where the codebooks are fitted, whose draw is broadcast)
        self.root = dist.get_global_rank(group, 0) if group is not dist.group.WORLD else 0
        if not isinstance(invariant, bool):
            raise TypeError(f"invariant must be a bool, got {invariant!r}")
        #: results independent of the world size (see the class docstring)
        self.invariant = invariant
        #: refresh count, part of every call's header (indexes out of step are refused)
        self.generation = 0
        #: size of the global exact side list
        self.num_side_rows = 0
        #: run the per-call header agreement (``False`` only to measure what it costs: a rank whose
        #: arguments differ can then hang or abort the group, as without it)
        self.agreement = True
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

        A collective: call it on every rank (``CodebookRefresher`` does). After the header
        agreement, ``refit=True`` fits the shared codebooks (:func:`torchaq.distributed.fit.fit_shared`:
        the single-device fit's rows gathered to group rank 0, the quantizer's state broadcast;
        the other ranks wait in the broadcast, so the process group's timeout must exceed the fit);
        then every rank re-encodes its ``V_r`` rows (incrementally, as
        :meth:`torchaq.QuantizedSoftmax.refresh`) and the exact side list is re-chosen over all
        ``V`` rows (:func:`torchaq.distributed.fit.global_side_rows`, ``2 max(V_r)`` floats per rank).
        """
        op = "refresh(refit=True)" if refit else "refresh"
        error = None
        try:
            if queries is not None and self.rank == 0:
                self.local.flat_features(queries, "queries")
        except (TypeError, ValueError) as exc:
            error = exc
        agreement.agree(self.group, self.world_size, self.local.weight.device,
                        agreement.header(op, self.generation, error=error), error)
        if refit:
            fit_shared(self, queries, MAX_FIT_ROWS)
        self.local.refresh(refit=False)
        self.num_side_rows = global_side_rows(self)
        self.generation += 1
        return self

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
            candidates = min(self.local.candidates or default_candidates(k, self.num_classes), self.num_classes)
        if not is_int(candidates) or not k <= candidates <= self.num_classes:
            raise ValueError(f"candidates must be an integer in [k={k}, V={self.num_classes}], got {candidates!r}")
        return int(candidates)

    def begin(self, op: str, h, k: int = 0, candidates: Optional[int] = None, k_name: str = "k",
              target: Optional[Tensor] = None, check=None, defer: bool = False):
        """The per-call agreement (:mod:`torchaq.distributed.agreement`) after this rank's own checks
        (``check``: a callable raising ``TypeError`` / ``ValueError`` for more of them):
        ``(flat h, k, candidates)``, or the same :class:`VocabParallelError` on every rank.
        ``defer=True`` (when this rank's checks passed) returns the pending
        :class:`~torchaq.distributed.agreement.Agreement` as a fourth value: the call's first
        collective must go through it (its ``gather`` sends the header with that payload)."""
        error, flat, arg = None, None, 0
        try:
            if check is not None:
                check()
            if op in ("topk", "log_softmax_topk", "sample"):
                k = self._check_k(k, k_name)
                candidates = self._candidates(candidates, k)
            flat = self.local.flat_features(h)
            if target is not None:
                check_targets(target, h, self.num_classes)
        except (TypeError, ValueError) as exc:
            error = exc
            arg = k if "k must" in str(exc) and isinstance(k, int) else 0
        values = None
        if self.agreement and (self.world_size > 1 or error is not None):  # one rank: only its own error
            values = agreement.header(op, self.generation, h, k if isinstance(k, int) else -1,
                                      candidates if isinstance(candidates, int) else -1, target, error, arg,
                                      checksums=self.world_size > 1)
        elif error is not None:
            raise error
        device = h.device if isinstance(h, Tensor) else self.local.weight.device
        pending = agreement.Agreement(self.group, self.world_size, device, values, error)
        if not defer or error is not None:
            pending()
        return (flat, k, candidates, pending) if defer else (flat, k, candidates)

    def _local_best(self, flat: Tensor, k: int, candidates: int, with_log_z: bool) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
        """``invariant=False``: this rank's ``k`` best (exact logits, global ids) padded to ``k``, and its log-partition piece."""
        local = self.local
        k_r = min(k, self.local_classes)
        c_r = min(candidates, self.local_classes)
        logits, classes, lut = local.candidate_logits(flat, c_r, k_r)
        log_z = None
        if with_log_z:  # log Z_r: exact candidates + the slice's rest, as the single-device layer estimates it
            approx = ops.lut_score(lut, local.packed_codes, self.local_classes, local.float_bias())
            bias = None if local.bias is None else local.bias.detach()
            log_z = log_partition(flat, local.weight.detach(), bias, logits, classes, approx)
        values, ids = logits[:, :k_r], classes[:, :k_r] + self.offset
        ids = torch.where(torch.isfinite(values), ids, self.num_classes)  # dropped: lose every comparison
        if k_r < k:  # a slice smaller than k: pad with entries that lose every comparison
            pad = k - k_r
            values = torch.cat([values, values.new_full((values.shape[0], pad), -math.inf)], 1)
            ids = torch.cat([ids, ids.new_full((ids.shape[0], pad), self.num_classes)], 1)
        return values, ids, log_z

    def _merged(self, flat: Tensor, k: int, candidates: int, with_log_z: bool = False, pending=None):
        """``invariant=False``: gather every rank's best ``k`` (and log Z piece) and merge: identical on every rank."""
        values, ids, log_z = self._local_best(flat, k, candidates, with_log_z)
        batch = flat.shape[0]
        # one int32 payload per rank: k float32 values (bit pattern), k ids, [log Z piece]
        parts = [values.float().contiguous().view(torch.int32), ids.to(torch.int32)]
        if with_log_z:
            parts.append(log_z.float().unsqueeze(1).contiguous().view(torch.int32))
        payload = torch.cat(parts, 1).contiguous()
        # (B, P, width); with the call's header agreement, which carries it when it is small
        every = all_gather_rows(payload, self.group, self.world_size) if pending is None else pending.gather(payload)
        allp = every.permute(1, 0, 2)
        all_values = allp[:, :, :k].contiguous().view(torch.float32).reshape(batch, -1)
        all_ids = allp[:, :, k : 2 * k].long().reshape(batch, -1)
        top_values, top_ids = best_first(all_values, all_ids, k)
        total_log_z = None
        if with_log_z:
            pieces = allp[:, :, 2 * k].contiguous().view(torch.float32)  # (B, P)
            total_log_z = torch.logsumexp(pieces, dim=1)  # max then sum, the same order on every rank
        return top_values, top_ids, total_log_z

    def _best(self, flat: Tensor, k: int, candidates: int, with_log_z: bool = False, pending=None):
        if self.invariant:
            return invariant_candidates(self, flat, k, candidates, with_log_z, pending)
        return self._merged(flat, k, candidates, with_log_z, pending)

    @torch.no_grad()
    def topk(self, h: Tensor, k: int = 10, candidates: Optional[int] = None) -> Tuple[Tensor, Tensor]:
        """Approximate global top-``k``: ``(values, global ids)`` of shape ``(..., k)``, identical on every rank.

        ``invariant=True``: bitwise :meth:`torchaq.QuantizedSoftmax.topk` of the whole weight
        (:func:`torchaq.distributed.invariant.invariant_topk`). ``invariant=False``: per rank, LUT
        scan of its ``V_r`` classes, exact re-score of its ``candidates`` best, its ``k`` best with
        global ids; one all-gather of ``B k`` (value, id) pairs per rank and a merge (value
        descending, ties to the lower id). Values are exact logits.
        """
        flat, k, candidates, pending = self.begin("topk", h, k, candidates, defer=True)
        if self.invariant and self.world_size == 1:  # the single-device layer itself
            pending()
            return self.local.topk(h, k, candidates)
        if self.invariant:
            values, ids = invariant_topk(self, flat, k, candidates, pending)
        else:
            values, ids, _ = self._merged(flat, k, candidates, pending=pending)
        lead = h.shape[:-1]
        return values.reshape(lead + (k,)), ids.reshape(lead + (k,))

    @torch.no_grad()
    def log_softmax_topk(self, h: Tensor, k: int = 10, candidates: Optional[int] = None) -> Tuple[Tensor, Tensor]:
        """Log-probabilities of the approximate global top-``k``: ``(logp, global ids)``, identical on every rank.

        ``invariant=True``: bitwise the single-device value (``log Z`` from fixed-point integer sums,
        :mod:`torchaq.layer.partition`). ``invariant=False``: ``log Z = logsumexp_r log Z_r`` of the
        ranks' own single-device estimates on their slices (one float per row and rank).
        """
        flat, k, candidates, pending = self.begin("log_softmax_topk", h, k, candidates, defer=True)
        if self.invariant and self.world_size == 1:
            pending()
            return self.local.log_softmax_topk(h, k, candidates)
        values, ids, log_z = self._best(flat, k, candidates, with_log_z=True, pending=pending)
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

        The merged global top-``top_k`` (the candidates of :meth:`log_softmax_topk`) is sampled
        exactly as :meth:`torchaq.QuantizedSoftmax.sample` does; group rank 0's draw is broadcast
        to all ranks (every rank also draws, so generators seeded alike stay in step), so the
        result does not rely on per-rank random states agreeing. With ``invariant=True`` and the
        same ``generator`` seed the draw is the single-device layer's.
        """
        top_p, temperature = check_sampling_args(top_p, temperature)
        flat, top_k, candidates, pending = self.begin("sample", h, top_k, candidates, k_name="top_k", defer=True)
        values, ids, _ = self._best(flat, top_k, candidates, pending=pending)
        choice = draw_top_p(values, top_p, temperature, generator)
        tokens = ids.gather(1, choice.to(ids.device)).squeeze(1).contiguous()
        if self.world_size > 1:
            dist.broadcast(tokens, src=self.root, group=self.group)
        return tokens.reshape(h.shape[:-1])

    sampled_softmax_loss = vocab_parallel_sampled_softmax_loss

    # ---------------------------------------------------------------------------------------
    # state
    # ---------------------------------------------------------------------------------------
    def get_extra_state(self) -> dict:
        return {"shard_sizes": list(self.shard_sizes), "rank": self.rank, "num_side_rows": self.num_side_rows}

    def set_extra_state(self, state: dict) -> None:
        if list(state["shard_sizes"]) != self.shard_sizes or state["rank"] != self.rank:
            raise ValueError(
                f"state_dict was saved by rank {state['rank']} of shards {state['shard_sizes']}, "
                f"but this is rank {self.rank} of shards {self.shard_sizes}"
            )
        self.num_side_rows = int(state.get("num_side_rows", 0))

    def extra_repr(self) -> str:
        return f"V={self.num_classes}, rank={self.rank}/{self.world_size}, slice=[{self.offset}, {self.offset + self.local_classes})"
