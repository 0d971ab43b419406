"""The reward stage: hand-derived losses, preference data, padding invariance, checkpoints and the scorer."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from llmft.config import load_config
from llmft.data.preferences import collate_pairs, to_pairs, tokenize_pairs
from llmft.data.records import Record
from llmft.errors import ConfigError, DataError, ModelError
from llmft.models.reward_model import RewardModel, RewardScorer
from llmft.stages import reward
from tests.helpers.runs import crash_then_resume, train_in_process

# ------------------------------------------------------------------------------------------------ losses






# ---------------------------------------------------------------------------------------------- data
def rec(**row) -> Record:
    return Record(row, "prefs.jsonl:3")


def test_pair_formats_strings_messages_implicit_prompt_and_ranked():
    [p] = to_pairs(rec(prompt="hi", chosen="good", rejected="bad", margin=2), "pairs")
    assert (p.prompt, p.chosen, p.rejected, p.margin) == ([{"role": "user", "content": "hi"}], "good", "bad", 2.0)
    conv = [{"role": "user", "content": "hi"}]
    [p] = to_pairs(rec(chosen=[*conv, {"role": "assistant", "content": "good"}],
                       rejected=[*conv, {"role": "assistant", "content": "bad"}]), "pairs")
    assert (p.prompt, p.chosen, p.rejected, p.margin) == (conv, "good", "bad", None)
    pairs = to_pairs(rec(prompt="hi", responses=["a", "b", "c"]), "ranked")
    assert [(p.chosen, p.rejected) for p in pairs] == [("a", "b"), ("a", "c"), ("b", "c")]


@pytest.mark.parametrize("row, message", [
    ({"prompt": "hi", "chosen": "good"}, "prefs.jsonl:3: missing field 'rejected'"),
    ({"prompt": "hi", "chosen": " ", "rejected": "bad"}, "prefs.jsonl:3: field 'chosen' is empty"),
    ({"prompt": "hi", "chosen": "a", "rejected": "b", "margin": "big"}, "'margin' must be a finite number"),
    ({"chosen": "a", "rejected": "b"}, "no prompt"),
    ({"chosen": [{"role": "user", "content": "x"}], "rejected": "b"}, "must end with an assistant turn"),
])
def test_bad_pair_rows_name_the_row(row, message):
    with pytest.raises(DataError, match=message):
        to_pairs(rec(**row), "pairs")


def test_identical_and_too_long_pairs_are_dropped_and_counted(tiny_tokenizer, tiny_chat):
    rows = [rec(prompt="hi", chosen="same", rejected="same"), rec(prompt="hi", chosen="the sea", rejected="a dog"),
            rec(prompt="hi", chosen="the sea " * 40, rejected="a dog")]
    ps = tokenize_pairs(rows, tiny_chat, "pairs", max_length=48)
    assert (len(ps.pairs), ps.identical, ps.too_long) == (1, 1, 1)
    p = ps.pairs[0]
    assert p.chosen_ids[-1] == tiny_tokenizer.eos_token_id  # EOS closes every response, even with pad == eos
    with pytest.raises(DataError, match="no usable preference pair"):
        tokenize_pairs(rows[:1], tiny_chat, "pairs", max_length=48)


def test_several_data_files_are_read_in_order(tiny_chat, tiny_model_dir, pref_data, write_config, tmp_path):
    from llmft.data.preferences import load_pair_sets
    from llmft.run.loop import data_files

    other = tmp_path / "more.jsonl"
    other.write_text(json.dumps({"prompt": "hi", "chosen": "the sea", "rejected": "a dog"}) + "\n")
    cfg = load_config("reward", write_config(tiny_model_dir, pref_data, data__train=[str(pref_data), str(other)],
                                             data__eval=[str(other)]))
    train, evals = load_pair_sets(cfg, tiny_chat)
    assert (train.rows, evals.rows) == (9, 1)
    assert train.pairs[-1].prompt_ids == evals.pairs[0].prompt_ids  # the second file's row comes last
    roles = [(d["role"], d["path"]) for d in data_files(cfg)]
    assert roles == [("train", str(pref_data)), ("train", str(other)), ("eval", str(other))]


# --------------------------------------------------------------------------------------------- model
def tiny_reward_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from llmft.config import LoraConfig
    from llmft.models.adapters import add_lora

    torch.manual_seed(0)
    lm = add_lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir), LoraConfig(r=4, alpha=8, dropout=0.0))
    for n, p in lm.named_parameters():  # a non-trivial adapter: B starts at zero
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.5)
    return RewardModel(lm).eval()


def test_reward_is_identical_under_left_and_right_padding(tiny_model_dir, tiny_tokenizer, tiny_chat):
    rows = [rec(prompt="write two words about the sea", chosen="the sea is blue", rejected="hello"),
            rec(prompt="hi", chosen="the quick brown fox jumps over the lazy dog", rejected="a")]
    pairs = tokenize_pairs(rows, tiny_chat, "pairs", 64).pairs
    model = tiny_reward_model(tiny_model_dir)
    pad = tiny_tokenizer.pad_token_id

    def score(batch: dict) -> torch.Tensor:
        return model(batch["input_ids"], batch["attention_mask"])

    with torch.no_grad():
        right, left = score(collate_pairs(pairs, pad, "right")), score(collate_pairs(pairs, pad, "left"))
        alone = torch.cat([score(collate_pairs([p], pad)) for p in pairs])
    assert torch.allclose(right, left, atol=1e-5) and right.std() > 0
    assert torch.allclose(right.view(2, 2).T.flatten(), alone, atol=1e-5)  # batch rows = [c1, c2, r1, r2]


def test_head_init_follows_the_reference(tiny_model_dir):
    model = tiny_reward_model(tiny_model_dir)
    assert model.head.weight.shape == (1, 32) and torch.all(model.head.bias == 0)
    assert model.head.weight.dtype == torch.float32


# ------------------------------------------------------------------------------------------------ stage
def reward_config(write_config, tiny_model_dir, pref_data, **overrides):
    settings = dict(data__eval=str(pref_data), train__epochs=10, train__save_every=4, lora__dropout=0.0)
    return load_config("reward", write_config(tiny_model_dir, pref_data, **{**settings, **overrides}))


def test_training_learns_the_preferences_and_changes_only_lora_and_head(tiny_model_dir, pref_data, write_config):
    cfg = reward_config(write_config, tiny_model_dir, pref_data)
    model, before, metrics = train_in_process(reward, cfg)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n or n.startswith("head.") for n in changed)
    assert {"head.weight", "head.bias"} <= changed
    rows = [json.loads(line) for line in open(f"{cfg.output_dir}/metrics.jsonl")]
    first_eval = next(r for r in rows if r["step"] == 0)
    assert metrics["eval/accuracy"] == 1.0 and metrics["eval/loss"] < 0.5 * first_eval["eval/loss"]
    assert {"loss", "accuracy", "margin", "reward_mean", "reward_std", "pairs_per_s"} <= set(metrics)


def test_saved_head_and_adapter_reload_bit_identically_and_score_the_same(tiny_model_dir, pref_data, write_config):
    cfg = reward_config(write_config, tiny_model_dir, pref_data, train__epochs=3)
    reward.run(cfg)
    out = cfg.output_dir
    s = reward.setup(cfg)
    fresh = reward.build_model(s)
    fresh.load_trained(out)
    head = load_file(f"{out}/reward_head.safetensors")
    assert torch.equal(fresh.head.weight, head["weight"]) and torch.equal(fresh.head.bias, head["bias"])
    adapter = load_file(f"{out}/adapter_model.safetensors")
    live = {n.replace(".default", ""): p for n, p in fresh.lm.named_parameters() if "lora_" in n}
    assert len(adapter) == len(live) and all(torch.equal(live[k], v) for k, v in adapter.items())
    scorer = RewardScorer.load(out)  # merged adapter: equal up to float rounding
    pairs = s.eval.pairs
    with torch.no_grad():
        r_c, r_r = reward.rewards(fresh.eval(), collate_pairs(pairs, s.chat.pad_id), s.device, s.dtype)
    assert torch.allclose(scorer.score_ids([p.prompt_ids + p.chosen_ids for p in pairs]), r_c, atol=1e-4)
    texts = [json.loads(line) for line in open(pref_data)]
    assert torch.allclose(scorer.score([t["prompt"] for t in texts], [t["rejected"] for t in texts]), r_r, atol=1e-4)


def test_missing_or_mismatched_head_is_an_error(tiny_model_dir, pref_data, write_config, tmp_path):
    cfg = reward_config(write_config, tiny_model_dir, pref_data, train__epochs=1)
    reward.run(cfg)
    broken = tmp_path / "broken"
    shutil.copytree(cfg.output_dir, broken)
    (broken / "reward_head.safetensors").unlink()
    with pytest.raises(ModelError, match="no reward_head.safetensors"):
        RewardScorer.load(str(broken))
    save_file({"weight": torch.zeros(1, 16), "bias": torch.zeros(1)}, str(broken / "reward_head.safetensors"))
    with pytest.raises(ModelError, match="does not fit this model"):
        RewardScorer.load(str(broken))
    with pytest.raises(ModelError, match="is not a reward model"):
        RewardScorer.load(str(tiny_model_dir))
    from llmft.models.loading import load_model
    from llmft.models.sources import resolve_source

    with pytest.raises(ModelError, match="is a reward model"):  # never merged into a policy by mistake
        load_model(resolve_source(cfg.output_dir), torch.float32, torch.device("cpu"), cfg.model)


def test_resume_reproduces_the_uninterrupted_run(tiny_model_dir, pref_data, write_config, tmp_path, monkeypatch):
    settings = dict(train__batch_size=2, train__epochs=2, train__save_every=3)
    straight = reward_config(write_config, tiny_model_dir, pref_data, output_dir=str(tmp_path / "a"), **settings)
    reward.run(straight)
    cfg = reward_config(write_config, tiny_model_dir, pref_data, output_dir=str(tmp_path / "b"), **settings)
    crash_then_resume(reward.run, cfg, monkeypatch)  # killed between checkpoint-3 and checkpoint-6
    for name in ("adapter_model.safetensors", "reward_head.safetensors"):
        a, b = load_file(tmp_path / "a" / name), load_file(tmp_path / "b" / name)
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_lora_dropout_is_refused(tiny_model_dir, pref_data, write_config):
    cfg = reward_config(write_config, tiny_model_dir, pref_data, lora__dropout=0.1)
    with pytest.raises(ConfigError, match="lora.dropout"):
        reward.setup(cfg)


# ---------------------------------------------------------------------------------- command line and eval
def test_cli_trains_then_eval_reports_accuracy_reward_and_win_rates(capsys, monkeypatch, tiny_model_dir, pref_data,
                                                                    write_config, tmp_path):
    from tests.helpers.cli import llmft

    path = write_config(tiny_model_dir, pref_data, data__eval=str(pref_data), train__epochs=4)
    code, _, err = llmft(capsys, monkeypatch, "reward", path)
    assert code == 0, err
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": r["prompt"], "constraints": [{"type": "lowercase"}]}) + "\n"
                               for r in map(json.loads, pref_data.read_text().splitlines())))
    out = tmp_path / "report.json"
    code, _, err = llmft(capsys, monkeypatch, "eval", "--model", tiny_model_dir, "--compare", tiny_model_dir,
                         "--prompts", prompts, "--reward-model", tmp_path / "run", "--preferences", pref_data,
                         "--out", out, "--set", "sampling.max_new_tokens=4")
    assert code == 0, err
    report = json.loads(out.read_text())
    rm = report["reward_model"]
    assert rm["pairs"] == 8 and rm["pairwise_accuracy"] == 1.0 and rm["margin"] > 0
    [m] = report["models"].values()  # the same model twice: one column
    samples = report["samples"][str(tiny_model_dir)]
    assert "reward" in m and m["reward"] == pytest.approx(sum(s["reward"] for s in samples) / 8)


def test_reward_bad_input_is_one_clear_line(capsys, monkeypatch, tiny_model_dir, pref_data, write_config, tmp_path):
    from tests.helpers.cli import assert_one_line_error, llmft
    from tests.helpers.tiny import build_model, build_tokenizer

    rows = tmp_path / "bad.jsonl"
    rows.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": "b"}\n')
    code, _, err = llmft(capsys, monkeypatch, "reward", write_config(tiny_model_dir, rows))
    assert_one_line_error(code, err, "bad.jsonl:2: missing field 'rejected'")
    code, _, err = llmft(capsys, monkeypatch, "reward", write_config(tiny_model_dir, pref_data), "--set",
                         "lora.dropout=0.1")
    assert_one_line_error(code, err, "lora.dropout")
    code, _, err = llmft(capsys, monkeypatch, "reward", write_config(tiny_model_dir, pref_data), "--set",
                         "loss.type=cross_entropy")
    assert_one_line_error(code, err, "'loss.type'")

    path = write_config(tiny_model_dir, pref_data, train__max_steps=1)
    assert llmft(capsys, monkeypatch, "reward", path)[0] == 0
    other = tmp_path / "other"
    tok = build_tokenizer()
    tok.add_tokens(["zebra"])
    build_model(len(tok)).save_pretrained(other)
    tok.save_pretrained(other)
    code, _, err = llmft(capsys, monkeypatch, "eval", "--model", other, "--prompts", pref_data, "--reward-model",
                         tmp_path / "run", "--set", "judges=[]")
    assert_one_line_error(code, err, "reward model", "has another tokenizer than policy")
    code, _, err = llmft(capsys, monkeypatch, "eval", "--model", tmp_path / "run", "--prompts", pref_data,
                         "--set", "judges=[]")
    assert_one_line_error(code, err, "is a reward model")


def test_hinge_defaults_to_margin_one_and_refuses_zero(tiny_model_dir, pref_data, write_config):
    from llmft.errors import ConfigError
    from llmft.stages.reward import default_margin

    cfg = load_config("reward", write_config(tiny_model_dir, pref_data, loss__type="hinge"))
    assert default_margin(cfg.loss) == 1.0  # max(0, 1 − (r_c − r_r)): a constant model no longer scores 0
    assert default_margin(load_config("reward", write_config(tiny_model_dir, pref_data)).loss) == 0.0
    with pytest.raises(ConfigError, match="met by a model that gives every answer the same score"):
        reward.setup(load_config("reward", write_config(tiny_model_dir, pref_data, loss__type="hinge",
                                                        loss__margin=0.0)))


def test_the_output_records_the_range_of_its_scores_on_its_training_answers(tiny_model_dir, pref_data, write_config,
                                                                            tmp_path):
    """reward_range/low and /high: the 1st and 99th percentiles of the final model's scores of every training
    answer, chosen and rejected (what an RL stage's alarm compares the policy's answers against)."""
    cfg = reward_config(write_config, tiny_model_dir, pref_data, train__epochs=3)
    reward.run(cfg)
    recorded = json.loads(open(f"{cfg.output_dir}/llmft.json").read())["metrics"]
    scorer = RewardScorer.load(cfg.output_dir)
    pairs = reward.setup(cfg).train.pairs
    scores = torch.cat([scorer.score_ids([p.prompt_ids + p.chosen_ids for p in pairs]),
                        scorer.score_ids([p.prompt_ids + p.rejected_ids for p in pairs])]).sort().values
    n = len(scores)  # 16 answers: the 1st percentile is 0.15 of the way from the lowest to the next
    low = scores[0] + 0.01 * (n - 1) * (scores[1] - scores[0])
    high = scores[-2] + (0.99 * (n - 1) - (n - 2)) * (scores[-1] - scores[-2])
    assert recorded["reward_range/low"] == pytest.approx(float(low), abs=1e-4)
    assert recorded["reward_range/high"] == pytest.approx(float(high), abs=1e-4)
    assert recorded["reward_range/low"] < recorded["reward_range/high"]
