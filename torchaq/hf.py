"""Hugging Face models with a quantized output layer that behaves like the dense one everywhere.

    model = AutoModelForCausalLM.from_pretrained(...)
    torchaq.hf.quantize_lm_head(model, queries=hidden_states)      # returns the model
    model.generate(input_ids, max_new_tokens=20)                      # greedy: fast steps
    model(input_ids, labels=labels).loss                              # exact, train and eval
    model.save_pretrained(path)                                       # safetensors, tied or not
    model = torchaq.hf.from_pretrained(path)                          # no refit

**What the head returns.** :class:`QuantizedLMHead` is a :class:`torchaq.QuantizedSoftmax` whose
``forward`` is the ``nn.Linear`` it replaced: ``F.linear(h, weight, bias)``, in the model's dtype,
in ``train()`` and ``eval()`` alike. Every logit, loss (``labels`` with ``-100`` included),
perplexity, beam search, sampling and ``output_scores`` / ``output_logits`` is therefore the dense
model's, bit for bit -- there is no placeholder anywhere a user can see.

**Where it is fast, and why there.** The design question is how ``generate`` can use the LUT scan
when HF's decoding loop wants a ``(B, V)`` tensor per step. ``quantize_lm_head`` installs
:func:`generate` as the model's ``generate`` (an instance attribute, the way HF's own
``custom_generate`` hub loading installs one). It serves a call fast only when every consumer
of the step's scores is known and needs just the top of the distribution: greedy decoding
(``do_sample=False``, ``num_beams=1``), no ``output_scores`` / ``output_logits``, no user logits
processor, and only built-in processors that *lower* scores (``repetition_penalty >= 1``,
``no_repeat_ngram_size``, ``bad_words_ids``, ``min_length`` / ``min_new_tokens``,
``suppress_tokens``, ``begin_suppress_tokens``, ``remove_invalid_values``). Inside such a call the
head scores each step's last position by the LUT scan and the exact re-score of its candidates
and fills the other classes with ``-inf``; only HF's argmax and those processors see that tensor.
Where timing shows the dense matmul faster than the scan (large batches, fast bf16 matmuls), a
fast step returns the dense logits instead (``fast_step="auto"``, the default, on CPU).
Because they only lower scores, the argmax over the candidates is the argmax over all classes
whenever the best processed candidate stays at or above the lowest candidate's raw logit; a
last processor (:class:`FastStepGuard`) checks exactly that per step, and if it ever fails the
whole call is re-run on the exact path (a ``streamer`` then receives the tokens of the
re-run after those of the abandoned fast run). Greedy tokens then equal the dense model's whenever the
scan's candidates hold the true top classes (the layer's recall; ``guarantee="bound"`` in
:func:`quantize_lm_head` makes that provable at the cost of a float LUT pass). Sampling, beam
search and everything else run the exact logits: ``do_sample=True`` draws from exactly the dense
distribution. The fast path needs no ``eval()``.

**Saving.** The head's parameters keep the keys of the ``nn.Linear`` (``lm_head.weight``, shared
with a tied embedding, so HF's tied-weight handling applies), and its index is buffers beside
them: ``lm_head.packed_codes``, ``side_rows``, ``residual_norms``, ``error_scales``, ``quantizer.codebooks`` and
``quantizer._extra_state`` (an int64 tensor: safetensors stores tensors only). The layer's
options go into ``config.torchaq_lm_head``. A checkpoint opened without torchaq is a dense
model with a few unexpected keys; :func:`from_pretrained` rebuilds the head from the saved codes.
"""
from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import time
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torchaq.layer.candidates import default_candidates
from torchaq.layer.faster_path import FasterPath
from torchaq.layer.softmax import QuantizedSoftmax

CONFIG_KEY = "torchaq_lm_head"
# generation options that may be set (to a value that only lowers scores) on the fast path
LOWERING_OPTIONS = ("no_repeat_ngram_size", "bad_words_ids", "min_length", "min_new_tokens", "suppress_tokens",
                    "begin_suppress_tokens", "remove_invalid_values")
# options whose processors may raise a score, re-normalise, or need the full distribution: any of
# these set (true, or not None / 0) sends the call to the exact path
EXACT_FLAGS = ("do_sample", "output_scores", "output_logits", "renormalize_logits")
EXACT_OPTIONS = ("sequence_bias", "encoder_no_repeat_ngram_size", "exponential_decay_length_penalty",
                 "watermarking_config", "penalty_alpha", "dola_layers", "prompt_lookup_num_tokens",
                 "assistant_early_exit")
EXACT_TOKEN_OPTIONS = ("forced_bos_token_id", "forced_eos_token_id")


def bit_view(t: Tensor) -> Tensor:
    """``t`` viewed as the signed integers of its element size. A scatter of float values copies bits,
    so it may go through the integer view, and for bfloat16 it must: torch's CPU ``scatter_`` on a
    bfloat16 destination (2.13) costs in proportion to the whole destination, ``B V``, not to the
    ``B C`` entries it writes, a large part of a bf16 fast step at batch 32."""
    return t.view({1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


class ExactStepNeeded(Exception):
    """Raised by :class:`FastStepGuard` when a fast step cannot be shown to equal the dense one."""


class QuantizedLMHead(QuantizedSoftmax):
    """A :class:`torchaq.QuantizedSoftmax` used as a model's ``lm_head`` (module docstring).

    ``forward`` returns the exact dense logits, except inside :meth:`fast_steps` (entered only by
    :func:`generate`), where a step is served by one of two paths:

    * ``"scan"``: the candidates' logits in the model's dtype and ``-inf`` elsewhere, recording each
      row's lowest candidate logit in :attr:`step_floor` and the candidates in :attr:`step_classes`;
    * ``"dense"``: the dense logits themselves (:attr:`step_exact` is then True).

    With the option ``fast_step="auto"`` (the default) on CPU, the first steps of every (rows,
    dtype, threads) key time both paths and the faster one serves the rest
    (:class:`torchaq.layer.faster_path.FasterPath`): the scan costs ``B V M`` look-ups and the matmul
    ``B V d`` multiply-adds, and on a CPU with fast bf16 matmuls the dense head can win at large
    batches. ``fast_step="scan"`` (and any other device) always scans. :attr:`step_paths` holds the
    timings and choices.
    """

    #: options the layer was built with (saved to ``config.torchaq_lm_head``)
    options: dict = {}

    def forward(self, h: Tensor) -> Tensor:
        if not self.__dict__.get("fast", False):
            return F.linear(h, self.weight, self.bias)
        with torch.no_grad():
            key = self._step_key(h)
            if key is None:
                return self._scan_step(h)
            path = self.step_paths.next_path(key)
            start = time.perf_counter()
            out = self._dense_step(h) if path == "dense" else self._scan_step(h)
            self.step_paths.record(key, path, time.perf_counter() - start)
            return out

    @property
    def step_paths(self) -> FasterPath:
        """The per-key timings and choices between the ``"scan"`` and ``"dense"`` fast steps (class docstring).
        They describe this machine: a pickled or copied head starts without them."""
        paths = self.__dict__.get("step_path_choice")
        if paths is None:
            paths = self.__dict__["step_path_choice"] = FasterPath(("scan", "dense"))
        return paths

    def __getstate__(self):
        state = dict(super().__getstate__())
        state.pop("step_path_choice", None)  # timings of this machine, not of the one that loads it
        return state

    def _step_key(self, h: Tensor) -> Optional[tuple]:
        """The key a fast step is timed under, or None where it always scans (``fast_step="scan"``,
        off CPU, traced)."""
        if self.options.get("fast_step", "auto") != "auto" or h.device.type != "cpu" or torch.compiler.is_compiling():
            return None
        return (h.numel() // self.dim, h.dtype, torch.get_num_threads(), self.__dict__.get("guarantee"))

    def _dense_step(self, h: Tensor) -> Tensor:
        """A fast step served by the dense logits (complete: the guard has nothing to check)."""
        self.__dict__.update(step_exact=True, step_floor=None, step_classes=None)
        return F.linear(h, self.weight, self.bias)

    def _scan_step(self, h: Tensor) -> Tensor:
        """A fast step served by the scan and the exact logits of its candidates (``-inf`` elsewhere)."""
        self.__dict__["step_exact"] = False
        flat = h.reshape(-1, self.dim)
        candidates = self.candidates or min(default_candidates(1, self.num_classes), self.num_classes)
        if self.__dict__.get("guarantee") == "bound":
            logits, classes = self.topk(flat, k=candidates, candidates=candidates, guarantee="bound")
        else:
            logits, classes, _ = self.candidate_logits(flat, candidates)
        logits = logits.to(h.dtype)  # the dense layer's rounding
        out = self._step_scores(flat.shape[0], h.dtype, h.device, classes)
        bit_view(out).scatter_(1, classes, bit_view(logits))
        self.__dict__["step_floor"] = logits.float().min(dim=1).values.reshape(h.shape[:-1])[..., -1]
        self.__dict__["step_classes"] = classes.reshape(h.shape[:-1] + classes.shape[-1:])[..., -1, :]
        return out.reshape(h.shape[:-1] + (self.num_classes,))

    def _step_scores(self, rows: int, dtype: torch.dtype, device: torch.device, classes: Tensor) -> Tensor:
        """The ``(rows, V)`` ``-inf`` tensor a fast step scatters its candidates into.

        One tensor serves every step of a :meth:`fast_steps` block: a fresh ``(B, V)`` allocation is
        page-faulted in and filled at every step (``B V`` elements written per token), while
        resetting the previous step's entries writes ``B C`` (``C`` candidates). Only HF's decoding loop
        sees it: it copies the last position's scores before its processors run, and even one that
        wrote into this tensor could only lower scores (the fast path admits no other processor), so an
        entry outside the candidates stays ``-inf``. The block's end frees it.
        """
        kept = self.__dict__.get("step_scores")
        if kept is not None and kept[0].shape == (rows, self.num_classes) and kept[0].dtype == dtype \
                and kept[0].device == device:
            out, previous = kept
            bit_view(out).scatter_(1, previous, bit_view(out.new_full(previous.shape, -math.inf)))
        else:
            out = torch.full((rows, self.num_classes), -math.inf, dtype=dtype, device=device)
        self.__dict__["step_scores"] = (out, classes)
        return out

    @contextlib.contextmanager
    def fast_steps(self, guarantee: Optional[str] = None):
        """Within this block ``forward`` serves generation steps from the index (see the class docstring)."""
        self.__dict__["fast"], self.__dict__["guarantee"] = True, guarantee
        try:
            yield self
        finally:
            self.__dict__["fast"] = False
            self.__dict__.pop("step_floor", None)
            self.__dict__.pop("step_classes", None)
            self.__dict__.pop("step_exact", None)
            self.__dict__.pop("step_scores", None)

    @property
    def step_floor(self) -> Optional[Tensor]:
        """Per sequence, the lowest logit among the last fast step's candidates (None outside :meth:`fast_steps`)."""
        return self.__dict__.get("step_floor")

    @property
    def step_classes(self) -> Optional[Tensor]:
        """Per sequence, the last fast step's candidate classes, ``(B, C)`` (None outside :meth:`fast_steps`)."""
        return self.__dict__.get("step_classes")

    @property
    def step_exact(self) -> bool:
        """Whether the last fast step returned the dense logits (the ``"dense"`` path)."""
        return bool(self.__dict__.get("step_exact", False))


class FastStepGuard:
    """The last logits processor of a fast ``generate`` call: checks that each step's argmax is the dense one.

    The processors before it only lower scores, so a class outside the candidates scores at most
    its raw logit, which is at most the lowest candidate's (:attr:`QuantizedLMHead.step_floor`). If
    some row's best processed score is below that floor, a non-candidate might win: the guard raises
    :class:`ExactStepNeeded` and :func:`generate` re-runs the call on the exact path.

    The best processed score is read at the candidates only: ``B C`` reads per step instead of a
    pass over all ``B V`` scores, whose cost grows with the vocabulary. Every other class
    entered as ``-inf`` and a lowering processor keeps it at ``-inf`` (``remove_invalid_values`` makes
    it the dtype's lowest finite value, still below any candidate's logit), so the maximum over the
    candidates passes the check exactly when the maximum over all classes does.
    """

    def __init__(self, head: QuantizedLMHead):
        self.head = head

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        if self.head.step_exact:  # the dense logits: every class was scored, the argmax is the dense one
            return scores
        floor, classes = self.head.step_floor, self.head.step_classes
        shown = floor is not None and classes is not None and classes.shape[0] == scores.shape[0]
        if shown:
            best = scores.gather(-1, classes.to(scores.device)).max(dim=-1).values
            shown = bool((best >= floor.to(scores.device, scores.dtype)).all())
        if not shown:
            raise ExactStepNeeded("a fast generation step could not be shown to equal the dense one")
        return scores


def fast_path_allowed(model: nn.Module, args: tuple, kwargs: dict) -> bool:
    """Whether a ``generate(*args, **kwargs)`` call only consumes the argmax of lowered scores (module docstring)."""
    if len(args) > 1 or any(kwargs.get(k) is not None for k in (
            "logits_processor", "prefix_allowed_tokens_fn", "assistant_model", "negative_prompt_ids", "custom_generate",
            "synced_gpus")):
        return False
    config = kwargs.get("generation_config") or getattr(model, "generation_config", None)
    if config is None:
        return False
    config = config.__class__.from_dict(config.to_dict())
    config.update(**{k: v for k, v in kwargs.items() if k != "generation_config"})
    if (config.num_beams or 1) != 1 or (config.num_return_sequences or 1) != 1:
        return False
    if any(getattr(config, k, None) for k in EXACT_FLAGS + EXACT_OPTIONS):
        return False
    if any(getattr(config, k, None) is not None for k in EXACT_TOKEN_OPTIONS):
        return False
    if getattr(config, "guidance_scale", None) not in (None, 1, 1.0):
        return False
    if getattr(config, "encoder_repetition_penalty", None) not in (None, 1, 1.0):
        return False
    return config.repetition_penalty is None or config.repetition_penalty >= 1.0


def generate(model: nn.Module, *args, **kwargs):
    """``model.generate`` with fast greedy steps (installed by :func:`quantize_lm_head`; module docstring).

    Same arguments and results as ``transformers.GenerationMixin.generate``. A call that
    :func:`fast_path_allowed` accepts runs inside :meth:`QuantizedLMHead.fast_steps` with a
    :class:`FastStepGuard`; all other calls, and a guarded call whose guard fails, run the exact path.
    """
    dense_generate = type(model).generate
    head = model.get_output_embeddings()
    if not isinstance(head, QuantizedLMHead) or not fast_path_allowed(model, args, kwargs):
        return dense_generate(model, *args, **kwargs)
    from transformers import LogitsProcessorList

    fast_kwargs = dict(kwargs, logits_processor=LogitsProcessorList([FastStepGuard(head)]))
    try:
        with head.fast_steps(head.options.get("guarantee")):
            return dense_generate(model, *args, **fast_kwargs)
    except ExactStepNeeded:
        return dense_generate(model, *args, **kwargs)


def _install(model: nn.Module, head: QuantizedLMHead, options: dict) -> None:
    head.options = dict(options)
    model.set_output_embeddings(head)
    model.generate = functools.partial(generate, model)
    if getattr(model, "config", None) is not None:
        setattr(model.config, CONFIG_KEY, {k: v for k, v in options.items() if k != "queries"})


def quantize_lm_head(model: nn.Module, candidates: Optional[int] = None, guarantee: Optional[str] = None,
                     fast_step: str = "auto", **layer_kwargs) -> nn.Module:
    """Replace a Hugging Face model's output ``nn.Linear`` by a :class:`QuantizedLMHead`; returns the model.

    The head shares the old layer's parameters (a tied embedding stays tied) and keeps their
    state-dict keys. ``layer_kwargs`` go to :class:`torchaq.QuantizedSoftmax` (``num_subspaces``,
    ``bits``, ``queries``, ``fit``, ...); ``candidates`` is the number re-scored per fast step;
    ``guarantee="bound"`` makes each fast greedy step provably exact (a float LUT pass per step);
    ``fast_step="auto"`` lets a fast step on CPU run the dense matmul where timing shows it faster
    than the scan, ``"scan"`` always scans (:class:`QuantizedLMHead`).
    """
    if guarantee not in (None, "bound"):
        raise ValueError(f'guarantee must be None or "bound", got {guarantee!r}')
    if fast_step not in ("auto", "scan"):
        raise ValueError(f'fast_step must be "auto" or "scan", got {fast_step!r}')
    linear = model.get_output_embeddings()
    if isinstance(linear, QuantizedLMHead):
        raise TypeError("the model's lm_head is already a torchaq QuantizedLMHead")
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"model.get_output_embeddings() must be an nn.Linear, got {type(linear).__name__}")
    options = dict(layer_kwargs, candidates=candidates, guarantee=guarantee, fast_step=fast_step)
    head = QuantizedLMHead(linear.weight, bias=linear.bias, candidates=candidates,
                           **{k: v for k, v in layer_kwargs.items()})
    _install(model, head, options)
    return model


def _head_prefix(model: nn.Module, head: nn.Module) -> str:
    for name, module in model.named_modules():
        if module is head:
            return name + "."
    raise ValueError("the output embeddings are not a submodule of the model")


def _saved_tensors(path: str, prefix: str) -> dict:
    """The tensors under ``prefix`` in a ``save_pretrained`` folder's safetensors file(s)."""
    from safetensors import safe_open

    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    out = {}
    for name in files:
        with safe_open(os.path.join(path, name), framework="pt") as f:
            for key in f.keys():
                if key.startswith(prefix):
                    out[key[len(prefix):]] = f.get_tensor(key)
    return out


def from_pretrained(path: str, model_class=None, **kwargs) -> nn.Module:
    """Load a model saved (``save_pretrained``) with a quantized head: dense weights by HF, the head
    rebuilt from its saved codes, codebooks and side list (no refit). ``model_class`` defaults to
    ``transformers.AutoModelForCausalLM``; ``kwargs`` go to its ``from_pretrained``."""
    if model_class is None:
        from transformers import AutoModelForCausalLM as model_class
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the index keys are "unexpected" to the dense class: expected here
    try:
        model = model_class.from_pretrained(path, **kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)
    options = getattr(model.config, CONFIG_KEY, None)
    if not isinstance(options, dict):
        raise ValueError(f"{path} was not saved with a torchaq quantized head (config has no {CONFIG_KEY})")
    linear = model.get_output_embeddings()
    prefix = _head_prefix(model, linear)
    saved = _saved_tensors(path, prefix)
    layer_kwargs = {k: v for k, v in options.items()
                    if k not in ("candidates", "guarantee", "fast_step", "fit", "progress")}
    quantize_lm_head(model, options.get("candidates"), options.get("guarantee"), options.get("fast_step", "auto"),
                     fit=False, progress=False, **layer_kwargs)
    head = model.get_output_embeddings()
    state = {k: v for k, v in saved.items() if k not in ("weight", "bias")}
    state["weight"] = head.weight.detach()
    if head.bias is not None:
        state["bias"] = head.bias.detach()
    head.load_state_dict(state)
    return model
