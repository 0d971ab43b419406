"""GRPO with a multi-turn environment on a tiny model that ends its turns (`talking_dir`: a few SFT steps): the
sampler's log-probs equal the trainer's over every policy turn, the environment's tokens are out of the loss, the
samples hold whole trajectories, resume equals the uninterrupted run, and the config errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from llmft.errors import ConfigError
from llmft.stages import grpo
from tests.helpers.runs import crash_then_resume

ENV = "tests.helpers.envs:TwoTurns"


@pytest.fixture
def env_config(grpo_config, talking_dir):
    def write(**overrides):
        return grpo_config(**{"model__name": str(talking_dir), "reward__judges": {}, "env__name": ENV,
                              "env__max_tokens": 48, "rollout__max_new_tokens": 12, **overrides})

    return write


def test_multi_turn_step_sampler_equals_trainer_and_masks_the_environment(env_config):
    s = grpo.setup(env_config(grpo__num_minibatches=1, train__grad_accum=2))
    model = grpo.build_model(s)
    metrics, samples = grpo.grpo_step(model, s, [0, 1], lambda loss: 0.0, 1)
    groups, _ = grpo.rollout(model, s, [0, 1], 1)
    exp = grpo.pack([a for g in groups for a in g.answers], s.chat.pad_id, s.device)
    assert metrics["env/turns"] > 1  # some trajectories went on after the observation
    two = [i for g in groups for i, t in enumerate(g.trajectories) if t.turns == 2]
    assert two
    holes = (exp.mask[:, :-1] > exp.mask[:, 1:]).sum(-1) * (exp.attention_mask[:, exp.prompt_width + 1:].sum(-1) > 0)
    assert (holes > 0).any()  # the environment's tokens sit between policy tokens, out of the mask
    assert metrics["logprob_gap"] < 1e-4  # every policy token of every turn: the sampler's log-prob is the trainer's
    assert samples[0]["turns"][0]["role"] == "assistant" and "turn_rewards" in samples[0]
    flat = [t for g in groups for t in g.trajectories]
    assert [float(x) for x in torch.cat([g.scores for g in groups])] == pytest.approx(
        [t.score - (0.0 if t.answer().finished else 1.0) for t in flat])


def test_multi_turn_resume_equals_uninterrupted(env_config, monkeypatch, tmp_path):
    grpo.run(env_config(output_dir=str(tmp_path / "full"), train__max_steps=3))
    crashed = env_config(output_dir=str(tmp_path / "crashed"), train__max_steps=3)
    crash_then_resume(grpo.run, crashed, monkeypatch, at_step=3)  # inside step 2 (2 optimizer steps per step)
    a, b = load_file(tmp_path / "full" / "adapter_model.safetensors"), load_file(tmp_path / "crashed" /
                                                                                  "adapter_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert all("env/turns" in r and "env/tool_calls" in r for r in rows if "loss" in r)


def test_env_config_errors(env_config, monkeypatch):
    with pytest.raises(ConfigError, match="the environment scores each trajectory"):
        grpo.setup(env_config(reward__judges={"lenjudge:fn": 1.0}))
    from llmft import distributed

    monkeypatch.setattr(distributed, "fsdp", lambda: True)
    with pytest.raises(ConfigError, match=r"env: a multi-turn rollout is not offered under FSDP yet; launch without"):
        grpo.setup(env_config())
