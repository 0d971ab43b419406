"""GRPO and PPO with rollout.engine: vllm — the sampler's log-probs equal to the trainer's at step 1 and after,
the policy's weights provably reaching the engine (a test that fails when a sync is skipped), exact resume with the
engine restarted, QLoRA, the importance correction, several processes, one-line errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from llmft.config import load_config
from llmft.errors import TrainingAborted
from llmft.stages import grpo, ppo
from tests.conftest import JUDGE
from tests.helpers import ROOT
from tests.helpers.cli import assert_one_line_error, llmft
from tests.helpers.runs import crash_then_resume, save_config, set_keys
from tests.helpers.tiny import ROWS
from tests.helpers.vllm import build_llama, require_vllm

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def vllm_model(tmp_path_factory):
    require_vllm()
    return build_llama(tmp_path_factory.mktemp("vllm-rl-model"))


@pytest.fixture
def config(vllm_model, tmp_path, monkeypatch):
    (tmp_path / "lenjudge.py").write_text(JUDGE)
    monkeypatch.syspath_prepend(str(tmp_path))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({**r, "constraints": [{"type": "lowercase"}]}) + "\n" for r in ROWS))

    def write(stage: str = "grpo", **overrides):
        cfg = {"model": {"name": str(vllm_model)}, "data": {"train": str(prompts)}, "lora": {"r": 4, "alpha": 8},
               "rollout": {"max_new_tokens": 8, "temperature": 1.0, "engine": "vllm",
                           "vllm": {"kv_cache_gb": 0.0625}},
               "reward": {"judges": {"lenjudge:fn": 1.0, "constraints": 0.5}},
               "train": {"batch_size": 4, "max_steps": 3, "learning_rate": 1e-2, "save_every": 1},
               "output_dir": str(tmp_path / stage), "seed": 0, "samples_every": 1}
        cfg.update({"grpo": {"num_generations": 4, "num_minibatches": 2}} if stage == "grpo" else
                   {"ppo": {"num_minibatches": 2, "epochs": 1}})
        return load_config(stage, save_config(tmp_path, stage, set_keys(cfg, overrides)))

    return write


def metrics(folder) -> list[dict]:
    return [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]


def test_grpo_samples_the_policy_it_trains_at_every_step(config, tmp_path):
    out = grpo.run(config())
    rows = metrics(tmp_path / "grpo")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(r["logprob_gap"] < 1e-4 for r in rows)  # the trainer recomputes what vLLM drew from, every step
    assert all(r["engine/probe_gap"] < 1e-4 for r in rows)
    assert [r["engine/syncs"] for r in rows] == [1, 2, 3]  # a new adapter before each rollout after an update
    assert out["loss"] == out["loss"] and (tmp_path / "grpo" / "engine" / "rank0.log").is_file()
    assert len(list((tmp_path / "grpo" / "engine" / "rank0").glob("adapter-*"))) == 1  # older versions removed
    assert not engine_processes()  # the engine ended with the run, not at the interpreter's exit


def engine_processes() -> list:
    import psutil

    return [p for p in psutil.Process().children(recursive=True) if "vllm_worker" in " ".join(p.cmdline())]


@pytest.mark.parametrize("sync", ["merged", "adapter"])
def test_a_sync_that_never_reaches_the_engine_stops_the_run(config, monkeypatch, tmp_path, sync):
    """The engine is given the first adapter again instead of the new one (the bug of LoRA weights that never reach
    the sampler), merged or as an adapter: the probe check stops the run at step 2, before a rollout from the stale
    policy trains it."""
    from llmft.rl import engine as rl_engine

    real = rl_engine.save_adapter

    def stale(model, path, **kwargs):
        first = path.parent / "first"
        if not first.exists():
            real(model, first, **kwargs)
        shutil.copytree(first, path)

    monkeypatch.setattr(rl_engine, "save_adapter", stale)
    with pytest.raises(TrainingAborted, match="did not reach the vLLM engine: after sync 2"):
        grpo.run(config(rollout__vllm__sync=sync))
    assert [r["step"] for r in metrics(tmp_path / "grpo")] == [1]


def test_resume_after_a_kill_equals_the_uninterrupted_run(config, monkeypatch, tmp_path):
    grpo.run(config(output_dir=str(tmp_path / "full")))
    crashed = config(output_dir=str(tmp_path / "crashed"))
    crash_then_resume(grpo.run, crashed, monkeypatch, at_step=4)  # inside step 2: the engine restarts at step 2
    a, b = (load_file(tmp_path / run / "adapter_model.safetensors") for run in ("full", "crashed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    full, resumed = metrics(tmp_path / "full"), metrics(tmp_path / "crashed")
    assert [r["step"] for r in resumed] == [1, 2, 3]
    assert [(r["loss"], r["reward"]) for r in resumed] == [(r["loss"], r["reward"]) for r in full]


def test_ppo_with_vllm_and_the_adapter_loaded_as_an_adapter(config, tmp_path):
    ppo.run(config("ppo", rollout__temperature=0.7, rollout__vllm__sync="adapter"))
    rows = metrics(tmp_path / "ppo")
    assert len(rows) == 3 and all(r["logprob_gap"] < 1e-4 and r["engine/probe_gap"] < 1e-4 for r in rows)


def test_a_qlora_policy_samples_from_its_dequantised_base_with_its_adapter_merged(config, tmp_path, monkeypatch):
    pytest.importorskip("bitsandbytes")
    monkeypatch.setenv("LLMFT_CACHE", str(tmp_path / "cache"))
    grpo.run(config(model__quantization="nf4", train__max_steps=2))
    assert all(r["logprob_gap"] < 1e-4 and r["engine/probe_gap"] < 1e-4 for r in metrics(tmp_path / "grpo"))
    written = list((tmp_path / "cache" / "engine").glob("*/llmft-engine.json"))
    assert len(written) == 1 and json.loads(written[0].read_text())["quantization"]["kind"] == "nf4"


def test_the_importance_correction_reweighs_tokens_and_lets_a_gap_through(config, tmp_path, monkeypatch):
    """A sampler that reports log-probs 0.5 lower than its distribution's: without a correction step 1 stops; with
    tis the run goes on, each token's weight min(exp(0.5), 2)."""
    from llmft.rl import engine as rl_engine

    real = rl_engine.VLLMPolicyEngine.sample

    def off(self, model, prompts, sampling, logprobs=False):
        answers = real(self, model, prompts, sampling, logprobs)
        for a in answers:
            a.logprobs = [x - 0.5 for x in a.logprobs] if a.logprobs else a.logprobs
        return answers

    monkeypatch.setattr(rl_engine.VLLMPolicyEngine, "sample", off)
    with pytest.raises(TrainingAborted, match="differ from the sampler's by 0.5"):
        grpo.run(config(output_dir=str(tmp_path / "none"), train__max_steps=1))
    seen = []
    real_weights = grpo.correction_weights

    def spy(*args, **kwargs):
        seen.append(real_weights(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(grpo, "correction_weights", spy)
    grpo.run(config(output_dir=str(tmp_path / "tis"), train__max_steps=1, rollout__correction="tis"))
    w = torch.cat([x[x > 0] for x in seen])
    assert torch.allclose(w, torch.full_like(w, 1.6487), atol=1e-3)  # exp(0.5) < C = 2


def test_two_processes_each_run_an_engine(config, tmp_path):
    """Each process samples its own prompts' groups with an engine of its own (its own log), seeded by rank."""
    cfg = save_config(tmp_path, "grpo-ddp", set_keys(yaml_of(config(train__max_steps=2)), {"train__batch_size": 2}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "llmft",
           "grpo", str(cfg)]
    run = subprocess.run(cmd, cwd=ROOT, text=True, capture_output=True, timeout=400,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(tmp_path)})
    assert run.returncode == 0, run.stderr[-3000:]
    out = tmp_path / "grpo"
    assert {p.name for p in (out / "engine").glob("rank*.log")} == {"rank0.log", "rank1.log"}
    assert all(r["logprob_gap"] < 1e-4 and r["engine/probe_gap"] < 1e-4 for r in metrics(out))


def yaml_of(cfg) -> dict:
    import yaml

    from llmft.schema import to_yaml

    return yaml.safe_load(to_yaml(cfg))


def test_engine_errors_are_one_line(config, tmp_path, capsys, monkeypatch, tiny_model_dir):
    path = save_config(tmp_path, "bad", set_keys(yaml_of(config()), {"rollout__vllm__python": "/no/such/python"}))
    code, _, err = llmft(capsys, monkeypatch, "grpo", path)
    assert_one_line_error(code, err, "rollout.vllm.python: no interpreter /no/such/python")
    unsupported = set_keys(yaml_of(config()), {"model__name": str(tiny_model_dir), "overwrite": True})
    code, _, err = llmft(capsys, monkeypatch, "grpo", save_config(tmp_path, "head8", unsupported))
    assert_one_line_error(code, err, "cannot run vLLM on this model", "head_dim=8")


@pytest.fixture(scope="module")
def vllm_talking(vllm_model, tmp_path_factory):
    from tests.conftest import teach_to_end_turns

    return teach_to_end_turns(vllm_model, tmp_path_factory.mktemp("vllm-talking"))


@pytest.mark.parametrize("module", [grpo, ppo], ids=["grpo", "ppo"])
def test_multi_turn_rollouts_on_vllm_sample_what_the_trainer_trains(module, config, vllm_talking, tmp_path):
    """Token ids in, token ids out over several turns: the engine continues each trajectory from the policy's own
    ids and the environment's suffix, and its log-probs equal the trainer's over every policy turn."""
    stage = module.__name__.rsplit(".", 1)[-1]
    module.run(config(stage, **{"model__name": str(vllm_talking), "reward__judges": {}, "rollout__max_new_tokens": 12,
                                "env__name": "tests.helpers.envs:TwoTurns", "env__max_tokens": 48,
                                "train__max_steps": 2}))
    rows = metrics(tmp_path / stage)
    assert max(r["env/turns"] for r in rows) > 1
    assert all(r["logprob_gap"] < 1e-4 for r in rows)
