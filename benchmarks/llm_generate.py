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
zeros, costing nothing -- the limit no head can beat. The quantized head runs its default
``fast_step="auto"``: its first steps at each batch and thread count time the LUT scan and the
dense matmul, and the faster serves the rest (the "torchaq fast step" column; those first steps
are in the medians).

Greedy decoding with the KV cache, prompts of 16 random tokens, ``min_new_tokens =
max_new_tokens`` (no early stop). Decode tokens/s = ``B / median step time``, the step time being
the gap between consecutive calls of the head (one per step: the prefill drops out), median over
the ``N - 1`` steps of ``reps`` interleaved repeats (robust to the bursts of a shared machine);
1-thread rows use the process's CPU time (``time.process_time``: other processes cannot inflate
it), 2-thread rows wall clock. The head's share of a step is the median time inside the head
module over the median step time.
Identical tokens: token-level agreement of the quantized head's greedy continuation with the
dense one, and the share of sequences identical end to end.
"""
from __future__ import annotations

import gc
import statistics
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


class TimedHead:
    """Records ``(start, end)`` of every forward call of a head module on ``clock`` (forward hooks).

    Each decoding step calls the head once, so the gaps between consecutive call starts are the
    step times (body + head) and ``end - start`` the head's own time, prefill excluded. Hooks, not
    a wrapper module: the model must still see the head itself (``torchaq.hf``'s ``generate``
    takes its fast path only when ``get_output_embeddings()`` is the quantized head).
    """

    def __init__(self, head: nn.Module):
        self.module = head
        self.calls: list = []
        self.clock = time.perf_counter
        self._start = None
        head.register_forward_pre_hook(self._pre)
        head.register_forward_hook(self._post)

    def _sync(self, h):
        if h.is_cuda:
            torch.cuda.synchronize()

    def _pre(self, module, args):
        self._sync(args[0])
        self._start = self.clock()

    def _post(self, module, args, out):
        self._sync(args[0])
        self.calls.append((self._start, self.clock()))

    def steps(self):
        """``(step seconds, head seconds)`` of the decode steps recorded since the last reset."""
        starts = [c[0] for c in self.calls]
        return ([b - a for a, b in zip(starts, starts[1:])], [e - s for s, e in self.calls[1:]])


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
def greedy_generate(model, ids, new_tokens):
    return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, do_sample=False, use_cache=True)


@torch.no_grad()
def run_model(name, dtype, batches, threads, new_tokens, reps, fit_threads=2, device="cpu", ratio=2):
    """Rows of the generate table for one model and dtype (one model in memory at a time)."""
    model = build_model(name, dtype).to(device)
    dense = model.lm_head
    v = model.config.vocab_size
    torch.set_num_threads(fit_threads)
    calib = calibration_states(model)
    t0 = time.perf_counter()
    # ratio 2 is the default layer (M = d / 2); a larger ratio is the fewer-bits-per-class lever
    kw = {} if ratio == 2 else {"num_subspaces": model.config.hidden_size // ratio}
    quant = torchaq.hf.quantize_lm_head(model, queries=calib, progress=False, **kw).get_output_embeddings()
    fit_s = time.perf_counter() - t0
    model.eval()
    heads = {"dense": TimedHead(dense), "torchaq": TimedHead(quant), "zero": TimedHead(ZeroHead(v))}
    print(f"  {name} {dtype}: quantize_lm_head fit {fit_s:.1f} s ({fit_threads} threads)", flush=True)
    rows = []
    gen = torch.Generator().manual_seed(0)
    for th in threads:
        torch.set_num_threads(th)
        # 1 thread: CPU time of the process (other processes on a shared machine cannot inflate it)
        clock = time.process_time if th == 1 and device == "cpu" else time.perf_counter
        for head in heads.values():
            head.clock = clock
        for b in batches:
            ids = torch.randint(3, v, (b, 16), generator=gen).to(device)
            step_s = {k: [] for k in heads}
            head_s = {k: [] for k in heads}
            outs = {}
            for _ in range(reps):
                for key, head in heads.items():
                    model.lm_head = head.module
                    head.calls = []
                    outs[key] = greedy_generate(model, ids, new_tokens)[:, ids.shape[1]:]
                    st, hs = head.steps()
                    step_s[key] += st
                    head_s[key] += hs
            med = {k: statistics.median(step_s[k]) for k in heads}
            tps = {k: b / med[k] for k in heads}
            same = (outs["torchaq"] == outs["dense"]).float()
            row = dict(model=name if ratio == 2 else f"{name} (M = d/{ratio})", dtype=str(dtype).removeprefix("torch."), threads=th, batch=b,
                       dense=tps["dense"], torchaq=tps["torchaq"], zero=tps["zero"],
                       share_dense=statistics.median(head_s["dense"]) / med["dense"],
                       share_ours=statistics.median(head_s["torchaq"]) / med["torchaq"],
                       agree=same.mean().item(), seq_same=same.all(dim=1).float().mean().item(), fit_s=fit_s,
                       path=quant.step_paths.choice((b, dtype, th, None)) or "timing")
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
                     f"{100 * r['share_ours']:.0f}%", r["path"], f"{r['agree']:.3f} / {r['seq_same']:.2f}"])
    return markdown_table(
        ["model", "dtype", "threads", "batch", "dense tok/s", "torchaq tok/s", "zero-head (limit) tok/s",
         "torchaq / dense", "limit / dense", "torchaq / limit", "head share of step, dense",
         "head share, torchaq", "torchaq fast step", "identical greedy tokens / sequences"], body)
