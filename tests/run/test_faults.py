"""Faults and hostile input: damaged checkpoints, a full disk, a corrupt manifest, pickled weights, what --dry-run
must catch, judges in the working directory, non-finite margins. Each ends in one clear line and loses nothing."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llmft import checkpoint
from llmft.config import load_config
from llmft.errors import DataError, ModelError, RunError
from llmft.stages import dpo, sft
from tests.helpers.cli import assert_one_line_error, llmft
from tests.helpers.runs import crash_at


def run(cfg_path, *overrides):
    return sft.run(load_config("sft", cfg_path, list(overrides)))


def adapter(run_dir: Path) -> dict:
    return load_file(run_dir / "adapter_model.safetensors")


@pytest.fixture
def interrupted(tiny_model_dir, sft_data, write_config, tmp_path, monkeypatch):
    """An sft run killed in step 5, with checkpoint-2 and checkpoint-4; and the same run uninterrupted."""
    settings = dict(train__batch_size=1, train__epochs=1, train__save_every=2)
    full = write_config(tiny_model_dir, sft_data, output_dir=str(tmp_path / "full"), **settings)
    run(full)
    cfg = write_config(tiny_model_dir, sft_data, output_dir=str(tmp_path / "run"), resume="auto", **settings)
    crash_at(run, cfg, monkeypatch, at_step=5)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path / "run")] == ["checkpoint-2", "checkpoint-4"]
    return cfg, tmp_path / "run", tmp_path / "full"


@pytest.mark.parametrize("damage", ["empty optimizer", "truncated adapter", "empty state"])
def test_a_damaged_checkpoint_gives_way_to_the_one_before(interrupted, damage, capsys):
    cfg, out, full = interrupted
    name = {"empty optimizer": "optimizer.pt", "truncated adapter": "adapter_model.safetensors",
            "empty state": "state.json"}[damage]
    target = out / "checkpoint-4" / name
    target.write_bytes(target.read_bytes()[:len(target.read_bytes()) // 3] if "truncated" in damage else b"")
    run(cfg)
    err = capsys.readouterr().err
    assert "checkpoint-4 is damaged" in " ".join(err.split()) and "resuming from" in err
    assert (out / "checkpoint-4.damaged").is_dir()  # set aside, never taken again (nor rotated in as a newest one)
    a, b = adapter(full), adapter(out)
    assert all(torch.equal(a[k], b[k]) for k in a)  # from checkpoint-2 it reproduces the uninterrupted run


def test_when_every_checkpoint_is_damaged_resume_names_them(interrupted):
    cfg, out, _ = interrupted
    for ckpt in ("checkpoint-2", "checkpoint-4"):
        (out / ckpt / "optimizer.pt").write_bytes(b"")
    with pytest.raises(RunError, match="no usable checkpoint .*checkpoint-4 .*checkpoint-2 .*overwrite: true"):
        run(cfg)


def test_a_full_disk_while_writing_a_checkpoint_names_the_last_good_one(tiny_model_dir, sft_data, write_config,
                                                                        tmp_path, monkeypatch):
    cfg = write_config(tiny_model_dir, sft_data, train__batch_size=1, train__epochs=1, train__save_every=2,
                       resume="auto")
    real, saves = torch.save, []

    def full_disk(obj, path, *args, **kwargs):
        if "checkpoint-4" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        saves.append(path)
        return real(obj, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "save", full_disk)
    with pytest.raises(RunError, match=r"no space left on the device while writing .*checkpoint-4; the last good "
                                       r"checkpoint is .*checkpoint-2"):
        run(cfg)
    out = tmp_path / "run"
    assert not list(out.glob(".tmp-*")) and (out / "checkpoint-2" / "optimizer.pt").is_file()
    monkeypatch.setattr(checkpoint.torch, "save", real)  # space freed: the run continues from checkpoint-2
    assert run(cfg)["loss"] > 0 and (out / "llmft.json").is_file()


def test_a_corrupt_manifest_in_a_stage_folder_is_one_line(tiny_model_dir, sft_data, pref_data, write_config,
                                                          tmp_path, capsys, monkeypatch):
    run(write_config(tiny_model_dir, sft_data, train__max_steps=1))
    (tmp_path / "run" / "llmft.json").write_text('{"stage": "sft", "model": ')
    code, _, err = llmft(capsys, monkeypatch, "dpo", write_config(tmp_path / "run", pref_data,
                                                                   output_dir=str(tmp_path / "dpo")))
    assert_one_line_error(code, err, "llmft.json is damaged", "cannot be used as a model")


def test_pickled_weights_are_refused_unless_allowed(tiny_model_dir, sft_data, write_config, tmp_path):
    import shutil

    from transformers import AutoModelForCausalLM

    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, pickled)
    for f in pickled.glob("*.safetensors"):
        f.unlink()
    torch.save(AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict(), pickled / "pytorch_model.bin")
    cfg = write_config(pickled, sft_data, train__max_steps=1)
    with pytest.raises(ModelError, match="holds only pickled weights .*model.allow_pickle: true"):
        run(cfg)
    assert run(cfg, "model.allow_pickle=true")["loss"] > 0


def test_dry_run_catches_what_the_real_run_refuses(tiny_model_dir, sft_data, pref_data, write_config, tmp_path,
                                                   capsys, monkeypatch):
    from llmft.stages import reward

    code, _, err = llmft(capsys, monkeypatch, "sft", write_config(tiny_model_dir, sft_data), "--dry-run", "--set",
                         "lora.target_modules=[no_such_module]")
    assert_one_line_error(code, err, "lora.target_modules")
    reward.run(load_config("reward", write_config(tiny_model_dir, pref_data, output_dir=str(tmp_path / "rm"),
                                                  train__max_steps=1)))
    code, _, err = llmft(capsys, monkeypatch, "dpo", write_config(tmp_path / "rm", pref_data,
                                                                   output_dir=str(tmp_path / "dpo")), "--dry-run")
    assert_one_line_error(code, err, "is a reward model", "not as a model to generate with or fine-tune")
    assert not (tmp_path / "dpo").exists()


def test_a_judge_module_in_the_working_directory_is_found(tmp_path, monkeypatch):
    from llmft.judges import make_judge

    (tmp_path / "localjudge.py").write_text("def fn(prompts, responses, rows):\n    return [1.0] * len(responses)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(__import__("sys").modules, "localjudge", raising=False)
    assert make_judge("localjudge:fn", [])(["p"], ["r"], [{}]) == [1.0]


@pytest.mark.parametrize("margin", ["NaN", "Infinity", "-Infinity"])
def test_a_non_finite_margin_names_its_row(margin, tiny_model_dir, write_config, tmp_path):
    rows = ['{"prompt": "a", "chosen": "b", "rejected": "c", "margin": 1.0}',
            f'{{"prompt": "a", "chosen": "b", "rejected": "d", "margin": {margin}}}']
    (tmp_path / "pairs.jsonl").write_text("\n".join(rows) + "\n")
    with pytest.raises(DataError, match=r"pairs.jsonl:2: 'margin' must be a finite number"):
        dpo.setup(load_config("dpo", write_config(tiny_model_dir, tmp_path / "pairs.jsonl")))


def test_an_empty_saved_config_on_resume_is_one_line(tiny_model_dir, sft_data, write_config, tmp_path):
    cfg = write_config(tiny_model_dir, sft_data, train__batch_size=1, train__epochs=1, train__save_every=2,
                       train__max_steps=3)
    run(cfg)
    (tmp_path / "run" / "llmft.json").unlink()  # as if killed after checkpoint-2
    (tmp_path / "run" / "config.yaml").write_text("")
    with pytest.raises(RunError, match="config.yaml is empty or not a mapping"):
        run(cfg, "resume=auto")
    assert json.loads((tmp_path / "run" / "checkpoint-2" / "state.json").read_text())["step"] == 2  # kept
