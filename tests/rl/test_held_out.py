"""Held-out evaluation during RL: independent judges beside the training reward, the KL of the greedy answers to
the reference (0 before the first update), every answer with its scores in eval_samples.jsonl, one clear error
for a judge the held-out rows cannot feed, and alarm.independent naming a logged score."""

from __future__ import annotations

import json

import pytest
import torch

from llmft.errors import ConfigError, DataError
from llmft.judges.text import rouge_l
from llmft.stages import grpo, ppo


def lines(path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


@pytest.fixture
def held_out(grpo_config, tmp_path):
    def write(**overrides):
        cfg = grpo_config(**{"train__eval_every": 1, "eval__judges": ["rouge_l", "constraints"], **overrides})
        cfg.data.eval = cfg.data.train
        return cfg

    return write


def test_grpo_logs_independent_judges_kl_and_every_answer(held_out, tmp_path):
    grpo.run(held_out())
    rows = [r for r in lines(tmp_path / "grpo" / "metrics.jsonl") if "eval/reward" in r]
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert rows[0]["eval/kl"] == 0.0 and rows[-1]["eval/kl"] != 0.0  # the fresh adapter starts at the reference
    answers = lines(tmp_path / "grpo" / "eval_samples.jsonl")
    prompts = 8  # ROWS
    assert [a["step"] for a in answers] == [s for s in (0, 1, 2) for _ in range(prompts)]
    source = [json.loads(x) for x in (tmp_path / "prompts.jsonl").read_text().splitlines()]
    for a, row in zip(answers[-prompts:], source, strict=True):  # each answer scored against its own reference
        assert a["prompt"] == row["prompt"] and a["rouge_l"] == pytest.approx(rouge_l(a["response"], row["completion"]))
    last = answers[-prompts:]
    assert rows[-1]["eval/rouge_l"] == pytest.approx(sum(a["rouge_l"] for a in last) / prompts)
    assert rows[-1]["eval/constraints/pass_rate"] == pytest.approx(sum(a["constraints"] == 1.0 for a in last) / prompts)
    assert rows[-1]["eval/kl"] == pytest.approx(sum(a["kl"] for a in last) / prompts, rel=1e-5)


def test_ppo_watches_the_same_way(ppo_config, tmp_path):
    cfg = ppo_config(train__eval_every=2, eval__judges=["rouge_l"], alarm__independent="eval/rouge_l")
    cfg.data.eval = cfg.data.train
    ppo.run(cfg)
    rows = [r for r in lines(tmp_path / "ppo" / "metrics.jsonl") if "eval/rouge_l" in r]
    assert [r["step"] for r in rows] == [0, 2] and all("eval/kl" in r for r in rows)
    steps = [r for r in lines(tmp_path / "ppo" / "metrics.jsonl") if "objective/kl" in r]  # the reward model's range
    assert len(steps) == 2 and all(0 <= r["rewards/reward_model/out_of_range"] <= 1 for r in steps)


def test_held_out_errors(held_out, grpo_config):
    with pytest.raises(ConfigError, match="eval.judges and eval.select_by need held-out answers: set data.eval"):
        grpo.setup(grpo_config(eval__judges=["rouge_l"]))
    with pytest.raises(DataError, match="the bleu judge needs a text column 'answer'"):
        grpo.setup(held_out(eval__judges=["bleu"], eval__reference_column="answer"))
    with pytest.raises(ConfigError, match="unknown judge 'rhyme'"):
        grpo.setup(held_out(eval__judges=["rhyme"]))
    with pytest.raises(ConfigError, match="alarm.independent: the held-out evaluation logs no eval/bleu; it logs"):
        grpo.run(held_out(alarm__independent="eval/bleu"))


def test_the_plan_states_the_evaluation_and_its_cost(held_out, capsys):
    grpo.run(held_out(), dry_run=True)
    out = " ".join(capsys.readouterr().err.replace("│", " ").split())  # the table's cells, wrapped, as one text
    # 8 prompts × 3 evaluations against 2 steps × 8 answers: 24 / (24 + 16)
    assert "8 prompts, greedy, at step 0 and every step (3 times); judges rouge_l, constraints; about 60%" in out


@pytest.mark.parametrize("mode", ["max", "min"])
def test_the_best_policy_by_an_independent_score_is_kept_and_loads(mode, held_out, talking_dir, tmp_path):
    """GRPO on a length judge moves away from the references, so ROUGE-L falls: the best by max is the start (the
    fresh adapter, B = 0), by min a later step (the weights the same run stopped there writes); either is a stage
    output a later stage names."""
    from safetensors.torch import load_file

    from llmft.models.loading import load_chat
    from llmft.models.sources import resolve_source

    common = {"model__name": str(talking_dir), "train__learning_rate": 3e-2, "train__scheduler": "constant",
              "rollout__max_new_tokens": 12}
    grpo.run(held_out(eval__select_by="eval/rouge_l", eval__select_mode=mode, train__max_steps=4, **common))
    run = tmp_path / "grpo"
    rows = [r for r in lines(run / "metrics.jsonl") if "eval/rouge_l" in r]
    values = [r["eval/rouge_l"] for r in rows]
    pick = max(values) if mode == "max" else min(values)
    best_step = rows[values.index(pick)]["step"]
    assert len(set(values)) > 1 and (best_step == 0) == (mode == "max")  # the start is the best by ROUGE-L
    manifest = json.loads((run / "llmft.json").read_text())
    assert manifest["metrics"]["best/step"] == best_step and manifest["metrics"]["best/value"] == pick
    assert json.loads((run / "best" / "llmft.json").read_text())["metrics"]["best/step"] == best_step
    assert load_chat(resolve_source(str(run / "best"))).tokenizer is not None
    best = load_file(run / "best" / "adapter_model.safetensors")
    if best_step == 0:
        assert all(not t.any() for k, t in best.items() if "lora_B" in k)
    else:  # the same run stopped at that step wrote the same weights
        grpo.run(held_out(train__max_steps=best_step, output_dir=str(tmp_path / "short"), **common))
        short = load_file(tmp_path / "short" / "adapter_model.safetensors")
        assert all(torch.equal(best[k], short[k]) for k in best)
