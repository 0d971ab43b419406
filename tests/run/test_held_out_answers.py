"""Held-out answers during sft, dpo and kto (eval.prompts): greedy answers judged by what the stage does not train on,
their KL to the starting model (0 before the first update), every answer in eval_samples.jsonl, the cost in the plan,
the best policy by an independent score in best/, and one clear error for what cannot work."""

from __future__ import annotations

import json

import pytest

from llmft import manifest
from llmft.config import load_config
from llmft.errors import ConfigError, DataError, RunError
from llmft.judges.constraints import Verdict, check
from llmft.judges.text import rouge_l
from llmft.run.held_out import resumed_best
from llmft.stages import dpo, kto, sft
from tests.helpers.tiny import ROWS


def lines(path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


@pytest.fixture
def held_out(tmp_path):
    path = tmp_path / "held_out.jsonl"
    path.write_text("".join(json.dumps({**r, "constraints": [{"type": "lowercase"}]}) + "\n" for r in ROWS[:4]))
    return path


def config(stage, write_config, model, data, held_out, **overrides):
    settings = {"eval__prompts": str(held_out), "eval__judges": ["rouge_l", "constraints"], "eval__max_new_tokens": 8,
                "train__eval_every": 1, "train__max_steps": 2, "train__epochs": 1}
    return load_config(stage, write_config(model, data, **{**settings, **overrides}))


def test_sft_judges_its_greedy_answers_beside_its_eval_loss(write_config, tiny_model_dir, sft_data, held_out, tmp_path):
    cfg = config("sft", write_config, tiny_model_dir, sft_data, held_out, data__eval=str(sft_data),
                 lora__dropout=0.1)
    sft.run(cfg)
    rows = [r for r in lines(tmp_path / "run" / "metrics.jsonl") if "eval/rouge_l" in r]
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert all("eval/loss" in r for r in rows)  # the stage's own evaluation, in the same row
    assert rows[0]["eval/kl"] == 0.0 and rows[-1]["eval/kl"] != 0.0  # the fresh adapter starts at the base; dropout off
    answers = lines(tmp_path / "run" / "eval_samples.jsonl")
    assert [a["step"] for a in answers] == [s for s in (0, 1, 2) for _ in range(4)]
    last = answers[-4:]
    for a, row in zip(last, ROWS[:4], strict=True):
        assert a["prompt"] == row["prompt"] and a["rouge_l"] == pytest.approx(rouge_l(a["response"], row["completion"]))
        assert a["constraints"] == Verdict(check([{"type": "lowercase"}], a["response"])).score
    assert rows[-1]["eval/rouge_l"] == pytest.approx(sum(a["rouge_l"] for a in last) / 4)
    assert rows[-1]["eval/constraints/pass_rate"] == pytest.approx(sum(a["constraints"] == 1.0 for a in last) / 4)
    assert rows[-1]["eval/kl"] == pytest.approx(sum(a["kl"] for a in last) / 4, rel=1e-5)
    assert 0 <= rows[-1]["eval/completions/clipped_ratio"] <= 1 and rows[-1]["eval/completions/mean_length"] <= 8


def test_dpo_keeps_its_best_policy_by_an_independent_score(write_config, tiny_model_dir, pref_data, held_out,
                                                           tmp_path):
    cfg = config("dpo", write_config, tiny_model_dir, pref_data, held_out, data__eval=str(pref_data),
                 eval__select_by="eval/kl", eval__select_mode="max", train__max_steps=3, loss__beta=0.5)
    dpo.run(cfg)
    rows = [r for r in lines(tmp_path / "run" / "metrics.jsonl") if "eval/kl" in r]
    assert all("eval/rewards/accuracies" in r for r in rows)  # the pair evaluation and the answers, one row
    kls = [r["eval/kl"] for r in rows]
    best_step = [r["step"] for r in rows][kls.index(max(kls))]
    record = manifest.read(tmp_path / "run" / "best")
    assert record["stage"] == "dpo" and record["metrics"]["best/step"] == best_step == rows[-1]["best/step"]
    assert record["metrics"]["best/value"] == max(kls)
    assert manifest.read(tmp_path / "run")["metrics"]["best/step"] == best_step


def test_kto_answers_too_and_the_plan_states_them(write_config, tiny_model_dir, pref_data, held_out, tmp_path, capsys):
    cfg = config("kto", write_config, tiny_model_dir, pref_data, held_out, eval__judges=["meteor"])
    kto.run(cfg, dry_run=True)
    out = " ".join(capsys.readouterr().err.replace("│", " ").split())
    assert "4 prompts of" in out and "greedy, up to 8 tokens, at step 0 and every step (3 times); judges meteor" in out
    kto.run(cfg)
    rows = [r for r in lines(tmp_path / "run" / "metrics.jsonl") if "eval/meteor" in r]
    assert [r["step"] for r in rows] == [0, 1, 2] and rows[0]["eval/kl"] == 0.0


def test_what_cannot_work_is_one_clear_error(write_config, tiny_model_dir, sft_data, held_out, tmp_path):
    with pytest.raises(ConfigError, match="eval.judges need eval.prompts"):
        sft.setup(config("sft", write_config, tiny_model_dir, sft_data, held_out, eval__prompts=None))
    with pytest.raises(ConfigError, match="eval.select_by needs an evaluation: data.eval or eval.prompts"):
        sft.setup(config("sft", write_config, tiny_model_dir, sft_data, held_out, eval__prompts=None,
                         eval__judges=[], eval__select_by="eval/loss"))
    with pytest.raises(DataError, match="the bleu judge needs a text column 'answer'"):
        sft.setup(config("sft", write_config, tiny_model_dir, sft_data, held_out, eval__judges=["bleu"],
                         eval__reference_column="answer"))
    with pytest.raises(ConfigError, match="eval.select_by: the held-out evaluation logs no eval/bleu"):
        sft.run(config("sft", write_config, tiny_model_dir, sft_data, held_out, eval__select_by="eval/bleu"))


def test_sft_can_keep_its_best_by_eval_loss_alone(write_config, tiny_model_dir, sft_data, tmp_path):
    cfg = load_config("sft", write_config(tiny_model_dir, sft_data, data__eval=str(sft_data), train__eval_every=1,
                                          train__max_steps=3, eval__select_by="eval/loss", eval__select_mode="min"))
    sft.run(cfg)
    rows = [r for r in lines(tmp_path / "run" / "metrics.jsonl") if "eval/loss" in r]
    losses = [r["eval/loss"] for r in rows]
    assert manifest.read(tmp_path / "run" / "best")["metrics"]["best/value"] == min(losses)
    assert not (tmp_path / "run" / "eval_samples.jsonl").exists()  # no prompts, no answers


def test_a_best_written_after_the_resumed_checkpoint_is_removed(write_config, tiny_model_dir, sft_data, tmp_path):
    """What a kill leaves: best/ of step 3, the last checkpoint of step 2. The resumed run forgets it (its own
    stretch after step 2 decides); a best/ of step 2 or before is the checkpoint's own and stays."""
    cfg = load_config("sft", write_config(tiny_model_dir, sft_data, data__eval=str(sft_data), train__eval_every=1,
                                          train__max_steps=3, eval__select_by="eval/loss", eval__select_mode="min"))
    sft.run(cfg)
    best = tmp_path / "run" / "best"
    step = manifest.read(best)["metrics"]["best/step"]
    kept = {"step": step, "value": 1.0}
    assert resumed_best(cfg_holder(cfg), kept, step) == kept and best.is_dir()
    assert resumed_best(cfg_holder(cfg), kept, step - 1) == {"step": None, "value": None} and not best.exists()


def test_an_overwrite_deletes_an_llmft_best_but_never_a_users_folder(write_config, tiny_model_dir, sft_data,
                                                                     tmp_path):
    settings = dict(data__eval=str(sft_data), train__eval_every=1, train__max_steps=2, eval__select_by="eval/loss",
                    eval__select_mode="min")
    sft.run(load_config("sft", write_config(tiny_model_dir, sft_data, **settings)))
    best = tmp_path / "run" / "best"
    assert manifest.read(best)
    other = load_config("sft", write_config(tiny_model_dir, sft_data, **{**settings, "eval__select_by": None,
                                                                         "overwrite": True}))
    sft.run(other)
    assert not best.exists()  # the earlier run's best policy went with it
    best.mkdir()
    (best / "notes.txt").write_text("mine")
    again = {**settings, "overwrite": True, "train__learning_rate": 1e-3}
    with pytest.raises(RunError, match="best holds files that are not an llmft output: move them"):
        sft.run(load_config("sft", write_config(tiny_model_dir, sft_data, **again)))  # never writes into it
    assert (best / "notes.txt").read_text() == "mine" and list(best.iterdir()) == [best / "notes.txt"]


def cfg_holder(cfg):
    class S:
        pass

    s = S()
    s.cfg = cfg
    return s


def test_keep_best_writes_only_when_an_evaluation_beats_the_best_so_far(tmp_path, monkeypatch):
    from llmft.run import held_out, loop

    written = []
    monkeypatch.setattr(loop, "write_output", lambda out, s, stage, model, metrics, data: written.append(metrics))
    s = cfg_holder(type("C", (), {"eval": type("E", (), {"select_by": "eval/rouge_l", "select_mode": "max"}),
                                  "output_dir": str(tmp_path)})())
    s.data, best = [], {"step": None, "value": None}
    seen = [held_out.keep_best("sft", s, None, step, {"eval/rouge_l": v}, best)
            for step, v in ((0, 0.3), (2, 0.5), (4, 0.4), (6, 0.5))]
    assert [m["best/step"] for m in written] == [0, 2]  # 0.4 and a tie at 0.5 do not replace step 2
    assert seen[-1] == {"best/step": 2, "best/value": 0.5}


def test_held_out_answers_leave_the_model_training_and_answer_without_dropout(write_config, tiny_model_dir, sft_data,
                                                                            held_out):
    """With LoRA dropout 0.5 and a moved adapter, two evaluations agree (dropout off while answering) and the model
    is back in training mode after each (dropout on for the next step)."""
    import torch

    cfg = config("sft", write_config, tiny_model_dir, sft_data, held_out, lora__dropout=0.5)
    s = sft.setup(cfg)
    model = sft.build_model(s)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
    model.train()
    first = s.held_out.evaluate(model, 0)
    assert model.training and first["eval/kl"] != 0.0
    assert s.held_out.evaluate(model, 1) == first and model.training
