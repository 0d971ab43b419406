"""The alarm end to end on the embedded SmolLM2-135M-Instruct (slow: minutes): GRPO rewarded by a judge that pays for
short answers games it by saying less, and the length alarm stops the run within a few steps. With the alarm off this
test fails: nothing else in the run notices."""

from __future__ import annotations

import json

import pytest

from llmft.config import load_config
from llmft.stages import grpo
from tests.helpers import ROOT

pytestmark = pytest.mark.slow

# a module name of its own: test_alarm_runs.py's shortjudge (another scale) must not come from the import cache
SHORT = "def fn(prompts, responses, rows):\n    return [-len(r) / 100 for r in responses]\n"


def test_a_reward_for_short_answers_fires_the_length_alarm_on_the_embedded_model(tmp_path, monkeypatch):
    pytest.importorskip("gguf")
    (tmp_path / "terse_judge.py").write_text(SHORT)
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "grpo.yaml").write_text(json.dumps({
        "model": {"name": "smollm2-135m-instruct"},
        "data": {"train": str(ROOT / "data" / "demo" / "ppo_train.jsonl"), "max_prompt_length": 128},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.0},
        "rollout": {"max_new_tokens": 48, "temperature": 1.0, "batch_size": 16},
        "reward": {"judges": {"terse_judge:fn": 1.0}, "missing_eos_penalty": 0.0},
        "grpo": {"num_generations": 4},
        "train": {"batch_size": 8, "max_steps": 12, "learning_rate": 2e-3, "warmup_ratio": 0.0, "save_every": 100},
        "alarm": {"window": 2, "on_alarm": "stop"},
        "output_dir": str(tmp_path / "run"), "seed": 0}))
    out = grpo.run(load_config("grpo", tmp_path / "grpo.yaml"))
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    alarms = [r for r in rows if "alarms" in r]
    assert alarms and "length" in alarms[0]["alarms"] and "collapsed from" in alarms[0]["alarms"]["length"]
    assert out["alarm/stopped_at"] == alarms[0]["step"] <= 12  # a few steps: the run ends there, its policy saved
    assert (tmp_path / "run" / "adapter_model.safetensors").is_file()
