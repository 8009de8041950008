"""Drop-in inference: replace an nn.Linear output layer and serve top-k / sampling from it.

    python examples/drop_in_inference.py            # V = 20,000, d = 128 (seconds)
    python examples/drop_in_inference.py --quick    # V = 4,000, d = 64
"""
import argparse

import torch
from torch import nn

import torchaq

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--quick", action="store_true", help="a smaller vocabulary (a smoke test)")
args = parser.parse_args()

torch.manual_seed(0)
vocab, dim = (4_000, 64) if args.quick else (20_000, 128)
# a trained model's output layer would go here; random clustered rows stand in for it
centres = torch.randn(200, dim)
head = nn.Linear(dim, vocab)
with torch.no_grad():
    head.weight.copy_(centres[torch.randint(0, 200, (vocab,))] + 0.3 * torch.randn(vocab, dim))
hidden = head.weight[torch.randint(0, vocab, (512,))].detach() + 0.3 * torch.randn(512, dim)

# fit once (calibrating the anisotropy on sample hidden states), then use like the nn.Linear
layer = torchaq.QuantizedSoftmax.from_linear(head, num_subspaces=dim // 2, queries=hidden[:256], progress=False).eval()
print(layer)

h = hidden[256:]
assert torch.allclose(layer(h), head(h))                 # exact logits, same as before
values, classes = layer.topk(h, k=10)                    # fast approximate top-10, exact values
logp, _ = layer.log_softmax_topk(h, k=10)                # their log-probabilities
entropy = layer.entropy(h)                               # softmax entropy (nats), no (B, V) tensor
tokens = layer.sample(h, top_k=50, temperature=0.8, generator=torch.Generator().manual_seed(0))

exact = head(h).topk(10).indices
recall = (exact.unsqueeze(2) == classes.unsqueeze(1)).any(2).float().mean()
print(f"recall@10 vs the dense layer: {recall:.4f}; mean entropy {entropy.mean():.2f} nats; "
      f"first sampled tokens: {tokens[:8].tolist()}")
