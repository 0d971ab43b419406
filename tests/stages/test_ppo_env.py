"""PPO with a multi-turn environment (`talking_dir`: a tiny model that ends its turns): each turn's reward sits on
its last policy token (scaled by the reward normalisation) and the placed rewards sum to the optimised score, the
sampler's log-probs equal the trainer's over every turn, rows without a prompt (the environment builds it), and
resume equals the uninterrupted run. GAE over policy tokens only is checked by hand in tests/maths/test_rl.py."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from llmft.stages import ppo
from tests.helpers.runs import crash_then_resume

WORDS = ["sea", "sky", "tree", "stone", "river", "cloud", "leaf", "sand"]


@pytest.fixture
def env_config(ppo_config, talking_dir, tmp_path):
    rows = tmp_path / "words.jsonl"
    rows.write_text("".join(json.dumps({"word": w}) + "\n" for w in WORDS))

    def write(**overrides):
        return ppo_config(**{"model__name": str(talking_dir), "data__train": str(rows), "reward__model": None,
                             "env__name": "tests.helpers.envs:Opening", "env__max_tokens": 48,
                             "rollout__max_new_tokens": 12, "rollout__temperature": 1.0, **overrides})

    return write


@pytest.mark.parametrize("normalize", [False, True])
def test_each_turn_reward_lands_on_its_last_policy_token(env_config, normalize):
    s = ppo.setup(env_config(reward__normalize=normalize))
    model = ppo.build_model(s)
    exp, parts, score, trajectories = ppo.rollout(model, s, [0, 1, 2, 3], 1)
    exp.put(scores=s.scorer.shape(score))
    placed = ppo.placed_scores(s, exp, trajectories)  # [B, R]
    c = 1 / s.scorer.moments.std if normalize else 1.0  # the normalisation's scale, after this batch's update
    assert any(t.turns == 2 for t in trajectories) and (c != 1.0) == normalize
    torch.testing.assert_close(placed.sum(-1), exp.scores)  # the return of the first token is the score (γ = 1)
    mask = exp.mask.cpu()
    for b, t in enumerate(trajectories):
        assert t.ends == [k for k in range(len(t.ids)) if t.mask[k] and (k + 1 == len(t.ids) or not t.mask[k + 1])]
        expected = torch.zeros(mask.shape[1])
        for end, r in zip(t.ends, t.turn_scores, strict=True):
            expected[end] += c * r
        # the rest at the last turn's end: the penalty for no stop id, the normalisation's shift
        expected[t.ends[-1]] += float(exp.scores[b]) - c * sum(t.turn_scores)
        torch.testing.assert_close(placed[b].cpu(), expected)
        assert all(mask[b, e] == 1 for e in t.ends)


def test_multi_turn_ppo_step_sampler_equals_trainer(env_config):
    s = ppo.setup(env_config(ppo__num_minibatches=1, train__grad_accum=2))
    model = ppo.build_model(s)
    metrics, samples = ppo.ppo_step(model, s, [0, 1, 2, 3], lambda loss: 0.0, 1)
    assert metrics["env/turns"] > 1 and metrics["logprob_gap"] < 1e-4
    assert samples[0]["prompt"].startswith("say ") and samples[0]["turns"][0]["role"] == "assistant"


def test_multi_turn_ppo_resume_equals_uninterrupted(env_config, monkeypatch, tmp_path):
    ppo.run(env_config(output_dir=str(tmp_path / "full"), train__max_steps=2))
    crashed = env_config(output_dir=str(tmp_path / "crashed"), train__max_steps=2)
    crash_then_resume(ppo.run, crashed, monkeypatch, at_step=5)  # in step 2 (4 optimizer steps per step)
    for name in ("adapter_model.safetensors", "value/adapter_model.safetensors"):
        a, b = load_file(tmp_path / "full" / name), load_file(tmp_path / "crashed" / name)
        assert all(torch.equal(a[k], b[k]) for k in a)
    rows = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert all("env/turns" in r for r in rows if "loss" in r)
