"""Train a tiny language model with the body under DDP and the output layer vocabulary-parallel and quantized.

    torchrun --nproc-per-node 2 examples/train_vocab_parallel.py --quick     # CPU, gloo (NCCL on GPUs)
    python examples/train_vocab_parallel.py --quick                          # spawns 2 gloo ranks itself

The body (token embeddings of the previous ``--context`` tokens, an MLP) is replicated under
``DistributedDataParallel``: every rank trains on its own batch. The head, an ``nn.Linear(d, V)``,
is sharded over the same ranks' vocabulary with torch's tensor-parallel API,
``parallelize_module(model, mesh, {"head": torchaq.distributed.QuantizedVocabParallel(...)})``.
The head needs replicated hidden states, so the ranks all-gather their batches' hidden states
(the backward keeps each rank's rows: the loss is the same on every rank), and the loss is the
vocabulary-parallel sampled softmax with the ``lut`` proposal; DDP sums the body's gradients (a
sum hook: each rank holds the gradient of its own rows of the shared loss). A
``CodebookRefresher`` keeps the quantized index in step with the trained head. Every
``--eval-every`` steps rank 0 prints the exact held-out cross-entropy (full softmax over the
split vocabulary: all-reduce of max and sum, as Megatron) and the top-1 accuracy of the
quantized ``topk``.

The data: a synthetic language whose next token depends on the previous one (a fixed random
sparse transition table, Zipf-distributed, entropy about 2 nats), so the loss falls well below ``log V``.
"""
from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn


def make_corpus(vocab: int, length: int, seed: int = 0) -> torch.Tensor:
    """Tokens from a random Markov chain: each token has 8 likely successors (Zipf weights), 5% noise."""
    gen = torch.Generator().manual_seed(seed)
    succ = torch.randint(0, vocab, (vocab, 8), generator=gen)
    probs = 1.0 / torch.arange(1, 9, dtype=torch.float)
    tokens = torch.empty(length, dtype=torch.long)
    tokens[:2] = torch.randint(0, vocab, (2,), generator=gen)
    choice = torch.multinomial(probs, length, replacement=True, generator=gen)
    noise = torch.rand(length, generator=gen) < 0.05
    rand = torch.randint(0, vocab, (length,), generator=gen)
    for i in range(2, length):
        state = tokens[i - 1]
        tokens[i] = rand[i] if noise[i] else succ[state, choice[i]]
    return tokens


class Body(nn.Module):
    """Embeddings of the previous ``context`` tokens -> MLP -> hidden state."""

    def __init__(self, vocab: int, dim: int, context: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.mlp = nn.Sequential(nn.Linear(context * dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, ctx: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.embed(ctx).flatten(1))


class TinyLM(nn.Module):
    """``body`` (under DDP) and ``head``, the output layer (vocabulary-parallel)."""

    def __init__(self, vocab: int, dim: int, context: int):
        super().__init__()
        self.body = Body(vocab, dim, context)
        self.head = nn.Linear(dim, vocab)


class GatherRows(torch.autograd.Function):
    """All-gather of every rank's ``(B, d)`` rows; backward: this rank's rows of the (replicated-loss) gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.rank, ctx.rows = dist.get_rank(), x.shape[0]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad[ctx.rank * ctx.rows: (ctx.rank + 1) * ctx.rows]


def sum_hook(state, bucket):
    """DDP comm hook: sum the ranks' gradients (each holds its rows' share of the same loss)."""
    fut = dist.all_reduce(bucket.buffer(), async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


def batches(tokens: torch.Tensor, context: int, batch: int, gen: torch.Generator):
    while True:
        pos = torch.randint(context, tokens.numel(), (batch,), generator=gen)
        ctx = torch.stack([tokens[pos - context + j] for j in range(context)], 1)
        yield ctx, tokens[pos]


def full_cross_entropy(head, h: torch.Tensor, target: torch.Tensor) -> float:
    """Exact cross-entropy over the split vocabulary (Megatron's all-reduce of max and sum)."""
    from torchaq.distributed import parallel_logsumexp

    logits = head(h)  # this rank's (B, V_r) slice
    log_z = parallel_logsumexp(torch.logsumexp(logits, 1), head.group)
    start, stop = head.vocab_range
    owned = (target >= start) & (target < stop)
    picked = logits.gather(1, (target - start).clamp(0, stop - start - 1).unsqueeze(1)).squeeze(1)
    mine = torch.where(owned, picked, torch.zeros_like(picked))
    dist.all_reduce(mine, group=head.group)
    return float((log_z - mine).mean())


def train(args) -> None:
    import torchaq
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module
    from torch.nn.parallel import DistributedDataParallel as DDP
    from torchaq.distributed import QuantizedVocabParallel

    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if dist.get_backend() == "nccl" else torch.device("cpu")
    torch.manual_seed(0)  # the same initial model on every rank
    tokens = make_corpus(args.vocab, args.tokens)
    split = int(0.9 * tokens.numel())
    model = TinyLM(args.vocab, args.dim, args.context).to(device)
    gen = torch.Generator().manual_seed(100 + rank)  # each rank its own batches (data parallel)
    train_iter = batches(tokens[:split], args.context, args.batch, gen)
    with torch.no_grad():  # calibration queries for the head's codebooks: hidden states of the initial body
        ctx, _ = next(batches(tokens[:split], args.context, 256, torch.Generator().manual_seed(1)))
        queries = model.body(ctx.to(device))
    mesh = init_device_mesh(device.type, (world,))
    parallelize_module(model, mesh, {"head": QuantizedVocabParallel(queries=queries, num_subspaces=args.dim // 2,
                                                                    progress=False)})
    head = model.head  # now a torchaq.distributed.VocabParallelHead over this rank's vocabulary slice
    body = DDP(model.body, device_ids=None if device.type == "cpu" else [device])
    body.register_comm_hook(None, sum_hook)
    opt = torch.optim.AdamW(list(body.parameters()) + list(head.parameters()), lr=args.lr, weight_decay=0.0)
    refresher = torchaq.CodebookRefresher(head, every=args.refresh_every, refit_every=args.refit_every)
    eval_gen = torch.Generator().manual_seed(7)
    eval_ctx, eval_target = next(batches(tokens[split:], args.context, 512, eval_gen))
    eval_ctx, eval_target = eval_ctx.to(device), eval_target.to(device)
    draw_gen = torch.Generator(device=device).manual_seed(1234 + rank)
    if rank == 0:
        print(f"V={args.vocab} d={args.dim} ranks={world}: head slices {head.shard_sizes}, log V = {math.log(args.vocab):.2f}",
              flush=True)
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        ctx, target = next(train_iter)
        h_mine = body(ctx.to(device))
        # the replicated batch of all ranks for the head (DDP syncs the body's gradients below)
        h_all = GatherRows.apply(h_mine)
        target_all = GatherRows.apply(target.to(device).float()).long()
        loss = head.sampled_softmax_loss(h_all, target_all, num_sampled=args.num_sampled, generator=draw_gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()  # DDP sums the body's gradients over the ranks (sum_hook)
        opt.step()
        kind = refresher.step(h_all.detach())
        if step % args.eval_every == 0 or step == args.steps:
            with torch.no_grad():
                h_eval = model.body(eval_ctx)
                ce = full_cross_entropy(head, h_eval, eval_target)
                top1 = float((head.topk(h_eval, 1)[1].squeeze(1) == eval_target).float().mean())
            if rank == 0:
                print(f"step {step:4d}  sampled loss {float(loss.detach()):.3f}  held-out CE {ce:.3f}  top-1 {top1:.3f}"
                      f"  refresh {kind or '-'}  {time.perf_counter() - start:.1f} s", flush=True)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--context", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=64, help="rows per rank and step")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--num-sampled", type=int, default=512)
    parser.add_argument("--refresh-every", type=int, default=10)
    parser.add_argument("--refit-every", type=int, default=100)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--quick", action="store_true", help="V=1024, 60 steps: a run of a few seconds")
    parser.add_argument("--nproc", type=int, default=2, help="ranks to spawn when not started by torchrun")
    args = parser.parse_args(argv)
    if args.quick:
        args.vocab, args.tokens, args.steps, args.eval_every, args.refit_every = 1024, 30_000, 60, 20, 40
    return args


def _spawned(rank: int, world: int, store: str, args) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world, timeout=timedelta(seconds=120))
    try:
        train(args)
    finally:
        dist.destroy_process_group()


def main(argv=None) -> None:
    args = parse_args(argv)
    if "RANK" in os.environ:  # started by torchrun
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend, timeout=timedelta(seconds=120))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // dist.get_world_size()))
        try:
            train(args)
        finally:
            dist.destroy_process_group()
    else:
        with tempfile.TemporaryDirectory() as tmp:
            mp.spawn(_spawned, args=(args.nproc, os.path.join(tmp, "store"), args), nprocs=args.nproc)


if __name__ == "__main__":
    main()
