"""Config loading: every shipped config, and every bad-config case names the key and what was expected."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmft.config import STAGE_CONFIGS, SFTConfig, load_config
from llmft.errors import ConfigError
from llmft.schema import schema_rows, to_yaml
from tests.helpers import ROOT


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads_and_names_its_command(path):
    first = path.read_text().splitlines()[0]
    stage = first.split("llmft ")[1].split()[0]
    assert first.startswith("# Run: llmft ") and f"configs/{path.name}" in first
    if stage == "loop":
        from llmft.loop.config import LoopConfig

        load_config(stage, path, schema=LoopConfig)
    elif stage in STAGE_CONFIGS:
        load_config(stage, path)


def write(tmp_path, text: str) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


MINIMAL = "data:\n  train: x.jsonl\n"


def error_of(path, overrides=()) -> str:
    with pytest.raises(ConfigError) as e:
        load_config("sft", path, list(overrides))
    return str(e.value)


def test_defaults_and_required_key(tmp_path):
    cfg = load_config("sft", write(tmp_path, MINIMAL))
    assert cfg.train.learning_rate == 2e-4 and cfg.lora.target_modules == "all-linear"
    assert "missing required key 'data.train'" in error_of(write(tmp_path, "model: {name: x}\n"))


def test_unknown_key_names_path_and_suggests(tmp_path):
    msg = error_of(write(tmp_path, MINIMAL + "train:\n  lerning_rate: 1.0e-4\n"))
    assert "unknown key 'train.lerning_rate'" in msg and "did you mean 'train.learning_rate'" in msg
    msg = error_of(write(tmp_path, MINIMAL + "batch_size: 4\n"))  # right name, wrong section
    assert "unknown key 'batch_size'" in msg and "'train.batch_size'" in msg


@pytest.mark.parametrize("text, expected", [
    ("train: {batch_size: 0}", "'train.batch_size' must be >= 1, got 0"),
    ("train: {learning_rate: -1}", "'train.learning_rate' must be > 0, got -1"),
    ("train: {learning_rate: 0}", "'train.learning_rate' must be > 0"),
    ("train: {batch_size: four}", "'train.batch_size' expects an integer, got 'four'"),
    ("train: {batch_size: 2.5}", "'train.batch_size' expects an integer"),
    ("lora: {dropout: 1.5}", "'lora.dropout' must be >= 0 and < 1"),
    ("train: {gradient_checkpointing: 'yes'}", "'train.gradient_checkpointing' expects true/false"),
    ("train: {scheduler: cosine_restarts}", "'train.scheduler' expects one of 'cosine', 'linear', 'constant'"),
    ("train: 3", "'train' must be a mapping"),
])
def test_wrong_types_and_ranges_name_the_key(tmp_path, text, expected):
    assert expected in error_of(write(tmp_path, MINIMAL + text + "\n"))


def test_yaml_syntax_error_gives_file_line(tmp_path):
    path = write(tmp_path, "data:\n  train: [x.jsonl\nmodel: 3\n")
    assert error_of(path).startswith(f"{path}:3:")


def test_missing_config_file(tmp_path):
    assert "config file not found" in error_of(tmp_path / "nope.yaml")


def test_exponent_without_dot_is_a_number(tmp_path):  # YAML 1.1 reads 2e-4 as a string
    assert load_config("sft", write(tmp_path, MINIMAL + "train: {learning_rate: 2e-4}\n")).train.learning_rate == 2e-4


def test_set_overrides_any_key_and_rejects_unknown(tmp_path):
    path = write(tmp_path, MINIMAL)
    cfg = load_config("sft", path, ["train.batch_size=3", "lora.target_modules=[q_proj, v_proj]",
                                    "data.eval=null", "resume=auto"])
    assert cfg.train.batch_size == 3 and cfg.lora.target_modules == ["q_proj", "v_proj"] and cfg.resume == "auto"
    assert "--set train.batchsize=3: unknown key 'train.batchsize'" in error_of(path, ["train.batchsize=3"])
    assert "'train.batch_size' must be >= 1" in error_of(path, ["train.batch_size=-2"])
    assert "expected KEY=VALUE" in error_of(path, ["train.batch_size"])


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config("sft", write(tmp_path, MINIMAL + "train: {epochs: 3}\n"))
    again = load_config("sft", write(tmp_path, to_yaml(cfg)))
    assert again == cfg


def test_schema_documents_every_key():
    rows = schema_rows(SFTConfig)
    assert all(help_ for *_, help_ in rows)
    assert ("train.learning_rate", "a number > 0", "0.0002") == rows[[r[0] for r in rows].index(
        "train.learning_rate")][:3]


def test_yaml_merge_keys_still_work_and_may_override(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("base: &base {batch_size: 2, epochs: 1}\nmodel: {name: m}\ndata: {train: x.jsonl}\n"
                    "train:\n  <<: *base\n  epochs: 3\n")
    with pytest.raises(ConfigError, match="unknown key 'base'"):  # the anchor holder itself is not a key ...
        load_config("sft", path)
    path.write_text("model: {name: m}\ndata: {train: x.jsonl}\ntrain:\n  <<: {batch_size: 2, epochs: 1}\n"
                    "  epochs: 3\n")
    cfg = load_config("sft", path)  # ... but merging, and overriding a merged key, is legal YAML
    assert (cfg.train.batch_size, cfg.train.epochs) == (2, 3)
