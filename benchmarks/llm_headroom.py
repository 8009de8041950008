"""Part ``headroom`` of ``benchmarks/llm_heads.py``: how long the head may take in ``generate()``, and which lever could fit it.

For a model of :mod:`benchmarks.llm_generate` (random weights from the config), on the final
hidden states of random prompts (what a greedy step scores):

1. **the softmax the head faces**: its entropy (nats; ``log V`` is a flat softmax) and the gap
   between the two best logits in units of the logits' standard deviation. A trained LM's states
   give 2--4 nats and a top logit far above the bulk; the smaller the gap, the more exactly a
   first pass must rank the classes for the greedy token to survive it;
2. **the budget**: the decode step of ``generate()`` with the zero head
   (:class:`benchmarks.llm_generate.ZeroHead`, the limit) and with the dense head, and how long the
   quantized head may take for ``generate`` to stay within 5% of the limit: ``step / 0.95 - step``;
3. **what the head takes**: the fast step ``generate`` runs (:meth:`torchaq.QuantizedSoftmax.candidate_logits`
   with the default candidates) and its LUT scan alone (``lut_topk``), for codes of ``M = d / r``
   subspaces (``--variants``: the ratios ``r``);
4. **the fewer-bits lever**: the rank of the dense greedy token among all classes by each code's
   LUT score (p50 / p99 / max over the states). A first pass with those codes must keep at least
   that many candidates for every greedy token to stay identical;
5. **the partition lever**: the rows in ``nlist`` k-means lists (IVF), lists ranked by
   ``<h, centroid>``: how many lists, and what share of the classes, must be read for the greedy
   token's list to be among them.
"""
from __future__ import annotations

import statistics
import time

import torch

import torchaq
from benchmarks import llm_generate
from benchmarks.common import markdown_table, time_call
from torchaq import ops


@torch.no_grad()
def decode_states(model, num: int, length: int = 24, seed: int = 7, chunk: int = 32) -> torch.Tensor:
    """Final hidden states at the last position of ``num`` random prompts, float32 ``(num, d)``."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, model.config.vocab_size, (num, length), generator=gen).to(model.device)
    return torch.cat([model.model(input_ids=ids[i:i + chunk]).last_hidden_state[:, -1].float()
                      for i in range(0, num, chunk)])


def quantiles(x: torch.Tensor) -> str:
    x = x.double()
    return f"{x.median().item():,.0f} / {x.quantile(0.99).item():,.0f} / {x.max().item():,.0f}"


@torch.no_grad()
def step_ms(model, head, batch: int, new_tokens: int, reps: int) -> float:
    """Median decode step (ms, wall clock) of greedy ``generate`` with ``head`` as the model's head."""
    timed = llm_generate.TimedHead(head)
    model.lm_head = head
    ids = torch.randint(3, model.config.vocab_size, (batch, 16), generator=torch.Generator().manual_seed(batch))
    steps = []
    for _ in range(reps):
        timed.calls = []
        llm_generate.greedy_generate(model, ids.to(model.device), new_tokens)
        steps += timed.steps()[0]
    return statistics.median(steps) * 1e3


@torch.no_grad()
def greedy_ranks(layer, states: torch.Tensor, greedy: torch.Tensor, chunk: int = 32) -> torch.Tensor:
    """Per state, how many classes the layer's LUT scan ranks above the dense greedy token: 0 when the
    token is a side row (every fast step scores those exactly; the scan's bias puts them below every
    coded class, so they never count above a coded token)."""
    ranks = []
    side = layer.side_rows.to(greedy.device)
    for i in range(0, states.shape[0], chunk):
        h, g = states[i:i + chunk], greedy[i:i + chunk]
        score = ops.lut_score(layer.quantizer.lut(h), layer.packed_codes, layer.num_classes, layer.scan_bias())
        rank = (score > score.gather(1, g[:, None])).sum(1)
        ranks.append(rank.masked_fill(torch.isin(g, side), 0))
    return torch.cat(ranks)


@torch.no_grad()
def kmeans_lists(rows: torch.Tensor, nlist: int, iters: int, seed: int = 0, chunk: int = 32_768):
    """Lloyd's k-means (L2, as IVF builds its lists): ``(centroids (nlist, d), list of each row (V,))``."""
    gen = torch.Generator().manual_seed(seed)
    centroids = rows[torch.randperm(rows.shape[0], generator=gen)[:nlist]].clone()
    for it in range(iters + 1):
        c_sq = (centroids * centroids).sum(1)
        assign = torch.cat([(c_sq - 2 * rows[i:i + chunk] @ centroids.T).argmin(1)
                            for i in range(0, rows.shape[0], chunk)])
        if it == iters:
            break
        sums = torch.zeros_like(centroids).index_add_(0, assign, rows)
        counts = torch.bincount(assign, minlength=nlist).clamp_min(1).to(rows.dtype)
        centroids = sums / counts[:, None]
    return centroids, assign


@torch.no_grad()
def run(name: str, dtype: torch.dtype, batches, ratios, num_states: int, nlist: int, kmeans_iters: int,
        new_tokens: int = 16, reps: int = 2, threads: int = 2) -> str:
    torch.set_num_threads(threads)
    model = llm_generate.build_model(name, dtype)
    dense = model.lm_head
    rows = dense.weight.detach().float()
    v, d = rows.shape
    calib = llm_generate.calibration_states(model)
    states = decode_states(model, num_states)
    logits = states @ rows.T
    greedy = logits.argmax(1)
    logp = logits.log_softmax(1)
    entropy = -(logp.exp() * logp).sum(1)
    top2 = logits.topk(2, dim=1).values
    gap = (top2[:, 0] - top2[:, 1]) / logits.std(1)
    del logits, logp
    text = [f"### {name} {str(dtype).removeprefix('torch.')}: V = {v:,}, d = {d}, {num_states} decode states, "
            f"{threads} threads\n"
            f"softmax entropy p50 {entropy.median().item():.2f} nats (flat: log V = {torch.log(torch.tensor(v)).item():.2f}); "
            f"top-1 minus top-2 logit p50 {gap.median().item():.3f} logit std"]

    budget = {}
    for b in batches:
        zero = step_ms(model, llm_generate.ZeroHead(v), b, new_tokens, reps)
        budget[b] = (zero, step_ms(model, dense, b, new_tokens, reps), zero / 0.95 - zero)
    model.lm_head = dense
    print(f"  {name}: budgets {budget}", flush=True)

    layers, fits, rank_rows = {}, {}, []
    for r in ratios:
        t0 = time.perf_counter()
        # the head in the model's dtype, as quantize_lm_head builds it (the fast step re-scores in that dtype)
        layer = torchaq.QuantizedSoftmax(dense.weight.detach(), num_subspaces=d // r, queries=calib.float(),
                                         progress=False)
        fits[r] = time.perf_counter() - t0
        layers[r] = layer
        ranks = greedy_ranks(layer, states, greedy)
        rank_rows.append([f"d/{r} = {d // r}", 4 * (d // r), f"{fits[r]:.1f}", quantiles(ranks),
                          f"{(ranks < 256).float().mean().item():.3f}"])
        print(f"  {name}: M = {d // r} ranks {quantiles(ranks)}", flush=True)

    time_rows = []
    for b in batches:
        zero, dense_ms, allowed = budget[b]
        cells = [b, f"{zero:.1f}", f"{dense_ms:.1f}", f"{allowed:.2f}"]
        h = states[:b].to(dtype)
        for r in ratios:
            layer = layers[r]
            lut = layer.quantizer.lut(h)
            scan = time_call(lambda: ops.lut_topk(lut, layer.packed_codes, v, 256, layer.scan_bias()), 0.3).ms
            fast = time_call(lambda: layer.candidate_logits(h), 0.3).ms
            cells += [f"{fast:.2f}", f"{scan:.2f}"]
        time_rows.append(cells)
    text.append("Budget and head time (wall clock ms; the head may take the budget for generate to stay within 5% "
                "of the zero-head limit)\n" + markdown_table(
                    ["batch", "zero-head step", "dense step", "head budget (5%)",
                     *[f"{c} M = {d // r}" for r in ratios for c in ("fast step", "scan")]], time_rows))
    text.append("Fewer bits: rank of the dense greedy token by the LUT score (the candidates a first pass must keep)\n"
                + markdown_table(["M", "bits / class", "fit s", "rank p50 / p99 / max", "share ranked < 256"],
                                 rank_rows))
    del layers

    t0 = time.perf_counter()
    centroids, assign = kmeans_lists(rows, nlist, kmeans_iters)
    km_s = time.perf_counter() - t0
    order = (states @ centroids.T).argsort(1, descending=True)
    target = assign[greedy]
    probed = (order == target[:, None]).int().argmax(1) + 1  # lists read until the greedy token's list
    sizes = torch.bincount(assign, minlength=nlist)
    read = torch.stack([sizes[order[i, :probed[i]]].sum() for i in range(order.shape[0])]).double() / v
    text.append(f"Partition: {nlist} k-means lists ({kmeans_iters} iterations, {km_s:.0f} s), ranked by <h, centroid>\n"
                + markdown_table(["lists", "lists probed p50 / p99 / max", "classes read p50 / p99 / max (%)"],
                                 [[nlist, quantiles(probed),
                                   " / ".join(f"{100 * x:.0f}" for x in
                                              (read.median().item(), read.quantile(0.99).item(), read.max().item()))]]))
    del model, dense, rows, states
    return "\n\n".join(text)
