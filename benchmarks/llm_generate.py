"""Part 1 of ``benchmarks/llm_heads.py``: Hugging Face ``generate()`` with a dense, quantized and free head.

Models (random weights from the config: nothing is downloaded):

* ``gemma`` -- ``Gemma3ForCausalLM(Gemma3TextConfig(...))`` with the Gemma 3 270M shape: V = 262,144,
  d = 640, 18 layers, 4 heads of 256, 1 KV head, MLP 2048, sliding window 512 (5 local : 1
  global), tied embeddings; the head is 168 M of its 268 M parameters;
* ``llama`` -- ``LlamaForCausalLM(LlamaConfig(...))`` with the Llama 3 8B widths (V = 128,256,
  d = 4096, 32 heads, 8 KV heads, MLP 14,336) and a 2-layer body; embeddings tied to keep the
  fp32 model at ~3.8 GB (the head is computed the same way either way).

Heads, swapped into the same model object in turn: the dense ``nn.Linear``; the quantized head
from ``torchaq.hf.quantize_lm_head(model, queries=...)`` (default layer, calibrated on the
model's own final hidden states of random prompts, ``model.eval()``); and a head that returns
zeros, costing nothing -- the limit no head can beat.

Greedy decoding with the KV cache, prompts of 16 random tokens, ``min_new_tokens =
max_new_tokens`` (no early stop). Decode tokens/s = ``B * (N - 1) / (t(N) - t(1))`` (prefill
subtracted), best of ``reps`` interleaved repeats (the machine is shared). The head's share of a
step is the time inside the head module (wall clock around its forward) over the decode time.
Identical tokens: token-level agreement of the quantized head's greedy continuation with the
dense one, and the share of sequences identical end to end.
"""
from __future__ import annotations

import gc
import time

import torch
from torch import nn

import torchaq.hf
from benchmarks.common import markdown_table


class ZeroHead(nn.Module):
    """A head that returns zeros: what decoding costs when the head costs nothing."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.num_classes = num_classes

    def forward(self, h):
        return h.new_zeros(h.shape[:-1] + (self.num_classes,))


class TimedHead(nn.Module):
    """Wraps a head and accumulates the wall seconds spent in its forward."""

    def __init__(self, head: nn.Module):
        super().__init__()
        self.head = head
        self.seconds = 0.0

    def forward(self, h):
        if h.is_cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = self.head(h)
        if h.is_cuda:
            torch.cuda.synchronize()
        self.seconds += time.perf_counter() - t0
        return out


def build_model(name: str, dtype: torch.dtype, seed: int = 0):
    """The random-weight ``name`` model (module docstring), eval mode, in ``dtype``."""
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(seed)
    if name == "gemma":
        from transformers import Gemma3ForCausalLM, Gemma3TextConfig

        config = Gemma3TextConfig(
            vocab_size=262_144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
            num_attention_heads=4, num_key_value_heads=1, head_dim=256, sliding_window=512,
            max_position_embeddings=32_768, query_pre_attn_scalar=256, rope_theta=1_000_000.0,
            final_logit_softcapping=None, attn_logit_softcapping=None, tie_word_embeddings=True,
            attn_implementation="sdpa", eos_token_id=None, pad_token_id=0, bos_token_id=2)
        model = Gemma3ForCausalLM(config)
    elif name == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(
            vocab_size=128_256, hidden_size=4096, intermediate_size=14_336, num_hidden_layers=2,
            num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
            rope_theta=500_000.0, tie_word_embeddings=True, attn_implementation="sdpa",
            eos_token_id=None, pad_token_id=0, bos_token_id=1)
        model = LlamaForCausalLM(config)
    else:
        raise ValueError(f"model must be gemma or llama, got {name!r}")
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model.to(dtype).eval()


@torch.no_grad()
def calibration_states(model, num_prompts: int = 8, length: int = 64, seed: int = 1):
    """The model's final (normed) hidden states on random prompts: ``(num_prompts * length, d)``."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, model.config.vocab_size, (num_prompts, length), generator=gen).to(model.device)
    return model.model(input_ids=ids).last_hidden_state.reshape(-1, model.config.hidden_size)


@torch.no_grad()
def _generate(model, ids, new_tokens):
    return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, do_sample=False, use_cache=True)


@torch.no_grad()
def run_model(name, dtype, batches, threads, new_tokens, reps, fit_threads=2, device="cpu"):
    """Rows of the generate table for one model and dtype (one model in memory at a time)."""
    model = build_model(name, dtype).to(device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    dense = model.lm_head
    v = model.config.vocab_size
    torch.set_num_threads(fit_threads)
    calib = calibration_states(model)
    t0 = time.perf_counter()
    quant = torchaq.hf.quantize_lm_head(model, queries=calib, progress=False)
    fit_s = time.perf_counter() - t0
    model.eval()
    heads = {"dense": TimedHead(dense), "torchaq": TimedHead(quant), "zero": TimedHead(ZeroHead(v))}
    print(f"  {name} {dtype}: quantize_lm_head fit {fit_s:.1f} s ({fit_threads} threads)", flush=True)
    rows = []
    gen = torch.Generator().manual_seed(0)
    for th in threads:
        torch.set_num_threads(th)
        for b in batches:
            ids = torch.randint(3, v, (b, 16), generator=gen).to(device)
            best = {k: (float("inf"), 0.0) for k in heads}  # (decode s, head s in decode)
            outs = {}
            for _ in range(reps):
                for key, head in heads.items():
                    model.lm_head = head
                    head.seconds = 0.0
                    sync()
                    t = time.perf_counter()
                    _generate(model, ids, 1)
                    sync()
                    t1, h1 = time.perf_counter() - t, head.seconds
                    head.seconds = 0.0
                    t = time.perf_counter()
                    outs[key] = _generate(model, ids, new_tokens)[:, ids.shape[1]:]
                    sync()
                    tn, hn = time.perf_counter() - t, head.seconds
                    dec = max(tn - t1, 1e-9)
                    if dec < best[key][0]:
                        best[key] = (dec, max(0.0, hn - h1))
            steps = b * (new_tokens - 1)
            tps = {k: steps / best[k][0] for k in heads}
            same = (outs["torchaq"] == outs["dense"]).float()
            row = dict(model=name, dtype=str(dtype).removeprefix("torch."), threads=th, batch=b,
                       dense=tps["dense"], torchaq=tps["torchaq"], zero=tps["zero"],
                       share_dense=best["dense"][1] / best["dense"][0], share_ours=best["torchaq"][1] / best["torchaq"][0],
                       agree=same.mean().item(), seq_same=same.all(dim=1).float().mean().item(), fit_s=fit_s)
            print("   ", {k: (round(x, 3) if isinstance(x, float) else x) for k, x in row.items()}, flush=True)
            rows.append(row)
    model.lm_head = dense
    del model, dense, quant, heads, calib
    gc.collect()
    return rows


def generate_table(rows) -> str:
    body = []
    for r in rows:
        body.append([r["model"], r["dtype"], r["threads"], r["batch"], f"{r['dense']:.1f}", f"{r['torchaq']:.1f}",
                     f"{r['zero']:.1f}", f"{r['torchaq'] / r['dense']:.2f}x", f"{r['zero'] / r['dense']:.2f}x",
                     f"{100 * r['torchaq'] / r['zero']:.0f}%", f"{100 * r['share_dense']:.0f}%",
                     f"{100 * r['share_ours']:.0f}%", f"{r['agree']:.3f} / {r['seq_same']:.2f}"])
    return markdown_table(
        ["model", "dtype", "threads", "batch", "dense tok/s", "torchaq tok/s", "zero-head (limit) tok/s",
         "torchaq / dense", "limit / dense", "torchaq / limit", "head share of step, dense",
         "head share, torchaq", "identical greedy tokens / sequences"], body)
