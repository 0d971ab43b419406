"""The DPO stage: every loss by hand, ln 2 at step 0, padding-invariant log-probs, adapters, resume."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from llmft.config import load_config
from llmft.data.preferences import collate_pairs, tokenize_pairs
from llmft.data.records import Record
from llmft.errors import ConfigError
from llmft.models.logprobs import sequence_logps
from llmft.stages import dpo
from tests.helpers.runs import crash_then_resume, train_in_process

# ------------------------------------------------------------------------------------------------ losses






# --------------------------------------------------------------------------------------------- forward
def test_logps_are_unchanged_by_padding_side_and_batch_composition(tiny_model_dir, tiny_tokenizer, tiny_chat):
    from transformers import AutoModelForCausalLM

    from llmft.config import LoraConfig
    from llmft.models.adapters import add_lora

    rows = [Record({"prompt": "write two words about the sea", "chosen": "the sea is blue", "rejected": "hello"},
                   "x:1"),
            Record({"prompt": "hi", "chosen": "the quick brown fox jumps over the lazy dog", "rejected": "a"}, "x:2")]
    pairs = tokenize_pairs(rows, tiny_chat, "pairs", 64).pairs
    torch.manual_seed(0)
    model = add_lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir), LoraConfig(r=4, alpha=8, dropout=0.0))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.5)

    def logps(batch):
        return sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"])

    pad = tiny_tokenizer.pad_token_id
    with torch.no_grad():
        right, left = logps(collate_pairs(pairs, pad, "right")), logps(collate_pairs(pairs, pad, "left"))
        alone = torch.cat([logps(collate_pairs([p], pad)) for p in pairs])
    assert torch.allclose(right, left, atol=1e-5)
    assert torch.allclose(right.view(2, 2).T.flatten(), alone, atol=1e-5)


# ------------------------------------------------------------------------------------------------ stage
def dpo_config(write_config, tiny_model_dir, pref_data, **overrides):
    settings = dict(data__eval=str(pref_data), train__epochs=10, train__save_every=4, lora__dropout=0.0,
                    loss__beta=0.5)
    return load_config("dpo", write_config(tiny_model_dir, pref_data, **{**settings, **overrides}))


def metrics_rows(run_dir) -> list[dict]:
    return [json.loads(line) for line in open(f"{run_dir}/metrics.jsonl")]


def test_step_zero_is_ln2_then_only_the_adapter_learns(tiny_model_dir, pref_data, write_config):
    cfg = dpo_config(write_config, tiny_model_dir, pref_data)
    model, before, final = train_in_process(dpo, cfg)
    rows = metrics_rows(cfg.output_dir)
    start, first = rows[0], rows[1]
    assert start["step"] == 0 and start["eval/loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert start["eval/rewards/accuracies"] == 0 and start["eval/rewards/margins"] == 0
    assert first["step"] == 1 and first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed)
    assert final["eval/loss"] < 0.5 * math.log(2) and final["eval/rewards/accuracies"] == 1.0
    assert {"rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"} <= set(final)


def test_precomputed_reference_gives_the_same_run(tiny_model_dir, pref_data, write_config, tmp_path):
    runs = {}
    for flag in (False, True):
        cfg = dpo_config(write_config, tiny_model_dir, pref_data, train__epochs=2,
                         loss__precompute_reference=flag, output_dir=str(tmp_path / str(flag)))
        dpo.run(cfg)
        runs[flag] = [r["loss"] for r in metrics_rows(cfg.output_dir) if "loss" in r]
    assert runs[True] == pytest.approx(runs[False], abs=1e-5)


@pytest.mark.parametrize("kind", ["robust", "hinge", "ipo", "simpo", "orpo"])
def test_every_loss_trains(kind, tiny_model_dir, pref_data, write_config):
    cfg = dpo_config(write_config, tiny_model_dir, pref_data, loss__type=kind, loss__label_smoothing=0.1,
                     train__epochs=4, **({"loss__beta": 2.0} if kind == "simpo" else {}))
    final = dpo.run(cfg)
    assert math.isfinite(final["loss"]) and final["eval/rewards/accuracies"] >= 0.75, final


def test_resume_reproduces_the_uninterrupted_run(tiny_model_dir, pref_data, write_config, tmp_path, monkeypatch):
    settings = dict(train__batch_size=2, train__epochs=2, train__save_every=3)
    dpo.run(dpo_config(write_config, tiny_model_dir, pref_data, output_dir=str(tmp_path / "a"), **settings))
    cfg = dpo_config(write_config, tiny_model_dir, pref_data, output_dir=str(tmp_path / "b"), **settings)
    crash_then_resume(dpo.run, cfg, monkeypatch)
    a, b = (load_file(tmp_path / d / "adapter_model.safetensors") for d in "ab")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bad_input(tiny_model_dir, pref_data, write_config, capsys, monkeypatch):
    from tests.helpers.cli import assert_one_line_error, llmft

    with pytest.raises(ConfigError, match="lora.dropout"):
        dpo.setup(dpo_config(write_config, tiny_model_dir, pref_data, lora__dropout=0.1))
    code, _, err = llmft(capsys, monkeypatch, "dpo", write_config(tiny_model_dir, pref_data), "--set", "loss.type=kto")
    assert_one_line_error(code, err, "'loss.type'")
    code, _, err = llmft(capsys, monkeypatch, "dpo", write_config(tiny_model_dir, pref_data), "--set",
                         "loss.label_smoothing=0.5")
    assert_one_line_error(code, err, "'loss.label_smoothing' must be >= 0 and < 0.5")
    code, out, err = llmft(capsys, monkeypatch, "dpo", write_config(tiny_model_dir, pref_data), "--dry-run")
    assert code == 0 and "reference: the policy" in err, err
