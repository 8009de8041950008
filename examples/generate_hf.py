"""Generation with Hugging Face transformers and a torchaq output layer: speed and agreement.

Builds a GPT-2-small-sized model from a config (V = 50,257, d = 768, 12 layers, 12 heads; no
download, so its weights are random: swap in ``GPT2LMHeadModel.from_pretrained("gpt2")`` for the
trained one), replaces its ``lm_head`` with ``torchaq.hf.quantize_lm_head`` (the default layer:
d / 2 = 384 subspaces of 4 bits, fitted with one alternation to keep the example short), and prints for batch 1 and 16, greedy decoding with the KV
cache:

* generated tokens/s of the dense model and of the model with the quantized head, and the share
  of each decoding step spent in the output layer (timed with forward hooks on ``lm_head``);
* agreement, measured on the dense model's own continuations (the same hidden states for both
  heads): how often the quantized head's top-1 is the dense top-1, its recall of the dense top-50,
  the entropy of the dense next-token distribution, and how many greedy continuations of the two
  models are identical token for token.

The values the quantized head returns are always exact logits; only which classes it returns is
approximate. Random weights make the next-token distribution almost uniform (entropy close to
log V), so the top-50 logits are separated by gaps of the order of the 4-bit code error: that is
the hardest case for agreement, and the printed recall@50 is measured on it. A greedy continuation
stays identical as long as every step's top-1 agrees; after a first differing token the two
sequences go separate ways. On a trained vocabulary with real hidden states the benchmark
``benchmarks/layer.py`` measures recall@10 of the same layer (``benchmarks/results/layer.txt``).

    pip install transformers && python examples/generate_hf.py        # a few minutes (fit + 4 runs)
    python examples/generate_hf.py --quick    # a 2-layer model with V = 8,000: a smoke test

``quantize_lm_head`` returns the model; its head returns the exact dense logits everywhere (loss,
scores, sampling, beam search), and greedy ``generate`` calls are served from the index
(``torchaq.hf`` explains when and why). No ``eval()`` is needed for the fast path.
"""
import argparse
import copy
import math
import os
import time

import torch
import transformers

import torchaq

VOCAB, DIM = 50_257, 768


class HeadTimer:
    """Wall-clock seconds spent inside ``module.forward`` (forward pre- and post-hooks)."""

    def __init__(self, module):
        self.seconds, self._start = 0.0, 0.0
        module.register_forward_pre_hook(self._pre)
        module.register_forward_hook(self._post)

    def _pre(self, *_):
        self._start = time.perf_counter()

    def _post(self, *_):
        self.seconds += time.perf_counter() - self._start


def tokens_per_second(model, timer, prompt, new_tokens):
    """Greedy ``generate`` of exactly ``new_tokens`` per row: (tokens/s, share of time in lm_head, output)."""
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                  attention_mask=torch.ones_like(prompt), pad_token_id=model.config.eos_token_id)
    model.generate(prompt[:, :4], **{**kwargs, "attention_mask": torch.ones_like(prompt[:, :4]),
                                     "max_new_tokens": 2, "min_new_tokens": 2})  # warm-up
    timer.seconds = 0.0
    start = time.perf_counter()
    out = model.generate(prompt, **kwargs)
    total = time.perf_counter() - start
    return prompt.shape[0] * new_tokens / total, timer.seconds / total, out


@torch.no_grad()
def agreement(dense, head, sequences, prompt_len):
    """Top-1 agreement, recall@50 and dense entropy over the steps of the dense continuations."""
    hidden = dense.transformer(sequences[:, :-1]).last_hidden_state[:, prompt_len - 1 :].reshape(-1, DIM)
    logits = hidden @ dense.lm_head.weight.T
    true = logits.topk(50, dim=1).indices
    _, idx = head.topk(hidden, k=50)
    top1 = (idx[:, 0] == true[:, 0]).float().mean().item()
    recall50 = (true.unsqueeze(2) == idx.unsqueeze(1)).any(2).float().mean().item()
    entropy = torch.distributions.Categorical(logits=logits).entropy().mean().item()
    return top1, recall50, entropy


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: steadier timings)")
    parser.add_argument("--quick", action="store_true", help="a 2-layer model, V = 8,000, 8 new tokens (a smoke test)")
    args = parser.parse_args()
    global VOCAB, DIM
    layers = 12
    if args.quick:
        VOCAB, DIM, layers, args.new_tokens = 8_000, 128, 2, 8
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    transformers.logging.set_verbosity_error()  # generate()'s notes on generation config defaults

    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=1024, n_embd=DIM, n_layer=layers, n_head=12 if DIM % 12 == 0 else 8)
    dense = transformers.GPT2LMHeadModel(config).eval()
    fast = copy.deepcopy(dense)
    start = time.perf_counter()
    head = torchaq.hf.quantize_lm_head(fast, fit_iters=1, progress=False).get_output_embeddings()
    print(f"GPT-2-small-sized model (V = {VOCAB:,}, d = {DIM}, random weights), {args.threads} thread(s); "
          f"quantized head fitted in {time.perf_counter() - start:.0f} s: {head.extra_repr()}")
    dense_timer, fast_timer = HeadTimer(dense.lm_head), HeadTimer(head)

    print(f"\ngreedy decoding, {args.new_tokens} new tokens after a {args.prompt_len}-token prompt, KV cache")
    print(f"{'batch':>5} | {'dense tok/s':>11} | {'lm_head share':>13} | {'torchaq tok/s':>13} | "
          f"{'lm_head share':>13} | {'speed-up':>8} | {'top-1 agree':>11} | {'recall@50':>9} | {'entropy':>7} | "
          "greedy identical")
    for batch in (1, 16):
        prompt = torch.randint(0, VOCAB, (batch, args.prompt_len), generator=torch.Generator().manual_seed(batch))
        d_tps, d_share, d_out = tokens_per_second(dense, dense_timer, prompt, args.new_tokens)
        f_tps, f_share, f_out = tokens_per_second(fast, fast_timer, prompt, args.new_tokens)
        top1, recall50, entropy = agreement(dense, head, d_out, args.prompt_len)
        same = int((f_out == d_out).all(1).sum())
        print(f"{batch:>5} | {d_tps:>11.1f} | {d_share:>12.0%} | {f_tps:>13.1f} | {f_share:>12.0%} | "
              f"{f_tps / d_tps:>7.2f}x | {top1:>11.3f} | {recall50:>9.3f} | {entropy:>7.2f} | {same:>2} of {batch}")
    print(f"\ntok/s: wall clock on this machine (its load average is printed below); lm_head share: time in the "
          f"output layer / time in generate(). entropy in nats (log V = {math.log(VOCAB):.2f}): random weights give "
          "near-uniform next-token distributions, the hardest case for agreement (see the docstring). "
          f"load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
