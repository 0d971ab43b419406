"""The vLLM engine on its own: token ids in and out, the sampler's log-probs equal to the trainer's, the stop set,
greedy equal to the HF engine's, adapters, the one-line errors. One engine process serves the module."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from llmft.config import SamplingConfig
from llmft.data.chat import Chat
from tests.helpers.tiny import ROWS
from tests.helpers.vllm import build_llama, require_vllm

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    require_vllm()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmft.config import VLLMConfig
    from llmft.rollout.vllm_engine import VLLMEngine

    path = build_llama(tmp_path_factory.mktemp("vllm-tiny"))
    chat = Chat(AutoTokenizer.from_pretrained(path))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    engine = VLLMEngine.start(path, chat, torch.float32, torch.device("cpu"), VLLMConfig(kv_cache_gb=0.0625),
                              tmp_path_factory.mktemp("vllm-log") / "engine.log", 256, lora_r=4)
    prompts = [chat.prompt_ids([{"role": "user", "content": r["prompt"]}]) for r in ROWS]
    yield path, chat, model, engine, prompts
    engine.close()


def trainer_logps(model, ids: list[int], start: int, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(z / T) of ids[start:], fp32, as the RL stages recompute it."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].float() / temperature
    return torch.log_softmax(logits[start - 1:-1], -1).gather(-1, torch.tensor(ids[start:])[:, None])[:, 0]


def test_sampled_tokens_come_with_the_trainers_log_probs(setup):
    _, chat, model, engine, prompts = setup
    sampling = SamplingConfig(max_new_tokens=12, temperature=0.7, seed=3)
    answers = engine.generate(prompts, sampling, logprobs=True)
    assert [a.prompt_ids for a in answers] == prompts  # the prompt tokens are llmft's, returned as given
    for a in answers:
        assert len(a.logprobs) == len(a.answer_ids) > 0
        mine = trainer_logps(model, a.prompt_ids + a.answer_ids, len(a.prompt_ids), temperature=0.7)
        assert torch.allclose(torch.tensor(a.logprobs), mine, atol=1e-4), (a.logprobs, mine)
        assert a.finished == (a.answer_ids[-1] in chat.stop_ids)  # cut through the first stop id
        assert not set(a.answer_ids[:-1]) & set(chat.stop_ids)
    assert engine.generate(prompts, sampling, logprobs=True)[0].answer_ids == answers[0].answer_ids  # seeded
    other = engine.generate(prompts, dataclasses.replace(sampling, seed=4))
    assert [a.answer_ids for a in other] != [a.answer_ids for a in answers]


def test_greedy_answers_equal_the_hf_engines(setup):
    from llmft.rollout.generation import generate

    _, chat, model, engine, prompts = setup
    greedy = SamplingConfig(max_new_tokens=10, temperature=0.0)
    hf = generate(model, chat, prompts, greedy, logprobs=True)
    vllm = engine.generate(prompts, greedy, logprobs=True)
    assert [a.answer_ids for a in vllm] == [a.answer_ids for a in hf]
    assert [a.text for a in vllm] == [a.text for a in hf]
    for a, b in zip(vllm, hf, strict=True):
        assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-4)


def test_the_engine_stops_at_every_stop_id_of_llmfts_stop_set(setup):
    _, chat, model, engine, prompts = setup
    greedy = SamplingConfig(max_new_tokens=10, temperature=0.0)
    plain = engine.generate(prompts[:1], greedy)[0].answer_ids
    stopped = copy.copy(chat)  # a copy whose stop set also holds the answer's third token
    stopped.stop_ids = sorted({*chat.stop_ids, plain[2]})
    engine.chat = stopped
    try:
        cut = engine.generate(prompts[:1], greedy)[0]
    finally:
        engine.chat = chat
    assert cut.answer_ids == plain[:plain.index(plain[2]) + 1] and cut.finished


def test_an_adapter_is_loaded_as_an_adapter_and_the_probe_sees_it(setup, tmp_path):
    from peft import LoraConfig, get_peft_model

    path, _, model, engine, prompts = setup
    ids = prompts[0] + prompts[1]
    base = engine.probe(ids)
    assert torch.allclose(base.float(), trainer_logps(model, ids, 1), atol=1e-4)
    lm = get_peft_model(type(model).from_pretrained(path, dtype=torch.float32),
                        LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0))
    torch.manual_seed(0)
    for name, p in lm.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.5)
    lm.save_pretrained(tmp_path / "a1")
    adapted = engine.probe(ids, ("a1", 1, str(tmp_path / "a1")))
    assert torch.allclose(adapted.float(), trainer_logps(lm.eval(), ids, 1), atol=1e-4)
    assert (adapted - base).abs().max() > 0.1
    assert torch.equal(engine.probe(ids), base)  # the base is untouched: nothing was merged into it


@pytest.mark.parametrize("targets", ["all-linear", ["q_proj", "v_proj"]])
def test_merged_weights_equal_the_adapter_on_top_and_do_not_accumulate(setup, tmp_path, targets):
    """merge reloads base + s·B·A (vLLM stacks q/k/v: an adapter on q and v only must leave k as it was); merging a
    zero adapter afterwards gives the base back, so each merge starts from the base, not from the last merge."""
    from peft import LoraConfig, get_peft_model

    path, _, model, engine, prompts = setup
    ids = prompts[0] + prompts[1]
    base = engine.probe(ids)
    lm = get_peft_model(type(model).from_pretrained(path, dtype=torch.float32),
                        LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0, use_rslora=True))
    lm.save_pretrained(tmp_path / "zero")  # B = 0: the base's weights exactly
    torch.manual_seed(1)
    for name, p in lm.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.5)
    lm.save_pretrained(tmp_path / "a")
    long = [((prompts[i] + prompts[i + 1]) * 20)[:200] for i in (0, 1)]  # longer than a KV-cache block (128 on a
    assert all(len(p) == 200 for p in long)  # CPU), whose first block a generation from the base leaves cached
    sampling = SamplingConfig(max_new_tokens=6, temperature=1.0, seed=2)
    engine.generate(long, sampling)
    assert engine.merge(tmp_path / "a") > 0
    merged = engine.probe(ids)
    assert torch.allclose(merged.float(), trainer_logps(lm.eval(), ids, 1), atol=1e-4)
    assert (merged - base).abs().max() > 0.1
    for a in engine.generate(long, sampling, logprobs=True):  # from the merged weights: the stale prefix cache dropped
        mine = trainer_logps(lm, a.prompt_ids + a.answer_ids, len(a.prompt_ids))
        assert torch.allclose(torch.tensor(a.logprobs), mine, atol=1e-4)
    engine.merge(tmp_path / "zero")
    assert torch.allclose(engine.probe(ids), base, atol=1e-6)


def test_vllm_missing_is_one_line(tmp_path, monkeypatch):
    from llmft.errors import ConfigError
    from llmft.rollout import vllm_engine

    monkeypatch.setenv("LLMFT_VLLM_PYTHON", str(tmp_path / "nope" / "python"))
    with pytest.raises(ConfigError, match="LLMFT_VLLM_PYTHON: no interpreter"):
        vllm_engine.vllm_python(None)
    monkeypatch.delenv("LLMFT_VLLM_PYTHON")
    monkeypatch.setattr(vllm_engine.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(vllm_engine, "WORKER", tmp_path / "llmft" / "rollout" / "vllm_worker.py")
    monkeypatch.setattr(vllm_engine, "__file__", str(tmp_path / "llmft" / "rollout" / "vllm_engine.py"))
    with pytest.raises(ConfigError, match="vLLM is not installed. Run scripts/setup_vllm.sh"):
        vllm_engine.vllm_python(None)


def test_lora_ranks_round_up_to_what_vllm_holds():
    from llmft.errors import ConfigError
    from llmft.rollout.vllm_engine import lora_rank

    assert [lora_rank(r) for r in (1, 2, 8, 9, 64, 300)] == [1, 8, 8, 16, 64, 320]
    with pytest.raises(ConfigError, match="up to rank 512"):
        lora_rank(513)


def test_the_engine_gets_the_trainers_gpu_through_cuda_visible_devices(monkeypatch):
    from llmft.rollout.vllm_engine import worker_env

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert worker_env(torch.device("cuda", 1))["CUDA_VISIBLE_DEVICES"] == "1"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")  # cuda:1 of this process is the machine's GPU 6
    assert worker_env(torch.device("cuda", 1))["CUDA_VISIBLE_DEVICES"] == "6"
    assert worker_env(torch.device("cpu"))["CUDA_VISIBLE_DEVICES"] == "4,6"
    assert worker_env(torch.device("cpu"))["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
