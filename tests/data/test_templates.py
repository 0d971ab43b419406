"""Base models without a chat template: prompt and answer are never glued, and `model.chat_template` gives them one
whose new special tokens are trained, saved with the run and kept by every later stage."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from llmft.config import SamplingConfig, load_config
from llmft.errors import ConfigError, ModelError
from llmft.models.loading import load_chat, load_model
from llmft.models.sources import resolve_source
from llmft.rollout.generation import generate
from llmft.stages import dpo, ppo, sft
from tests.helpers.runs import set_keys, train_in_process
from tests.helpers.tiny import PAIRS, ROWS, build_model, build_tokenizer


@pytest.fixture(scope="module", params=["tied", "untied"])
def base(request, tmp_path_factory) -> Path:
    """A model without a chat template: the tiny Llama (tied embeddings), or a Mistral-shaped one (untied)."""
    path = tmp_path_factory.mktemp(f"base-{request.param}")
    if request.param == "tied":
        tok = build_tokenizer(chat_template=None)
        build_model(len(tok)).save_pretrained(path)
    else:
        from tests.helpers.families import BY_NAME, build

        build(BY_NAME["mistral"], path)
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(path)
        tok.chat_template = None
    tok.save_pretrained(path)
    (path / "chat_template.jinja").unlink(missing_ok=True)
    return path


@pytest.fixture
def config(tmp_path):
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in PAIRS))

    def write(stage: str, model: Path, steps: int = 2, **extra):
        data = "sft.jsonl" if stage in ("sft", "ppo") else "pairs.jsonl"
        cfg = {"model": {"name": str(model)}, "data": {"train": str(tmp_path / data)},
               "lora": {"r": 16, "alpha": 32, "dropout": 0.0},
               "train": {"batch_size": 4, "max_steps": steps, "learning_rate": 1e-2, "warmup_ratio": 0.0,
                         "scheduler": "constant", "save_every": 1000}, "output_dir": str(tmp_path / stage), "seed": 0}
        set_keys(cfg, extra)
        (tmp_path / f"{stage}.yaml").write_text(yaml.safe_dump(cfg))
        return load_config(stage, tmp_path / f"{stage}.yaml")

    return write


def greedy(run_dir: Path, max_new_tokens: int = 24):
    src = resolve_source(str(run_dir))
    chat = load_chat(src)
    model = load_model(src, torch.float32, torch.device("cpu"), load_config("sft", run_dir / "config.yaml").model)
    prompts = [chat.prompt_ids([{"role": "user", "content": r["prompt"]}]) for r in ROWS]
    return chat, generate(model, chat, prompts, SamplingConfig(max_new_tokens=max_new_tokens, temperature=0))


def test_without_a_template_prompt_and_answer_are_separated_and_answers_end_with_eos(base, config, tmp_path):
    s = sft.setup(config("sft", base, 80))
    first = s.train.examples[0]
    text = s.chat.tokenizer.decode(first.input_ids)
    assert "sea\n\nthe sea is" in text  # "write … about the sea" + separator + answer: not glued
    assert first.input_ids[-1] == s.chat.tokenizer.eos_token_id == first.labels[-1]
    sft.run(config("sft", base, 80))
    chat, gens = greedy(tmp_path / "sft")
    assert sum(g.finished and g.answer_ids[-1] == chat.tokenizer.eos_token_id for g in gens) >= 7
    assert sum(g.text == r["completion"] for g, r in zip(gens, ROWS, strict=True)) >= 6


def test_a_named_template_adds_its_tokens_trains_them_and_later_stages_keep_it(base, config, tmp_path):
    cfg = config("sft", base, 80, model__chat_template="llama3")
    s = sft.setup(cfg)
    new = s.chat.added_ids  # <|start_header_id|>, <|end_header_id|>, <|eot_id|>: not in the base vocabulary
    assert len(new) == 3 and s.chat.frame.end == "<|eot_id|>" and s.chat.tokenizer.convert_ids_to_tokens(new[-1])
    model, before, _ = train_in_process(sft, cfg)
    changed = {n for n, p in model.named_parameters() if n in before and not torch.equal(before[n], p.detach())}
    assert changed and all("lora_" in n or "trainable_tokens" in n for n in changed), sorted(changed)[:4]
    assert any("trainable_tokens" in n for n in changed)  # the new tokens' rows learned

    sft.run(config("sft", base, 80, model__chat_template="llama3", overwrite=True))
    out = tmp_path / "sft"
    assert json.loads((out / "llmft.json").read_text())["model"]["embedding_rows"] >= max(new) + 1
    chat, gens = greedy(out)
    end = chat.tokenizer.convert_tokens_to_ids("<|eot_id|>")
    assert chat.tokenizer.chat_template and end in chat.stop_ids
    assert sum(g.finished and g.answer_ids[-1] == end for g in gens) >= 7  # it learned to end its turn
    assert sum(g.text == r["completion"] for g, r in zip(gens, ROWS, strict=True)) >= 6

    metrics = dpo.run(config("dpo", out))  # the next stage: template and tokens come with runs/sft
    assert math.isfinite(metrics["loss"])
    first = json.loads((tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)  # the merged token rows are the reference's too
    with pytest.raises(ModelError, match="trained with another chat template"):
        dpo.setup(config("dpo", out, model__chat_template="chatml"))
    assert dpo.setup(config("dpo", out, model__chat_template="llama3")).chat.added_ids == []  # the same: fine
    with pytest.raises(ConfigError, match="ppo keeps the template"):
        ppo.setup(config("ppo", out, model__chat_template="llama3"))


def test_a_jinja_file_template_with_its_special_tokens(base, config, tmp_path):
    (tmp_path / "t.jinja").write_text("{% for m in messages %}{{ '<turn>' + m['role'] + ': ' + m['content'] + "
                                      "'</turn>' }}{% endfor %}"
                                      "{% if add_generation_prompt %}{{ '<turn>assistant: ' }}{% endif %}")
    s = sft.setup(config("sft", base, model__chat_template=str(tmp_path / "t.jinja"),
                         model__special_tokens=["<turn>", "</turn>"]))
    assert s.chat.frame.end == "</turn>" and len(s.chat.added_ids) == 2
    with pytest.raises(ConfigError, match="neither a named template"):
        sft.setup(config("sft", base, model__chat_template=str(tmp_path / "missing.jinja")))


@pytest.mark.parametrize("name", ["chatml", "llama3", "gemma"])
def test_named_templates_keep_the_system_message_and_end_answers_with_their_token(name):
    from llmft.data.chat import Chat
    from llmft.data.templates import NAMED, apply

    tok = build_tokenizer(chat_template=None)
    apply(tok, name)
    chat = Chat(tok)
    prompt_ids, answer_ids = chat.encode([{"role": "system", "content": "be brief"},
                                          {"role": "user", "content": "hello"}], "the sea")
    assert "be brief" in tok.decode(prompt_ids) and "hello" in tok.decode(prompt_ids)
    assert tok.convert_ids_to_tokens(answer_ids[-1]) == NAMED[name][1][-1]  # <|im_end|>, <|eot_id|>, <end_of_turn>
