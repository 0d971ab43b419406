"""Chunked log-probs (`models.logprobs`): the same values and gradients as the whole [N × V] logits at once, without
ever making a tensor of that size."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from llmft.maths.losses import token_logps
from llmft.maths.rl import entropy_from_logits
from llmft.models import logprobs
from llmft.models.forward import lm_logits
from tests.helpers.families import BY_NAME, build


class LargestTensor(TorchDispatchMode):
    """Records the most elements of any tensor an op makes (forward and backward alike)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.fixture(params=["tiny-llama", "gemma2"])
def model(request, tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    path = tiny_model_dir if request.param == "tiny-llama" else build(BY_NAME["gemma2"], tmp_path / "g")
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    m.requires_grad_(False)
    return m


def inputs(model, n: int = 37):
    torch.manual_seed(1)
    hidden = torch.randn(n, model.config.hidden_size, requires_grad=True)
    return hidden, torch.randint(0, model.config.vocab_size, (n,))


def reference(model, hidden, targets, temperature):
    logits = lm_logits(model, hidden) / temperature  # all N × V at once
    return token_logps(logits, targets), entropy_from_logits(logits.detach())


@pytest.mark.parametrize("head_trains", [False, True])
def test_chunks_give_the_same_log_probs_entropy_and_gradients(model, head_trains, monkeypatch):
    # 8 rows a chunk: 37 positions make 5 chunks, the last one short
    monkeypatch.setattr(logprobs, "CHUNK_BYTES", 8 * 4 * model.config.vocab_size)
    monkeypatch.setattr(logprobs, "MIN_CHUNK_ROWS", 1)
    head = model.get_output_embeddings().weight
    head.requires_grad_(head_trains)  # peft's trainable token rows: the checkpointed path
    hidden, targets = inputs(model)
    weights = torch.rand(len(targets))  # a loss that weighs each token differently
    expected, expected_entropy = reference(model, hidden, targets, 0.7)
    (weights * expected).sum().backward()
    expected_grads = [hidden.grad.clone(), head.grad.clone() if head_trains else None]
    hidden.grad, head.grad = None, None
    logps, entropy = logprobs.head_logps(model, hidden, targets, 0.7, with_entropy=True)
    (weights * logps).sum().backward()
    assert torch.allclose(logps, expected, atol=1e-5) and torch.allclose(entropy, expected_entropy, atol=1e-5)
    assert torch.allclose(hidden.grad, expected_grads[0], atol=1e-6)
    if head_trains:
        assert torch.allclose(head.grad, expected_grads[1], atol=1e-6)
    with torch.no_grad():  # the old/reference log-prob passes
        assert torch.allclose(logprobs.head_logps(model, hidden, targets, 0.7)[0], expected, atol=1e-5)


@pytest.mark.parametrize("head_trains", [False, True])
def test_the_whole_logits_never_exist(model, head_trains, monkeypatch):
    vocab, n = model.config.vocab_size, 64
    monkeypatch.setattr(logprobs, "CHUNK_BYTES", 16 * 4 * vocab)  # 16 rows a chunk
    monkeypatch.setattr(logprobs, "MIN_CHUNK_ROWS", 1)
    model.get_output_embeddings().weight.requires_grad_(head_trains)
    hidden, targets = inputs(model, n)
    with LargestTensor() as whole:
        reference(model, hidden, targets, 1.0)[0].sum().backward()
    with LargestTensor() as chunked:
        logprobs.head_logps(model, hidden, targets, 1.0)[0].sum().backward()
    assert whole.largest >= n * vocab  # what the unchunked way makes ...
    assert chunked.largest <= max(16 * vocab, n * model.config.hidden_size, vocab * model.config.hidden_size)


def test_a_chunk_holds_at_most_64_mib_of_logits_but_never_fewer_than_256_positions(model):
    from types import SimpleNamespace

    def head(vocab):
        return SimpleNamespace(get_output_embeddings=lambda: SimpleNamespace(weight=torch.empty(vocab, 0)))

    assert logprobs.chunk_rows(head(49152)) == 341  # SmolLM2: 64 MiB / (4 bytes × 49,152)
    assert logprobs.chunk_rows(head(151936)) == 256  # Qwen: 110 positions would be 64 MiB; thin products are slow
