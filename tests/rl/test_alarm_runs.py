"""The alarm in whole runs: a judge that pays for short answers (a reward a policy games by saying less) fires
the length alarm within a few steps of GRPO on the tiny model (`talking_dir`: it ends some answers); on_alarm: stop
ends the run there with its policy saved; with the alarm off nothing fires; a resumed run fires where the
uninterrupted one did."""

from __future__ import annotations

import json

import pytest

from llmft.errors import ConfigError
from llmft.stages import grpo

SHORT = "def fn(prompts, responses, rows):\n    return [-len(r) / 10 for r in responses]\n"


@pytest.fixture
def hackable(grpo_config, talking_dir, tmp_path):
    (tmp_path / "shortjudge.py").write_text(SHORT)

    def write(**overrides):
        return grpo_config(**{"model__name": str(talking_dir), "reward__judges": {"shortjudge:fn": 1.0},
                              "rollout__max_new_tokens": 12, "train__max_steps": 24, "train__learning_rate": 5e-2,
                              "alarm__window": 3, **overrides})

    return write


def rows(run_dir) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_reward_that_pays_for_short_answers_fires_the_length_alarm(hackable, tmp_path, capsys):
    grpo.run(hackable())
    alarms = [r for r in rows(tmp_path / "grpo") if "alarms" in r]
    assert alarms and "length" in alarms[0]["alarms"]  # within the 24 steps (step 20 on this machine)
    assert "collapsed from" in alarms[0]["alarms"]["length"]
    assert f"alarm at step {alarms[0]['step']}" in capsys.readouterr().err.replace("\n", " ")


def test_the_alarm_off_fires_nothing(hackable, tmp_path):
    from llmft.rl.alarms import Alarm, AlarmConfig, Keys

    grpo.run(hackable(alarm__on_alarm="off"))
    logged = rows(tmp_path / "grpo")
    assert not any("alarms" in r for r in logged)
    watched = Alarm(AlarmConfig(window=3), Keys(), 12)  # the same run, read afterwards: it collapsed unwatched
    fired = [watched.observe(r["step"], r) for r in logged if "loss" in r]
    assert any("length" in f for f in fired)


def test_on_alarm_stop_ends_the_run_with_its_policy_saved(hackable, tmp_path):
    out = grpo.run(hackable(alarm__on_alarm="stop"))
    stopped = out["alarm/stopped_at"]
    assert stopped < 24 and max(r["step"] for r in rows(tmp_path / "grpo")) == stopped
    manifest = json.loads((tmp_path / "grpo" / "llmft.json").read_text())
    assert (tmp_path / "grpo" / "adapter_model.safetensors").is_file()
    assert manifest["metrics"]["alarm/stopped_at"] == stopped


def test_alarm_config_errors(hackable):
    with pytest.raises(ConfigError, match="it needs data.eval"):
        grpo.setup(hackable(alarm__independent="eval/rouge_l"))


@pytest.mark.parametrize("before", [True, False], ids=["killed-before-it-fires", "killed-after-it-fired"])
def test_a_resumed_run_fires_where_the_uninterrupted_one_did(before, hackable, tmp_path, monkeypatch):
    from tests.helpers.runs import crash_then_resume

    grpo.run(hackable(output_dir=str(tmp_path / "full")))
    fired = [r["step"] for r in rows(tmp_path / "full") if "alarms" in r]
    crashed = hackable(output_dir=str(tmp_path / "crashed"))
    at = 2 * fired[0] - 3 if before else 2 * fired[0] + 3  # 2 optimizer steps a step: inside the step before / after
    crash_then_resume(grpo.run, crashed, monkeypatch, at_step=at)
    # the checkpoint holds the alarm's windows and what fired: once, at the same step, whichever side of the kill
    assert [r["step"] for r in rows(tmp_path / "crashed") if "alarms" in r] == fired
