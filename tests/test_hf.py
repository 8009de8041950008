"""Hugging Face integration: a GPT-2 with a quantized head behaves like the dense one everywhere.

Small GPT-2 configs, tied and untied, fp32 and bf16: logits and loss (train and eval, ``-100``
labels), greedy / beam / padding / repetition_penalty / logits_to_keep / sampling / output_scores
equal dense; the fast greedy path is used and its guard falls back; save_pretrained /
from_pretrained, safetensors, pickle and torch.save round trips.
"""
import copy
import io
import math
import pickle
import types
import warnings

import pytest
import torch

import torchaq
from torchaq.hf import ExactStepNeeded, FastStepGuard, QuantizedLMHead

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

V, D = 2000, 32
VARIANTS = [(True, torch.float32), (False, torch.float32), (True, torch.bfloat16), (False, torch.bfloat16)]
IDS = ["tied-fp32", "untied-fp32", "tied-bf16", "untied-bf16"]


def _build(tied: bool, dtype, **head_kwargs):
    # the scan path at every fast step (the tests below count them); the "auto" choice has its own tests
    head_kwargs.setdefault("fast_step", "scan")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=V, n_positions=64, n_embd=D, n_layer=2, n_head=2,
                                     tie_word_embeddings=tied, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    dense = transformers.GPT2LMHeadModel(config).to(dtype).eval()
    quantized = copy.deepcopy(dense)
    with torch.no_grad():
        prompts = torch.randint(0, V, (8, 32), generator=torch.Generator().manual_seed(5))
        hidden = quantized.transformer(prompts).last_hidden_state.reshape(-1, D).float()
    torchaq.hf.quantize_lm_head(quantized, num_subspaces=16, queries=hidden, progress=False, fit_iters=1, **head_kwargs)
    return dense, quantized


@pytest.fixture(scope="module", params=VARIANTS, ids=IDS)
def models(request):
    return _build(*request.param)


@pytest.fixture(scope="module")
def fp32_tied():
    return _build(True, torch.float32)


def _prompt(batch=3, length=6, seed=1):
    return torch.randint(2, V, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_head_is_swapped_shares_parameters_and_keeps_keys(models):
    dense, quantized = models
    head = quantized.get_output_embeddings()
    assert isinstance(head, QuantizedLMHead)
    assert head.in_features == D and head.out_features == V
    if quantized.config.tie_word_embeddings:
        assert head.weight is quantized.transformer.wte.weight
    keys = set(quantized.state_dict())
    assert "lm_head.weight" in keys and "lm_head.packed_codes" in keys
    assert all(torch.is_tensor(v) for v in quantized.state_dict().values())


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_logits_and_loss_equal_dense(models, mode):
    dense, quantized = models
    ids = _prompt(2, 12)
    labels = ids.clone()
    labels[:, :4] = -100
    labels[1, 8:] = -100
    for m in (dense, quantized):
        m.train(mode == "train")
    try:
        with torch.no_grad():
            torch.manual_seed(0)
            a = dense(ids, labels=labels)
            torch.manual_seed(0)
            b = quantized(ids, labels=labels)
    finally:
        dense.eval(), quantized.eval()
    assert b.logits.dtype == dense.dtype == a.logits.dtype
    assert torch.equal(a.logits, b.logits)
    assert torch.isfinite(b.loss) and torch.equal(a.loss, b.loss)


def test_loss_gradient_equals_dense(fp32_tied):
    dense, quantized = (copy.deepcopy(m).train() for m in fp32_tied)
    ids = _prompt(2, 10)
    labels = ids.clone()
    labels[0, :3] = -100
    for m in (dense, quantized):
        torch.manual_seed(0)
        m(ids, labels=labels).loss.backward()
    torch.testing.assert_close(quantized.transformer.wte.weight.grad, dense.transformer.wte.weight.grad)


def test_logits_to_keep_equals_dense(models):
    dense, quantized = models
    ids = _prompt(2, 9)
    with torch.no_grad():
        assert torch.equal(dense(ids, logits_to_keep=3).logits, quantized(ids, logits_to_keep=3).logits)
        assert torch.equal(dense(ids, logits_to_keep=1).logits, quantized(ids, logits_to_keep=1).logits)


def _count_fast_steps(head, monkeypatch):
    calls = []
    original = head.candidate_logits

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(head, "candidate_logits", counting)
    return calls


GREEDY = [
    dict(),
    dict(repetition_penalty=1.3),
    dict(no_repeat_ngram_size=2),
    dict(min_new_tokens=5, bad_words_ids=[[7], [11]]),
    dict(remove_invalid_values=True, repetition_penalty=1.3),
]


@pytest.mark.parametrize("options", GREEDY, ids=["plain", "repetition_penalty", "no_repeat_ngram", "min_new_bad_words",
                                                 "remove_invalid_values"])
def test_greedy_generation_is_fast_and_equals_dense(models, options, monkeypatch):
    dense, quantized = models
    head = quantized.get_output_embeddings()
    prompt = _prompt()
    kwargs = dict(max_new_tokens=10, do_sample=False, **options)
    expected = dense.generate(prompt, **kwargs)
    calls = _count_fast_steps(head, monkeypatch)
    got = quantized.generate(prompt, **kwargs)
    assert len(calls) == 10  # one fast step per new token
    assert torch.equal(got, expected)


def test_fast_steps_reuse_one_score_tensor_without_leftovers(fp32_tied):
    _, quantized = fp32_tied
    head = quantized.get_output_embeddings()
    gen = torch.Generator().manual_seed(5)
    h1, h2 = torch.randn(3, 1, D, generator=gen), torch.randn(3, 1, D, generator=gen)
    with head.fast_steps():
        first = head(h1)
        kept = first.clone()
        second = head(h2)
    with head.fast_steps():  # a fresh block: a fresh tensor
        fresh = head(h2)
    assert second.data_ptr() == first.data_ptr()  # one tensor for the block's steps
    assert torch.equal(second, fresh)  # the first step's candidates were reset to -inf
    assert not torch.equal(torch.isfinite(kept), torch.isfinite(fresh))  # (they differ, so a leftover would show)
    assert head.__dict__.get("step_scores") is None  # freed with the block


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_bit_view_scatter_equals_scatter(dtype):
    gen = torch.Generator().manual_seed(0)
    index = torch.stack([torch.randperm(500, generator=gen)[:30] for _ in range(4)])  # distinct, as candidates are
    src = torch.randn(4, 30, generator=gen).to(dtype)
    expected = torch.full((4, 500), float("-inf"), dtype=dtype).scatter_(1, index, src)
    got = torch.full((4, 500), float("-inf"), dtype=dtype)
    torchaq.hf.bit_view(got).scatter_(1, index, torchaq.hf.bit_view(src))
    assert torch.equal(got, expected) and got.dtype == dtype


def test_padded_batch_generation_equals_dense(models):
    dense, quantized = models
    prompt = _prompt(3, 7)
    mask = torch.ones_like(prompt)
    prompt[0, :3], mask[0, :3] = 1, 0  # left padding
    prompt[2, :1], mask[2, :1] = 1, 0
    kwargs = dict(attention_mask=mask, max_new_tokens=8, do_sample=False)
    assert torch.equal(quantized.generate(prompt, **kwargs), dense.generate(prompt, **kwargs))


def test_exact_modes_equal_dense_and_skip_the_fast_path(fp32_tied, monkeypatch):
    dense, quantized = fp32_tied
    head = quantized.get_output_embeddings()
    prompt = _prompt(2, 5)
    calls = _count_fast_steps(head, monkeypatch)
    beam = dict(max_new_tokens=6, num_beams=3, do_sample=False)
    assert torch.equal(quantized.generate(prompt, **beam), dense.generate(prompt, **beam))
    # pure sampling, top_p alone, min_p, temperature: the dense model's draws, token for token
    for options in (dict(top_k=0, temperature=0.9), dict(top_k=0, top_p=0.8), dict(top_k=0, min_p=0.05)):
        sampled = dict(max_new_tokens=8, do_sample=True, **options)
        torch.manual_seed(3)
        expected = dense.generate(prompt, **sampled)
        torch.manual_seed(3)
        assert torch.equal(quantized.generate(prompt, **sampled), expected), options  # the exact distribution
    scored = dict(max_new_tokens=4, do_sample=False, output_scores=True, output_logits=True, return_dict_in_generate=True)
    a, b = dense.generate(prompt, **scored), quantized.generate(prompt, **scored)
    assert torch.equal(a.sequences, b.sequences)
    for x, y in zip(a.scores + a.logits, b.scores + b.logits):
        assert torch.isfinite(y).all() and torch.equal(x, y)  # no -inf placeholder reaches the user
    assert calls == []


def test_guard_falls_back_to_the_exact_path(fp32_tied):
    dense, quantized = fp32_tied
    prompt = _prompt(2, 5)
    # suppressing all but a few tokens lowers every candidate to -inf: the guard must notice
    keep = [3, 500, 1500]
    kwargs = dict(max_new_tokens=4, do_sample=False, suppress_tokens=[t for t in range(V) if t not in keep])
    got = quantized.generate(prompt, **kwargs)
    assert torch.equal(got, dense.generate(prompt, **kwargs))
    assert set(got[:, 5:].flatten().tolist()) <= set(keep)
    guard = FastStepGuard(quantized.get_output_embeddings())
    with pytest.raises(ExactStepNeeded):
        guard(prompt, torch.zeros(2, V))  # no fast step recorded


def test_guard_reads_the_candidates(fp32_tied):
    _, quantized = fp32_tied
    head = quantized.get_output_embeddings()
    h = torch.randn(3, 1, D, generator=torch.Generator().manual_seed(6))
    guard = FastStepGuard(head)
    with head.fast_steps():
        scores = head(h)[:, -1, :].float()
        classes = head.step_classes
        assert classes.shape[0] == 3 and torch.isfinite(scores.gather(-1, classes)).all()
        assert int(torch.isfinite(scores).sum()) == classes.numel()  # every other class is -inf
        assert guard(None, scores) is scores
        # remove_invalid_values turns the -inf into the lowest finite float: still below every candidate
        assert guard(None, torch.nan_to_num(scores)) is not None
        with pytest.raises(ExactStepNeeded):  # every candidate lowered below the floor
            guard(None, scores - 1e3)
        with pytest.raises(ExactStepNeeded):  # one row's candidates all suppressed
            lowered = scores.clone()
            lowered[1] = -math.inf
            guard(None, lowered)
    assert head.step_classes is None and head.step_floor is None  # cleared with the block


def _timed_paths(head, monkeypatch, cost):
    """Run the fast steps of ``head`` on a fake clock: each path advances it by ``cost[path]`` seconds."""
    clock, ran = [0.0], []
    for path in ("scan", "dense"):
        step = getattr(head, f"_{path}_step")

        def timed(h, step=step, path=path):
            clock[0] += cost[path]
            ran.append(path)
            return step(h)

        monkeypatch.setattr(head, f"_{path}_step", timed)
    monkeypatch.setattr(torchaq.hf, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    return ran


@pytest.mark.parametrize("faster", ["dense", "scan"])
def test_auto_fast_step_times_both_paths_then_keeps_the_faster(faster, monkeypatch):
    dense, quantized = _build(True, torch.float32, fast_step="auto")
    head = quantized.get_output_embeddings()
    ran = _timed_paths(head, monkeypatch, {"scan": 1.0, "dense": 1.0, faster: 0.1})
    prompt = _prompt(3, 5, seed=7)
    kwargs = dict(max_new_tokens=6, do_sample=False)
    assert torch.equal(quantized.generate(prompt, **kwargs), dense.generate(prompt, **kwargs))
    assert ran[:2] == ["scan", "dense"] and set(ran[2:]) == {faster}  # one timing each, then the faster
    assert len(ran) == 6  # the prefill's step (logits of the last position only) and five decode steps
    assert head.step_paths.choice((3, torch.float32, torch.get_num_threads(), None)) == faster
    assert quantized.generate(prompt, **kwargs).equal(dense.generate(prompt, **kwargs))
    assert set(ran[6:]) == {faster}  # the choice outlives the call
    key = (3, torch.float32, torch.get_num_threads(), None)
    monkeypatch.undo()  # the fake clock's closures do not pickle
    for copy_ in (copy.deepcopy(quantized), pickle.loads(pickle.dumps(quantized))):  # this machine's timings stay here
        assert copy_.get_output_embeddings().step_paths.choice(key) is None
    assert head.step_paths.choice(key) == faster


def test_dense_fast_steps_are_exact_and_unguarded(fp32_tied):
    _, quantized = fp32_tied
    head = quantized.get_output_embeddings()
    h = torch.randn(3, 1, D, generator=torch.Generator().manual_seed(8))
    with head.fast_steps():
        out = head._dense_step(h)
        assert head.step_exact and head.step_classes is None
        assert torch.equal(out, torch.nn.functional.linear(h, head.weight))
        assert FastStepGuard(head)(None, out[:, -1]) is not None
        head._scan_step(h)
        assert not head.step_exact
    assert not head.step_exact


def test_scan_fast_step_is_never_timed(fp32_tied, monkeypatch):
    dense, quantized = fp32_tied  # fast_step="scan"
    head = quantized.get_output_embeddings()
    ran = _timed_paths(head, monkeypatch, {"scan": 1.0, "dense": 0.1})
    quantized.generate(_prompt(), max_new_tokens=4, do_sample=False)
    assert ran == ["scan"] * 4 and head.step_paths.choice((3, torch.float32, torch.get_num_threads(), None)) is None


def test_bound_guarantee_head_equals_dense(monkeypatch):
    dense, quantized = _build(False, torch.float32, guarantee="bound")
    prompt = _prompt(2, 5, seed=4)
    calls = _count_fast_steps(quantized.get_output_embeddings(), monkeypatch)
    kwargs = dict(max_new_tokens=6, do_sample=False)
    assert torch.equal(quantized.generate(prompt, **kwargs), dense.generate(prompt, **kwargs))
    assert calls


def test_save_pretrained_from_pretrained_round_trip(models, tmp_path):
    dense, quantized = models
    quantized.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    reloaded = torchaq.hf.from_pretrained(str(tmp_path), dtype=dense.dtype)
    head, old = reloaded.get_output_embeddings(), quantized.get_output_embeddings()
    assert isinstance(head, QuantizedLMHead)
    if quantized.config.tie_word_embeddings:
        assert head.weight is reloaded.transformer.wte.weight
    for name in ("packed_codes", "side_rows", "residual_norms"):
        assert torch.equal(getattr(head, name), getattr(old, name))
    assert head.options["fast_step"] == old.options["fast_step"] == "scan"
    assert torch.equal(head.quantizer.codebooks, old.quantizer.codebooks)
    assert head.quantizer.rule == old.quantizer.rule and head.quantizer.fitted
    prompt = _prompt()
    kwargs = dict(max_new_tokens=8, do_sample=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # fresh index, no stale warning
        assert torch.equal(reloaded.generate(prompt, **kwargs), quantized.generate(prompt, **kwargs))
    # opened without torchaq: a dense model with the same weights
    plain = transformers.GPT2LMHeadModel.from_pretrained(tmp_path, dtype=dense.dtype)
    assert torch.equal(plain.lm_head.weight, dense.lm_head.weight)
    with torch.no_grad():
        assert torch.equal(plain(prompt).logits, dense(prompt).logits)


def test_from_pretrained_refuses_a_dense_checkpoint(fp32_tied, tmp_path):
    fp32_tied[0].save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="torchaq"):
        torchaq.hf.from_pretrained(str(tmp_path))


def test_safetensors_pickle_and_torch_save(models, tmp_path):
    _, quantized = models
    head = quantized.get_output_embeddings()
    path = tmp_path / "head.safetensors"
    safetensors_torch.save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(path))
    skeleton = QuantizedLMHead(torch.empty(V, D, dtype=head.weight.dtype), num_subspaces=16, fit=False)
    skeleton.load_state_dict(safetensors_torch.load_file(str(path)))
    h = torch.randn(4, D, dtype=head.weight.dtype)
    assert all(torch.equal(a, b) for a, b in zip(skeleton.topk(h, k=5), head.topk(h, k=5)))
    prompt = _prompt(2, 5)
    kwargs = dict(max_new_tokens=5, do_sample=False)
    expected = quantized.generate(prompt, **kwargs)
    buffer = io.BytesIO()
    torch.save(quantized, buffer)
    buffer.seek(0)
    for copy_ in (torch.load(buffer, weights_only=False), pickle.loads(pickle.dumps(quantized)), copy.deepcopy(quantized)):
        assert isinstance(copy_.get_output_embeddings(), QuantizedLMHead)
        assert torch.equal(copy_.generate(prompt, **kwargs), expected)


def test_data_write_by_init_weights_is_seen(fp32_tied):
    _, quantized = fp32_tied
    model = copy.deepcopy(quantized)
    head = model.get_output_embeddings()
    with torch.no_grad():
        model.transformer.wte.weight.data.copy_(torch.randn(V, D))  # what HF's _init_weights does
    with pytest.warns(RuntimeWarning, match=r"\.data"):
        head.topk(torch.randn(2, D), k=3)
    head.refresh()
    w = head.weight.detach()
    h = torch.randn(16, D)
    _, idx = head.topk(h, k=1)
    assert (idx[:, 0] == (h @ w.T).argmax(1)).float().mean() >= 0.9


def test_quantize_lm_head_rejects_bad_arguments():
    class Odd(torch.nn.Module):
        def get_output_embeddings(self):
            return torch.nn.Embedding(3, 3)

    with pytest.raises(TypeError, match="nn.Linear"):
        torchaq.hf.quantize_lm_head(Odd())
    dense, quantized = _build(True, torch.float32)
    with pytest.raises(ValueError, match="guarantee"):
        torchaq.hf.quantize_lm_head(dense, guarantee="exact")
    with pytest.raises(ValueError, match="fast_step"):
        torchaq.hf.quantize_lm_head(dense, fast_step="dense")
    with pytest.raises(TypeError, match="already"):
        torchaq.hf.quantize_lm_head(quantized)
