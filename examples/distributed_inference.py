"""Vocabulary-parallel inference: the output layer's rows split over ranks, top-k / sampling merged.

    torchrun --nproc-per-node 2 examples/distributed_inference.py      # CPU, gloo

Every rank holds one contiguous slice of the vocabulary (uneven slices are fine), the hidden
states are replicated; the ranks share one set of codebooks, each scans its own slice, and only
per-row candidate scores and short (value, id) lists cross the wire. Every rank prints the same
answer; rank 0 checks it against the dense layer and, bit for bit, the single-process
QuantizedSoftmax.

    torchrun --nproc-per-node 2 examples/distributed_inference.py --quick   # V = 4,001
"""
import argparse
import os
from datetime import timedelta

import torch
import torch.distributed as dist

import torchaq
from torchaq.distributed import VocabParallelQuantizedSoftmax

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--quick", action="store_true", help="a smaller vocabulary (a smoke test)")
args = parser.parse_args()

backend = "nccl" if torch.cuda.is_available() else "gloo"
dist.init_process_group(backend, timeout=timedelta(minutes=5))
rank, world = dist.get_rank(), dist.get_world_size()
device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}") if backend == "nccl" else torch.device("cpu")
if backend == "nccl":
    torch.cuda.set_device(device)
torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))

# the full output layer, generated alike on every rank (a sharded checkpoint would be loaded instead)
gen = torch.Generator().manual_seed(0)
vocab, dim = (4_001, 64) if args.quick else (20_001, 128)
centres = torch.randn(200, dim, generator=gen)
weight = centres[torch.randint(0, 200, (vocab,), generator=gen)] + 0.3 * torch.randn(vocab, dim, generator=gen)
hidden = 0.5 * (weight[torch.randint(0, vocab, (64,), generator=gen)] + 0.3 * torch.randn(64, dim, generator=gen))

# this rank's contiguous slice: the first vocab % world ranks get one more row
sizes = [vocab // world + (r < vocab % world) for r in range(world)]
start = sum(sizes[:rank])
shard = weight[start : start + sizes[rank]].to(device)
layer = VocabParallelQuantizedSoftmax(shard, num_subspaces=dim // 2, num_classes=vocab, progress=False).eval()
print(f"rank {rank}: {layer.extra_repr()}", flush=True)

h = hidden.to(device)
values, classes = layer.topk(h, k=10)             # global ids, exact logits, the same on every rank
logp, _ = layer.log_softmax_topk(h, k=10)         # bitwise the single-process log-probabilities
tokens = layer.sample(h, top_k=50, temperature=0.8, generator=torch.Generator().manual_seed(0))
print(f"rank {rank}: top-3 of row 0 {classes[0, :3].tolist()}, sampled {tokens[:6].tolist()}", flush=True)

if rank == 0:
    dense = h.cpu() @ weight.T
    exact = dense.topk(10).indices
    recall = (exact.unsqueeze(2) == classes.cpu().unsqueeze(1)).any(2).float().mean()
    logp_err = (logp.cpu() - torch.log_softmax(dense, 1).gather(1, classes.cpu())).abs().max()
    single = torchaq.QuantizedSoftmax(weight, num_subspaces=dim // 2, progress=False)
    same = torch.equal(single.topk(h.cpu(), k=10)[1], classes.cpu()) and torch.equal(
        single.log_softmax_topk(h.cpu(), k=10)[0], logp.cpu())
    print(
        f"world size {world}: recall@10 vs the dense layer {recall:.4f}; max |log p error| {logp_err:.2e}; "
        f"bitwise the single-process top-10 and log-probabilities: {same}; full logits would be "
        f"{h.shape[0] * vocab * 4:,} bytes per call"
    )
dist.destroy_process_group()
