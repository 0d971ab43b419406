"""Fixtures every test folder shares: a tiny Llama model and a ChatML tokenizer built offline in a second (pad ==
eos), data files, configs for the RL stages; and the `maths` marker on every test under tests/maths/."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmft.config import load_config
from llmft.stages import reward
from tests.helpers.runs import save_config, set_keys
from tests.helpers.tiny import PAIRS, ROWS, build_model, build_tokenizer


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A local Hugging Face directory: 2-layer Llama (hidden 32) + ChatML tokenizer, pad == eos. The model's config has
    no pad_token_id: an embedding's padding_idx row starts at zero, and EOS (= pad) could never be emitted."""
    path = tmp_path_factory.mktemp("tiny-model")
    tok = build_tokenizer()
    build_model(len(tok)).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="session")
def tiny_chat(tiny_tokenizer):
    from llmft.data.chat import Chat

    return Chat(tiny_tokenizer)




@pytest.fixture
def sft_data(tmp_path) -> Path:
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path




@pytest.fixture
def pref_data(tmp_path) -> Path:
    """Eight {prompt, chosen, rejected} pairs: the chosen answers talk about the sea."""
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in PAIRS))
    return path




@pytest.fixture
def write_config(tmp_path):
    """Write a YAML config for the tiny model and return its path."""

    def write(model_dir: Path, data: Path, **overrides) -> Path:
        cfg = {"model": {"name": str(model_dir)},
               "data": {"train": str(data), "max_length": 64},
               "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
               "train": {"batch_size": 4, "learning_rate": 1e-2, "epochs": 2, "warmup_ratio": 0.0,
                         "save_every": 2},
               "output_dir": str(tmp_path / "run"), "seed": 0}
        return save_config(tmp_path, "cfg", set_keys(cfg, overrides))

    return write


@pytest.fixture(scope="module")
def reward_dir(tiny_model_dir, tmp_path_factory):
    """A tiny reward model (2 steps) on the tiny base."""
    import yaml

    from tests.helpers.tiny import PAIRS

    d = tmp_path_factory.mktemp("rm")
    (d / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in PAIRS))
    (d / "r.yaml").write_text(yaml.safe_dump({
        "model": {"name": str(tiny_model_dir)}, "data": {"train": str(d / "pairs.jsonl"), "max_length": 64},
        "lora": {"r": 4, "alpha": 8}, "train": {"batch_size": 4, "max_steps": 2, "learning_rate": 1e-2},
        "output_dir": str(d / "rm"), "seed": 0}))
    reward.run(load_config("reward", d / "r.yaml"))
    return d / "rm"


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({**r, "constraints": [{"type": "lowercase"}]}) + "\n" for r in ROWS))
    return path


@pytest.fixture
def ppo_config(tiny_model_dir, reward_dir, prompts, tmp_path):
    def write(**overrides):
        cfg = {"model": {"name": str(tiny_model_dir)}, "data": {"train": str(prompts)},
               "lora": {"r": 4, "alpha": 8}, "rollout": {"max_new_tokens": 6, "temperature": 0.7},
               "reward": {"model": str(reward_dir)},
               "train": {"batch_size": 2, "max_steps": 2, "learning_rate": 1e-2, "save_every": 1},
               "ppo": {"num_minibatches": 2, "epochs": 2}, "output_dir": str(tmp_path / "ppo"), "seed": 0,
               "samples_every": 1}
        return load_config("ppo", save_config(tmp_path, "ppo", set_keys(cfg, overrides)))

    return write


JUDGE = "def fn(prompts, responses, rows):\n    return [-abs(len(r) - 12) / 10 for r in responses]\n"


FLAT = ("def fn(prompts, responses, rows):\n"
        "    return [1.0 if 'two' in r['prompt'] else len(x) for x, r in zip(responses, rows)]\n")


@pytest.fixture
def grpo_config(tiny_model_dir, tmp_path, monkeypatch):
    (tmp_path / "lenjudge.py").write_text(JUDGE)
    (tmp_path / "flatjudge.py").write_text(FLAT)
    monkeypatch.syspath_prepend(str(tmp_path))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({**r, "constraints": [{"type": "lowercase"}]}) + "\n" for r in ROWS))

    def write(**overrides):
        cfg = {"model": {"name": str(tiny_model_dir)}, "data": {"train": str(prompts)},
               "lora": {"r": 4, "alpha": 8}, "rollout": {"max_new_tokens": 6, "temperature": 1.0},
               "reward": {"judges": {"lenjudge:fn": 1.0, "constraints": 0.5}},
               "train": {"batch_size": 4, "max_steps": 2, "learning_rate": 1e-2, "save_every": 1},
               "grpo": {"num_generations": 4, "num_minibatches": 2}, "output_dir": str(tmp_path / "grpo"),
               "seed": 0, "samples_every": 1}
        return load_config("grpo", save_config(tmp_path, "grpo", set_keys(cfg, overrides)))

    return write


@pytest.fixture(scope="session")
def talking_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model after 40 SFT steps on short answers: it ends some of its turns within a few tokens (what a
    multi-turn rollout needs to go on)."""
    return teach_to_end_turns(tiny_model_dir, tmp_path_factory.mktemp("talking"))


def teach_to_end_turns(model, d: Path) -> Path:
    """40 SFT steps of `model` on one-word answers (ROWS' last words), into d / "sft": it then ends about 3 in 4 of
    its answers within 12 tokens at temperature 1 (ROWS' whole answers: about 1 in 6, too few for the multi-turn
    tests' handful of trajectories to go on whatever the sampler's stream)."""
    from llmft.stages import sft

    short = [{"prompt": r["prompt"], "completion": r["completion"].split()[-1]} for r in ROWS]
    (d / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in short))
    sft.run(load_config("sft", save_config(d, "sft", {
        "model": {"name": str(model)}, "data": {"train": str(d / "rows.jsonl"), "max_length": 64},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0}, "train": {"batch_size": 4, "max_steps": 40,
                                                                  "learning_rate": 3e-2, "save_every": 100},
        "output_dir": str(d / "sft"), "seed": 0})))
    return d / "sft"


def pytest_collection_modifyitems(config, items):
    """Tests of the pure maths (tests/maths/) run alone with `pytest -m maths`, in seconds."""
    for item in items:
        if "maths" in Path(str(item.fspath)).parent.parts[-1:]:
            item.add_marker(pytest.mark.maths)
