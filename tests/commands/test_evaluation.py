"""`llmft eval`: hand-derived judge values, log-probs, KL = 0 against itself, win rates, bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from llmft.commands.evaluation import win_rate
from llmft.data.examples import Example, collate
from llmft.judges.text import bleu, rouge_l
from llmft.models.logprobs import sequence_logps
from tests.helpers.cli import assert_one_line_error, llmft


def test_bleu_by_hand():
    # p1 = 5/6, p2 = (3+1)/(5+1), p3 = (1+1)/(4+1), p4 = (0+1)/(3+1), equal lengths → BP = 1
    expected = (5 / 6 * 4 / 6 * 2 / 5 * 1 / 4) ** 0.25
    assert bleu("the cat sat on the mat", "the cat is on the mat") == pytest.approx(expected)
    assert bleu("the cat is on the mat", "The cat is on the mat") == pytest.approx(1.0)
    assert bleu("dog", "the cat") == 0.0
    short = bleu("the cat", "the cat is on the mat")  # brevity penalty exp(1 - 6/2)
    assert short == pytest.approx(math.exp(-2) * (1 * (2 / 2)) ** 0.25 * (1 / 1 * 1 / 1) ** 0.25)


def test_rouge_l_by_hand():
    # LCS("the cat sat", "the cat on the mat") = 2 → P = 2/3, R = 2/5, F1 = 0.5
    assert rouge_l("the cat sat", "the cat on the mat") == pytest.approx(0.5)
    assert rouge_l("a b c", "a b c") == pytest.approx(1.0) and rouge_l("x", "a b") == 0.0


def test_win_rate_counts_ties_half():
    assert win_rate([1, 0.5, 0, 1], [0, 0.5, 1, 0.5]) == pytest.approx((1 + 0.5 + 0 + 1) / 4)


def test_sequence_logps_match_the_full_softmax_and_ignore_padding(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    short = Example([1, 5, 9, 14], [-100, -100, 9, 14])
    long = Example([1, 5, 7, 8, 9, 10, 11], [-100, -100, -100, 8, 9, 10, 11])
    alone = sequence_logps(model, **collate([short], 2))
    for side in ("right", "left"):
        together = sequence_logps(model, **collate([short, long], 2, side=side))
        torch.testing.assert_close(together[0], alone[0], rtol=1e-5, atol=1e-5)
    logp = torch.log_softmax(model(torch.tensor([short.input_ids])).logits[0].float(), -1)
    by_hand = logp[1, 9] + logp[2, 14]  # position t predicts token t+1
    torch.testing.assert_close(alone[0], by_hand, rtol=1e-5, atol=1e-5)


@pytest.fixture
def prompts_file(tmp_path):
    rows = [{"prompt": "write three words about the sea", "completion": "the sea is deep",
             "constraints": [{"type": "lowercase"}, {"type": "max_words", "n": 5}]},
            {"prompt": "hello", "completion": "hello world", "constraints": [{"type": "no_commas"}]},
            {"prompt": "the lazy dog", "completion": "a lazy dog", "constraints": [{"type": "min_words", "n": 2}]}]
    path = tmp_path / "eval.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_eval_reports_every_figure_and_kl_zero_against_itself(capsys, monkeypatch, tiny_model_dir, sft_data,
                                                              write_config, prompts_file, tmp_path):
    from llmft.config import load_config
    from llmft.stages import sft

    sft.run(load_config("sft", write_config(tiny_model_dir, sft_data, train__max_steps=4)))
    out = tmp_path / "report.json"
    code, _, err = llmft(capsys, monkeypatch, "eval", "--model", tiny_model_dir, "--compare", tmp_path / "run",
                         "--prompts", prompts_file, "--reference", tiny_model_dir, "--out", out,
                         "--set", "judges=[constraints, bleu, rouge_l, meteor]", "--set", "sampling.max_new_tokens=6")
    assert code == 0, err
    report = json.loads(out.read_text())
    base, tuned = report["models"][str(tiny_model_dir)], report["models"][str(tmp_path / "run")]
    for m in (base, tuned):
        assert {"constraints/pass_rate", "constraints/score", "bleu", "rouge_l", "meteor", "kl_to_reference",
                "length", "eos_share"} <= set(m)
        assert 0 <= m["constraints/pass_rate"] <= m["constraints/score"] <= 1 and 0 < m["length"] <= 6
    assert base["kl_to_reference"] == 0.0  # the reference scoring its own responses
    assert tuned["kl_to_reference"] != 0.0
    rates = report["win_rates"][f"{tmp_path / 'run'} vs {tiny_model_dir}"]
    assert set(rates) == {"constraints", "bleu", "rouge_l", "meteor"} and all(0 <= r <= 1 for r in rates.values())
    assert report["meteor_matches"].startswith("exact, stem")
    assert len(report["samples"][str(tiny_model_dir)]) == 3
    for name, m in report["models"].items():  # passed = every constraint met = constraints score 1.0
        samples = report["samples"][name]
        assert m["constraints/pass_rate"] == pytest.approx(sum(x["constraints"] == 1.0 for x in samples) / 3)
        for x in samples:  # the constraints judge says what is wrong; bleu, rouge_l and meteor only score
            assert (x["critique"] == "") == (x["constraints"] == 1.0), x
            assert all(part.startswith(("the reply", "the request")) for part in x["critique"].split("; ") if part)


def bad_judge(prompts, responses, rows):
    return [1.0]  # one score for several responses


def raising_judge(prompts, responses, rows):
    raise ValueError("boom")


@pytest.mark.parametrize("args, expected", [
    (["--set", "judges=[rhyme]"], "unknown judge 'rhyme'"),
    (["--set", "judges=[tests.commands.test_evaluation:bad_judge]"], "must return one finite number per answer (3)"),
    (["--set", "judges=[tests.commands.test_evaluation:raising_judge]"], "raised ValueError: boom"),
    (["--set", "judges=[nosuchmodule:f]"], "cannot import f from nosuchmodule"),
    (["--set", "judges=[bleu]", "--set", "reference_column=answer"], "needs a text column 'answer'"),
    (["--set", "sampling.temperature=-1"], "'sampling.temperature' must be >= 0"),
    (["--set", "judges=[constraints, reward]"], "judge 'reward' needs reward_model"),
])
def test_eval_bad_input(args, expected, capsys, monkeypatch, tiny_model_dir, prompts_file):
    monkeypatch.syspath_prepend(str(prompts_file.parents[0]))
    code, _, err = llmft(capsys, monkeypatch, "eval", "--model", tiny_model_dir, "--prompts", prompts_file, *args)
    assert_one_line_error(code, err, expected)


def test_eval_rows_without_constraints_and_reference_tokenizer(capsys, monkeypatch, tiny_model_dir, tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "hi", "constraints": [{"type": "lowercase"}]}\n{"prompt": "hello"}\n')
    code, _, err = llmft(capsys, monkeypatch, "eval", "--model", tiny_model_dir, "--prompts", path)
    assert_one_line_error(code, err, "p.jsonl:2: the constraints judge needs a 'constraints' column")

    from tests.helpers.tiny import build_model, build_tokenizer

    other = tmp_path / "other"
    tok = build_tokenizer()
    tok.add_tokens(["zebra"])
    build_model(len(tok)).save_pretrained(other)
    tok.save_pretrained(other)
    path.write_text('{"prompt": "hi", "constraints": [{"type": "lowercase"}]}\n')
    code, _, err = llmft(capsys, monkeypatch, "eval", "--model", tiny_model_dir, "--prompts", path,
                         "--reference", other, "--set", "sampling.max_new_tokens=2")
    assert_one_line_error(code, err, "has another tokenizer than policy")
    assert "generating" not in err  # found before any generation


def test_eval_needs_a_model(capsys, monkeypatch, tmp_path):
    code, _, err = llmft(capsys, monkeypatch, "eval", "--prompts", tmp_path / "p.jsonl")
    assert_one_line_error(code, err, "name at least one model")
    code, _, err = llmft(capsys, monkeypatch, "eval", "--preferences", tmp_path / "p.jsonl")
    assert_one_line_error(code, err, "set reward_model")


def test_the_eval_table_keeps_metric_names_whole_in_an_80_column_log():
    import io

    from rich.console import Console

    from llmft.commands.evaluation import show

    names = ["smollm2-135m-instruct", "runs/sft", "runs/dpo", "runs/ppo", "runs/grpo", "runs/grpo-full-seed43", "x"]
    metrics = ["constraints/pass_rate", "constraints/score", "kl_to_reference", "eos_share"]
    report = {"models": {n: {m: -0.123456 * i for m in metrics} | {"reward": -0.04241} for i, n in enumerate(names)},
              "win_rates": {f"{n} vs {names[0]}": {"constraints": 0.5} for n in names[1:]}}
    for shown in (names[:5], names):
        console = Console(width=80, file=io.StringIO(), record=True)
        show({"models": {n: report["models"][n] for n in shown}, "win_rates": report["win_rates"]}, console)
        text = console.export_text()
        assert max(len(line) for line in text.splitlines()) <= 80
        assert "-0.04241 " in text  # a cell is never wrapped
        for m in [*metrics, "win rate (constraints)"]:
            assert text.count(f"│ {m} ") == text.count("┏")  # whole, once in each table
        assert text.count("-0.4938") == len(metrics) and ("-0.7407" in text) == (len(shown) == 7)  # every model


def test_summed_answer_logps_count_the_policy_tokens_only(tiny_model_dir):
    from llmft.config import SamplingConfig
    from llmft.rollout.generation import Answer
    from llmft.run.held_out import answer_logps

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    prompt, answer = [1, 5, 9], [14, 20, 21, 7]
    turns = Answer(prompt, answer, "", True, mask=[1, 0, 0, 1])  # 20, 21: the environment's tokens
    logp = torch.log_softmax(model(torch.tensor([prompt + answer])).logits[0].float(), -1)
    by_hand = logp[2, 14] + logp[5, 7]  # position t predicts token t+1
    whole = sum(logp[2 + k, t] for k, t in enumerate(answer))
    got = answer_logps(model, [turns, Answer(prompt, answer, "", True)], 0, SamplingConfig(), "cpu")
    torch.testing.assert_close(got, torch.stack([by_hand, whole]), rtol=1e-5, atol=1e-5)


def test_eval_runs_an_environment_greedily_on_held_out_rows(capsys, monkeypatch, talking_dir, tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["hi", "tell me more", "a story"]))
    out = tmp_path / "report.json"
    args = ["eval", "--model", talking_dir, "--prompts", path, "--reference", talking_dir, "--out", out,
            "--set", "env.name=tests.helpers.envs:TwoTurns", "--set", "env.max_tokens=48",
            "--set", "sampling.max_new_tokens=12"]
    code, _, err = llmft(capsys, monkeypatch, *args)
    assert code == 0, err
    report = json.loads(out.read_text())
    m, samples = report["models"][str(talking_dir)], report["samples"][str(talking_dir)]
    assert {"env", "env/turns", "env/tool_calls", "env/cut_ratio", "env/error_ratio", "kl_to_reference"} <= set(m)
    assert m["kl_to_reference"] == 0.0 and "constraints/score" not in m
    assert m["env/turns"] == pytest.approx(sum(len(s["turn_rewards"]) for s in samples) / 3)
    assert m["env/turns"] > 1  # the environment's "go on" was answered
    for s in samples:  # the score is the sum of the turns' rewards; the turns hold the observation between them
        assert s["env"] == pytest.approx(0.0 if s["error"] else sum(s["turn_rewards"]))
        assert s["turns"][0]["role"] == "assistant" and s["prompt"] in {"hi", "tell me more", "a story"}
    assert any(t["role"] == "user" and t["content"] == "go on" for s in samples for t in s["turns"])
    code, _, err = llmft(capsys, monkeypatch, *args)
    assert code == 0 and json.loads(out.read_text())["samples"] == report["samples"]  # greedy: the same again
    code, _, err = llmft(capsys, monkeypatch, *args, "--set", "reward_model=x")
    assert_one_line_error(code, err, "the environment scores each conversation")
