"""Generation with Hugging Face transformers and a torchaq output layer.

Builds a small GPT-2 from a config (no download; swap in `from_pretrained` for a real one),
replaces its `lm_head` with `torchaq.hf.quantize_lm_head`, and compares `generate()` with the
dense model, greedy and with top-k sampling.

    pip install transformers && python examples/generate_hf.py
"""
import copy

import torch
import transformers

import torchaq

torch.manual_seed(0)
config = transformers.GPT2Config(vocab_size=32_000, n_positions=128, n_embd=128, n_layer=2, n_head=4)
dense = transformers.GPT2LMHeadModel(config).eval()
fast = copy.deepcopy(dense)

# calibrate on the model's own hidden states for some prompts
with torch.no_grad():
    hidden = fast.transformer(torch.randint(0, 32_000, (16, 64))).last_hidden_state.reshape(-1, 128)
torchaq.hf.quantize_lm_head(fast, num_subspaces=64, queries=hidden)

prompt = torch.randint(0, 32_000, (2, 8))
greedy = dict(max_new_tokens=20, do_sample=False, pad_token_id=0)
print("greedy identical:", torch.equal(dense.generate(prompt, **greedy), fast.generate(prompt, **greedy)))
sampled = dict(max_new_tokens=20, do_sample=True, top_k=50, pad_token_id=0)
torch.manual_seed(1)
a = dense.generate(prompt, **sampled)
torch.manual_seed(1)
b = fast.generate(prompt, **sampled)
print("top-k sampling identical with the same seed:", torch.equal(a, b))
