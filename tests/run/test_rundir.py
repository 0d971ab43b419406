"""The output directory: overwrite deletes only what a run wrote, dangerous folders are refused, one run at a time,
resume refuses changed data, and a run refused after it started does not block the corrected rerun."""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

import pytest

from llmft.config import load_config
from llmft.errors import RunError
from llmft.run import rundir
from llmft.stages import sft
from tests.helpers.runs import crash_at


def run(cfg_path, *overrides):
    return sft.run(load_config("sft", cfg_path, list(overrides)))


@pytest.fixture
def cfg(tiny_model_dir, sft_data, write_config):
    return write_config(tiny_model_dir, sft_data, train__max_steps=2)


def test_overwrite_never_deletes_a_folder_that_is_not_an_llmft_run(cfg, tmp_path):
    project = tmp_path / "project"  # a docker-compose config.yaml is not an llmft run
    project.mkdir()
    (project / "config.yaml").write_text("services:\n  web:\n    image: nginx\n")
    (project / "thesis.tex").write_text("\\documentclass{article}")
    with pytest.raises(RunError, match="llmft did not write .*config.yaml.*not an llmft run"):
        run(cfg, f"output_dir={project}", "overwrite=true")
    assert sorted(p.name for p in project.iterdir()) == ["config.yaml", "thesis.tex"]


def test_overwrite_deletes_only_what_the_run_wrote(cfg, tmp_path):
    run(cfg, "train.save_every=1", "train.keep_checkpoints=5")
    out = tmp_path / "run"
    (out / "notes.txt").write_text("mine")
    (out / "figures").mkdir()
    written = {p.name for p in out.iterdir()} - {"notes.txt", "figures"}
    assert {"adapter_model.safetensors", "llmft.json", "config.yaml", rundir.MARKER, "checkpoint-1"} <= written
    run(cfg, "overwrite=true", "train.max_steps=1")  # no checkpoint this time: the old ones must be gone
    assert (out / "notes.txt").read_text() == "mine" and (out / "figures").is_dir()
    assert not list(out.glob("checkpoint-*")) and json.loads((out / "llmft.json").read_text())["metrics"]
    assert rundir.delete_run(out) == ["figures", "notes.txt"]


def test_a_finished_run_of_an_earlier_version_is_still_recognised(cfg, tmp_path):
    run(cfg)
    out = tmp_path / "run"
    (out / rundir.MARKER).unlink()  # runs before the marker: only the manifest, without its list of files
    (out / "generation_config.json").unlink()  # (nor did they write this)
    manifest = json.loads((out / "llmft.json").read_text())
    del manifest["files"]
    (out / "llmft.json").write_text(json.dumps(manifest))
    (out / "keep.txt").write_text("x")
    assert rundir.is_run(out)
    assert rundir.delete_run(out) == ["keep.txt"]


@pytest.mark.parametrize("where", ["cwd", "parent", "home", "root"])
def test_the_working_directory_its_parents_home_and_root_are_refused(cfg, tmp_path, monkeypatch, where):
    work = tmp_path / "work"
    work.mkdir()
    (work / "precious.txt").write_text("x")
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    target = {"cwd": ".", "parent": "..", "home": "~/", "root": "/"}[where]
    with pytest.raises(RunError, match="give it a folder of its own"):
        run(cfg, f"output_dir={target}", "overwrite=true")
    assert (work / "precious.txt").exists()


def test_tilde_in_output_dir_expands(cfg, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    run(cfg, "output_dir=~/runs/sft")
    assert (tmp_path / "home" / "runs" / "sft" / "llmft.json").is_file() and not (tmp_path / "~").exists()


def test_a_second_run_into_a_folder_in_use_is_refused(cfg, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / rundir.MARKER).write_text("{}")
    with open(out / rundir.LOCK, "w") as other:  # another process's run holds the lock
        other.write(json.dumps({"pid": 4242}))
        other.flush()
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        for extra in ([], ["resume=auto"], ["overwrite=true"]):
            with pytest.raises(RunError, match="in use by another llmft run \\(process 4242\\)"):
                run(cfg, *extra)
    run(cfg, "resume=auto")  # released (as when that process ends, killed or not): the run starts
    assert (out / "llmft.json").is_file()


def test_resume_refuses_a_changed_data_file_unless_allowed(tiny_model_dir, sft_data, write_config, tmp_path,
                                                          monkeypatch):
    cfg = write_config(tiny_model_dir, sft_data, train__batch_size=2, train__save_every=2, resume="auto")
    crash_at(run, cfg, monkeypatch, at_step=3)
    sft_data.write_text(sft_data.read_text().replace("blue", "green"))  # same path, other content
    with pytest.raises(RunError, match=f"{sft_data} changed since the run .* allow_data_change"):
        run(cfg)
    assert run(cfg, "allow_data_change=true")["loss"] > 0


def test_a_run_refused_after_it_started_does_not_block_the_corrected_rerun(cfg, tmp_path):
    with pytest.raises(Exception, match="target_modules"):
        run(cfg, "lora.target_modules=[no_such_module]")
    out = tmp_path / "run"
    assert (out / "config.yaml").is_file() and not list(out.glob("checkpoint-*"))
    assert run(cfg)["loss"] > 0  # nothing was saved: the rerun starts over without asking for overwrite


def test_lock_is_released_when_the_run_ends(cfg, tmp_path):
    run(cfg)
    with open(tmp_path / "run" / rundir.LOCK) as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # would raise if still held
    assert os.path.exists(Path(tmp_path / "run" / rundir.LOCK))


def test_a_run_of_an_earlier_version_in_progress_is_recognised(cfg, tmp_path):
    run(cfg, "train.save_every=1", "train.keep_checkpoints=5")
    out = tmp_path / "run"
    for name in (rundir.MARKER, "llmft.json"):  # in progress under a version without the marker
        (out / name).unlink()
    assert rundir.is_run(out)
    assert run(cfg, "overwrite=true")["loss"] > 0


def test_an_interrupted_overwrite_leaves_a_folder_llmft_still_recognises(cfg, tmp_path, monkeypatch):
    import shutil as sh

    run(cfg, "train.save_every=1", "train.keep_checkpoints=5")
    out, real, calls = tmp_path / "run", sh.rmtree, []

    def killed(path, *a, **k):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(path, *a, **k)

    monkeypatch.setattr(rundir.shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        run(cfg, "overwrite=true")
    monkeypatch.setattr(rundir.shutil, "rmtree", real)
    assert (out / rundir.MARKER).is_file()  # the marker goes last
    assert run(cfg, "overwrite=true")["loss"] > 0


def test_output_dir_may_not_hold_the_runs_own_inputs(tiny_model_dir, sft_data, write_config, tmp_path):
    first = write_config(tiny_model_dir, sft_data, train__max_steps=1, output_dir=str(tmp_path / "first"))
    run(first)
    again = write_config(tmp_path / "first", sft_data, output_dir=str(tmp_path / "first"), overwrite=True)
    with pytest.raises(RunError, match="holds this run's own input \\(model.name"):
        run(again)
    assert (tmp_path / "first" / "adapter_model.safetensors").is_file()  # the input survives
    with pytest.raises(RunError, match="holds this run's own input \\(data.train"):
        run(write_config(tiny_model_dir, sft_data, output_dir=str(tmp_path)))


def test_a_lock_file_alone_counts_as_empty(cfg, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / rundir.LOCK).write_text("{}")  # a run killed right after it locked the folder
    assert run(cfg)["loss"] > 0
