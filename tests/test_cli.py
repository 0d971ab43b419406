"""The command line as a user meets it: every bad input is one clear line and a non-zero exit."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from llmft import __version__
from tests.helpers.cli import assert_one_line_error, llmft


def test_version_and_help(capsys, monkeypatch):
    assert llmft(capsys, monkeypatch, "--version")[:2] == (0, f"llmft {__version__}\n")
    code, out, _ = llmft(capsys, monkeypatch, "--help")
    assert code == 0 and all(stage in out for stage in ("sft", "reward", "dpo", "ppo"))


@pytest.fixture
def good(tiny_model_dir, sft_data, write_config):
    return lambda **kw: write_config(tiny_model_dir, sft_data, train__max_steps=1, **kw)


def bad_yaml(tmp_path, text):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    return path


CASES = {
    "missing config": (lambda t, g, d: [t / "nope.yaml"], ["config file not found", "nope.yaml"]),
    "yaml syntax": (lambda t, g, d: [bad_yaml(t, "data: [a\nb: c\n")], ["bad.yaml:2:", "YAML syntax error"]),
    "unknown key": (lambda t, g, d: [g(), "--set", "train.lerning_rate=1"], ["did you mean 'train.learning_rate'"]),
    "wrong type": (lambda t, g, d: [g(), "--set", "train.epochs=many"], ["'train.epochs' expects an integer"]),
    "negative lr": (lambda t, g, d: [g(), "--set", "train.learning_rate=-1e-4"], ["'train.learning_rate' must be > 0"]),
    "zero batch": (lambda t, g, d: [g(), "--set", "train.batch_size=0"], ["'train.batch_size' must be >= 1"]),
    "missing data": (lambda t, g, d: [g(), "--set", f"data.train={t / 'no.jsonl'}"], ["data file not found"]),
    "bad extension": (lambda t, g, d: [g(), "--set", f"data.train={d['txt']}"], ["unsupported data file extension"]),
    "row without fields": (lambda t, g, d: [g(), "--set", f"data.train={d['rowless']}"],
                           ["rowless.jsonl:2: missing field 'completion'"]),
    "empty dataset": (lambda t, g, d: [g(), "--set", f"data.train={d['empty']}"], ["the dataset is empty"]),
    "missing model path": (lambda t, g, d: [g(), "--set", f"model.name={t / 'no-model'}"],
                           ["local model path does not exist"]),
    "hub id offline": (lambda t, g, d: [g(), "--set", "model.name=some-org/some-model"],
                       ["'some-org/some-model'", "offline"]),
    "not a hub id": (lambda t, g, d: [g(), "--set", "model.name=':'"],
                     ["model ':' is neither a local model path nor a hub id"]),
    "unknown --set key": (lambda t, g, d: [g(), "--set", "nonsense=1"], ["--set nonsense=1: unknown key 'nonsense'"]),
    "bad --set form": (lambda t, g, d: [g(), "--set", "train.epochs"], ["expected KEY=VALUE"]),
    "duplicate key": (lambda t, g, d: [bad_yaml(t, "train: {epochs: 1}\ntrain: {epochs: 2}\n")],
                      ["bad.yaml:2: duplicate key 'train'"]),
    "alias bomb": (lambda t, g, d: [bad_yaml(t, "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [{', '.join([f'*{p}'] * 10)}]\n" for p, c in zip("abcdefg", "bcdefgh", strict=True)))],
                   ["YAML aliases", "alias bomb"]),
    "config not UTF-8": (lambda t, g, d: [d["latin1"]], ["latin1.yaml: not UTF-8 text (byte 0xe9"]),
    "config is a folder": (lambda t, g, d: [t], ["is not a file"]),
    "huge integer": (lambda t, g, d: [g(), "--set", "train.max_steps=99999999999999999999999"],
                     ["'train.max_steps' must be a finite number of magnitude at most"]),
    "infinite rate": (lambda t, g, d: [g(), "--set", "train.learning_rate=.inf"], ["'train.learning_rate' must be a "
                                                                                  "finite number"]),
    "data not UTF-8": (lambda t, g, d: [g(), "--set", f"data.train={d['bytes']}"], ["bytes.jsonl:2: not UTF-8 text"]),
    "lone surrogate": (lambda t, g, d: [g(), "--set", f"data.train={d['surrogate']}"],
                       ["surrogate.jsonl:1: field 'completion' holds invalid Unicode"]),
    "csv not UTF-8": (lambda t, g, d: [g(), "--set", f"data.train={d['csv']}"], ["d.csv:3: not UTF-8 text"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_clear_line(case, capsys, monkeypatch, tmp_path, good):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    files = {"txt": tmp_path / "d.txt", "rowless": tmp_path / "rowless.jsonl", "empty": tmp_path / "empty.jsonl",
             "latin1": tmp_path / "latin1.yaml", "bytes": tmp_path / "bytes.jsonl", "csv": tmp_path / "d.csv",
             "surrogate": tmp_path / "surrogate.jsonl"}
    files["latin1"].write_bytes("model: {name: caf\u00e9}\n".encode("latin-1"))
    files["bytes"].write_bytes(b'{"prompt": "a", "completion": "b"}\n{"prompt": "\xff", "completion": "b"}\n')
    files["csv"].write_bytes(b"prompt,completion\na,b\n\xe9,c\n")
    files["surrogate"].write_text('{"prompt": "a", "completion": "b\\ud800"}\n')
    files["txt"].write_text("hello\n")
    files["rowless"].write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "only"}\n')
    files["empty"].write_text("")
    make_args, expected = CASES[case]
    code, _, err = llmft(capsys, monkeypatch, "sft", *make_args(tmp_path, good, files))
    assert_one_line_error(code, err, *expected)


@pytest.mark.parametrize("args, expected", [
    (["sft"], ["Missing argument 'config'", "see llmft sft --help"]),
    (["sft", "x.yaml", "--bogus"], ["No such option: --bogus"]),
    (["generate", "m", "--prompts", "p", "--max-new-tokens", "abc"], ["Invalid value for '--max-new-tokens'"]),
    (["nosuchcommand"], ["No such command 'nosuchcommand'"]),
    (["eval", "--set"], ["Option '--set' requires an argument"]),
])
def test_command_line_usage_errors_are_one_line(capsys, monkeypatch, args, expected):
    code, _, err = llmft(capsys, monkeypatch, *args)  # typer ≥ 0.20 raises its own click's errors: still one line
    assert_one_line_error(code, err, *expected)


def test_bare_command_prints_help(capsys, monkeypatch):
    code, out, _ = llmft(capsys, monkeypatch)
    assert code == 0 and "sft" in out and "ppo" in out


def test_output_dir_with_another_run_is_refused(capsys, monkeypatch, good):
    cfg = good()
    assert llmft(capsys, monkeypatch, "sft", cfg)[0] == 0
    code, _, err = llmft(capsys, monkeypatch, "sft", cfg, "--set", "train.learning_rate=0.5")
    assert_one_line_error(code, err, "already holds a run", "overwrite: true")


def test_dry_run_prints_plan_and_config_without_training(capsys, monkeypatch, good, tmp_path):
    cfg = good(output_dir=str(tmp_path / "never"))
    code, _, err = llmft(capsys, monkeypatch, "sft", cfg, "--dry-run", "--set", "train.batch_size=2")
    text = " ".join(err.split())
    assert code == 0 and "8 examples" in text and "1 optimizer steps" in text and "batch_size: 2" in text
    assert not (tmp_path / "never").exists()


def test_schema_lists_keys(capsys, monkeypatch):
    code, out, _ = llmft(capsys, monkeypatch, "schema", "sft")
    assert code == 0 and "train.learning_rate" in out and "lora.target_modules" in out
    assert "[tensorboard]" in " ".join(out.replace("│", " ").split())  # help text is shown as written, not as markup


# ------------------------------------------------------------------------------------ real processes
def cli(*args, **kw) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-m", "llmft", *map(str, args)], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


def test_a_real_process_prints_no_traceback(tmp_path):
    proc = cli("sft", tmp_path / "missing.yaml")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and err.strip().splitlines() == [f"error: config file not found: "
                                                                  f"{tmp_path / 'missing.yaml'}"]


def test_kill_9_then_resume_matches_an_uninterrupted_run(tiny_model_dir, write_config, tmp_path):
    rows = [{"prompt": f"question {i} about the sea", "completion": "the sea is deep and wide " * (1 + i % 3)}
            for i in range(64)]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    settings = dict(train__batch_size=2, train__epochs=1, train__save_every=4, lora__dropout=0.1)
    ref = write_config(tiny_model_dir, data, output_dir=str(tmp_path / "ref"), **settings)
    assert cli("sft", ref).wait(timeout=300) == 0

    cfg = write_config(tiny_model_dir, data, output_dir=str(tmp_path / "killed"), resume="auto", **settings)
    proc = cli("sft", cfg)
    metrics = tmp_path / "killed" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 10:
            break
        time.sleep(0.005)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "llmft.json").exists()
    assert cli("sft", cfg).wait(timeout=300) == 0

    def losses(d):
        return [json.loads(x)["loss"] for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()
                if '"loss"' in x]

    assert losses("killed") == losses("ref") and len(losses("ref")) == 32


def test_a_missing_earlier_stage_names_the_command_that_makes_it(capsys, monkeypatch, tmp_path, pref_data):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "sft.yaml").write_text("# Run: llmft sft configs/sft.yaml\noutput_dir: runs/sft\n")
    (tmp_path / "configs" / "dpo.yaml").write_text(f"model: {{name: runs/sft}}\ndata: {{train: {pref_data}}}\n")
    code, _, err = llmft(capsys, monkeypatch, "dpo", "configs/dpo.yaml")  # before `llmft sft`, on a fresh clone
    assert_one_line_error(code, err, "model runs/sft does not exist", "run `llmft sft configs/sft.yaml` first")
    (tmp_path / "runs").mkdir()  # a local runs/ folder: runs/other is a folder, not a hub id
    code, _, err = llmft(capsys, monkeypatch, "dpo", "configs/dpo.yaml", "--set", "model.name=runs/other")
    assert_one_line_error(code, err, "runs/other does not exist", "if it is an earlier stage's output_dir")


def test_a_second_process_into_a_folder_in_use_is_refused(tiny_model_dir, write_config, tmp_path):
    rows = [{"prompt": f"question {i} about the sea", "completion": "the sea is deep and wide " * 3} for i in range(64)]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = write_config(tiny_model_dir, data, output_dir=str(tmp_path / "run"), resume="auto", train__batch_size=1,
                       train__epochs=50)  # long enough to still be running when the second one starts
    first = cli("sft", cfg)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and first.poll() is None and not metrics.exists():
        time.sleep(0.01)
    second = cli("sft", cfg)  # the same command again, e.g. in another terminal (every shipped config resumes)
    _, err = second.communicate(timeout=120)
    assert first.poll() is None, "the first run ended before the second could be refused"
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    assert second.returncode == 2
    assert err.strip().splitlines()[-1] == (f"error: output_dir {tmp_path / 'run'} is in use by another llmft run "
                                            f"(process {first.pid}); wait for it to end, or give this run another "
                                            f"output_dir")
    steps = [json.loads(x)["step"] for x in metrics.read_text().splitlines() if '"loss"' in x]
    assert steps == list(range(1, len(steps) + 1))  # one run's steps, once each
