"""Hugging Face integration: generate() with the quantized head gives the exact model's tokens."""
import copy

import pytest
import torch

import torchaq

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=2000, n_positions=64, n_embd=32, n_layer=2, n_head=2, tie_word_embeddings=True
    )
    exact = transformers.GPT2LMHeadModel(config).eval()
    quantized = copy.deepcopy(exact)
    # calibration queries: the model's own final hidden states on some random prompts
    with torch.no_grad():
        prompts = torch.randint(0, 2000, (8, 32))
        hidden = quantized.transformer(prompts).last_hidden_state.reshape(-1, 32)
    head = torchaq.hf.quantize_lm_head(quantized, num_subspaces=16, queries=hidden, progress=False)
    return exact, quantized, head


def test_head_is_swapped_and_still_tied(models):
    _, quantized, head = models
    assert quantized.get_output_embeddings() is head
    assert head.weight is quantized.transformer.wte.weight
    assert not head.training


def test_greedy_generation_equals_exact(models):
    exact, quantized, head = models
    prompt = torch.randint(0, 2000, (3, 5), generator=torch.Generator().manual_seed(1))
    kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    expected = exact.generate(prompt, **kwargs)
    got = quantized.generate(prompt, **kwargs)
    # tokens agree whenever the layer's top-1 is the true top-1; check that it was at each step
    with torch.no_grad():
        hidden = exact.transformer(expected[:, :-1]).last_hidden_state[:, 4:]
        true_top1 = (hidden @ exact.lm_head.weight.T).argmax(-1)
        layer_top1 = head.layer.topk(hidden, k=1)[1][..., 0]
    assert torch.equal(true_top1, layer_top1)
    assert torch.equal(got, expected)


def test_top_k_sampling_generation_equals_exact(models):
    exact, quantized, _ = models
    prompt = torch.randint(0, 2000, (2, 5), generator=torch.Generator().manual_seed(2))
    kwargs = dict(max_new_tokens=10, do_sample=True, top_k=20, temperature=0.8, pad_token_id=0)
    torch.manual_seed(3)
    expected = exact.generate(prompt, **kwargs)
    torch.manual_seed(3)
    got = quantized.generate(prompt, **kwargs)
    # same top-20 sets and logits -> the same probabilities -> the same draws from the same seed
    assert torch.equal(got, expected)


def test_train_mode_returns_dense_logits(models):
    _, quantized, head = models
    hidden = torch.randn(2, 3, 32)
    head.train()
    try:
        torch.testing.assert_close(head(hidden), hidden @ head.weight.T)
    finally:
        head.eval()
    sparse = head(hidden)
    assert sparse.shape == (2, 3, 2000)
    # only the candidates (and the layer's exact side list) are finite
    assert torch.isinf(sparse).sum(-1).min() >= 2000 - 256 - head.layer.side_rows.numel()


def test_quantize_lm_head_rejects_non_linear_heads():
    class Odd(torch.nn.Module):
        def get_output_embeddings(self):
            return torch.nn.Embedding(3, 3)

    with pytest.raises(TypeError, match="nn.Linear"):
        torchaq.hf.quantize_lm_head(Odd())
