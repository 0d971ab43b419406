"""Every stage under a launcher with 2 CPU processes (gloo): it trains, rank 0's output loads, and 2 processes ×
batch B follow the same loss curve as 1 process × batch 2B."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llmft.config import load_config
from tests.helpers import ROOT
from tests.helpers.cli import free_port

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with gloo is needed")


def launch(nproc: int, *args, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node N -m llmft ARGS` (accelerate launch sets the same variables)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(extra_env or {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "llmft", *map(str, args)]
    return subprocess.run(cmd, env=env, text=True, capture_output=True, timeout=300)


def accelerate_launch(nproc: int, *args, fsdp: bool = False) -> subprocess.CompletedProcess:
    """`accelerate launch [--use_fsdp] --num_processes N -m llmft ARGS` (without --use_fsdp on a machine without
    GPUs it would start one process: accelerate runs several CPU processes only under FSDP or MPI)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *(["--use_fsdp"] if fsdp else []),
           f"--num_processes={nproc}", "--num_machines=1", "--mixed_precision=no", "--dynamo_backend=no",
           f"--main_process_port={free_port()}", "-m", "llmft", *map(str, args)]
    return subprocess.run(cmd, env=env, text=True, capture_output=True, timeout=300)




def ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stderr


def losses(run_dir: Path) -> list[float]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def same_adapter(a: Path, b: Path, atol: float = 2e-4) -> None:
    """Equal adapters, up to float noise (Adam divides by √v, which magnifies it where gradients are tiny)."""
    x, y = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    assert x.keys() == y.keys()
    for k in x:
        torch.testing.assert_close(x[k], y[k], atol=atol, rtol=1e-3 if atol else 0, msg=k)


def test_sft_two_processes_match_one_process_with_twice_the_batch(tiny_model_dir, sft_data, write_config,
                                                                  tmp_path):
    from llmft.stages import sft

    one = write_config(tiny_model_dir, sft_data, train__batch_size=4, train__max_steps=4,
                       output_dir=str(tmp_path / "one"))
    sft.run(load_config("sft", one))
    two = write_config(tiny_model_dir, sft_data, train__batch_size=2, train__max_steps=4,
                       output_dir=str(tmp_path / "two"))
    err = ok(launch(2, "sft", two))
    assert "2 processes = 4 examples per step" in err  # the global batch is reported at the start
    assert len(losses(tmp_path / "two")) == 4
    torch.testing.assert_close(losses(tmp_path / "two"), losses(tmp_path / "one"), rtol=1e-5, atol=1e-6)
    same_adapter(tmp_path / "one", tmp_path / "two")
    from llmft.models.loading import load_model
    from llmft.models.sources import resolve_source

    load_model(resolve_source(str(tmp_path / "two")), torch.float32, torch.device("cpu"),
               load_config("sft", two).model)  # rank 0's output loads (the adapter merges into its base)


def test_sft_resumes_on_the_same_number_of_processes_only(tiny_model_dir, sft_data, write_config, tmp_path):
    cfg = write_config(tiny_model_dir, sft_data, train__batch_size=2, train__max_steps=4, train__save_every=2,
                       output_dir=str(tmp_path / "run"))
    ok(launch(2, "sft", cfg))
    full = tmp_path / "full"
    shutil.copytree(tmp_path / "run", full)
    for name in ("llmft.json", "adapter_model.safetensors"):  # as if killed after checkpoint-2
        (tmp_path / "run" / name).unlink()
    err = launch(1, "sft", cfg, "--set", "resume=auto")
    assert err.returncode != 0 and "written by a run on 2 processes" in err.stderr
    ok(launch(2, "sft", cfg, "--set", "resume=auto"))
    same_adapter(full, tmp_path / "run", atol=0)
    assert losses(full) == losses(tmp_path / "run")


def test_dpo_two_processes_match_one_process_with_twice_the_batch(tiny_model_dir, pref_data, tmp_path):
    import yaml

    from llmft.stages import dpo

    def config(batch: int, name: str) -> Path:
        cfg = {"model": {"name": str(tiny_model_dir)}, "data": {"train": str(pref_data)},
               "lora": {"r": 4, "alpha": 8}, "train": {"batch_size": batch, "max_steps": 3, "learning_rate": 1e-2,
                                                       "save_every": 10}, "output_dir": str(tmp_path / name),
               "seed": 0}
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return path

    dpo.run(load_config("dpo", config(4, "one")))
    ok(launch(2, "dpo", config(2, "two")))
    torch.testing.assert_close(losses(tmp_path / "two"), losses(tmp_path / "one"), rtol=1e-5, atol=1e-6)
    same_adapter(tmp_path / "one", tmp_path / "two")


def test_reward_then_ppo_on_two_processes_train_and_their_outputs_load(tiny_model_dir, pref_data, tmp_path):
    import yaml

    from llmft.models.reward_model import RewardScorer
    from tests.helpers.tiny import ROWS

    rm = {"model": {"name": str(tiny_model_dir)}, "data": {"train": str(pref_data)}, "lora": {"r": 4, "alpha": 8},
          "train": {"batch_size": 2, "max_steps": 2, "learning_rate": 1e-2}, "output_dir": str(tmp_path / "rm"),
          "seed": 0}
    (tmp_path / "rm.yaml").write_text(yaml.safe_dump(rm))
    ok(launch(2, "reward", tmp_path / "rm.yaml"))
    rows = [json.loads(x) for x in (tmp_path / "rm" / "metrics.jsonl").read_text().splitlines()]
    assert [r["pairs"] for r in rows if "loss" in r] == [4, 4]  # 2 pairs on each of 2 processes per step
    assert rows[-1]["reward_range/low"] < rows[-1]["reward_range/high"]  # measured once, by rank 0, logged once
    RewardScorer.load(str(tmp_path / "rm"), "cpu", "float32", 2)

    # 7 prompts, 4 per rollout (2 on each process): one whole rollout per epoch, 3 prompts left out. An uneven last
    # rollout (2 prompts here, 1 there) would run different numbers of minibatches, so different collectives
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS[:7]))
    cfg = {"model": {"name": str(tiny_model_dir)}, "data": {"train": str(tmp_path / "prompts.jsonl")},
           "lora": {"r": 4, "alpha": 8}, "rollout": {"max_new_tokens": 6, "temperature": 0.7},
           "reward": {"model": str(tmp_path / "rm")}, "ppo": {"num_minibatches": 2, "epochs": 2},
           "train": {"batch_size": 1, "max_steps": 2, "learning_rate": 1e-2, "save_every": 1},
           "output_dir": str(tmp_path / "ppo"), "seed": 0, "samples_every": 1}
    (tmp_path / "ppo.yaml").write_text(yaml.safe_dump(cfg))
    plan = " ".join(ok(launch(2, "ppo", tmp_path / "ppo.yaml")).replace("│", " ").split())  # the table's text
    assert "2 rollouts of 4 prompts (2 per process)" in plan and "3 prompts per epoch left out" in plan
    rows = [json.loads(x) for x in (tmp_path / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert [r["episodes"] for r in rows] == [4, 4]  # 2 prompts on each process per rollout
    for name in ("adapter_model.safetensors", "value/adapter_model.safetensors", "value_head.safetensors"):
        assert (tmp_path / "ppo" / name).is_file()
    from llmft.models.loading import load_model
    from llmft.models.sources import resolve_source

    load_model(resolve_source(str(tmp_path / "ppo")), torch.float32, torch.device("cpu"),
               load_config("sft", tmp_path / "rm.yaml").model)

    # FSDP: the same run with the base sharded (reward adapter and value head included) gives the same numbers
    cfg["output_dir"] = str(tmp_path / "ppo-fsdp")
    (tmp_path / "ppo-fsdp.yaml").write_text(yaml.safe_dump(cfg))
    ok(launch(2, "ppo", tmp_path / "ppo-fsdp.yaml", extra_env={"ACCELERATE_USE_FSDP": "true"}))
    fsdp_rows = [json.loads(x) for x in (tmp_path / "ppo-fsdp" / "metrics.jsonl").read_text().splitlines()]
    for key in ("reward", "objective/kl", "loss", "loss/value_avg"):
        torch.testing.assert_close([r[key] for r in fsdp_rows], [r[key] for r in rows], rtol=1e-4, atol=1e-5)


def test_env_reports_versions_devices_and_launcher_settings(monkeypatch):
    from llmft.commands.env import report

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    rows = dict(report())
    assert rows["torch"] == torch.__version__.split("+")[0] or rows["torch"] == torch.__version__
    assert rows["WORLD_SIZE"] == "2" and rows["ACCELERATE_USE_FSDP"] == "true"
    assert "gloo" in rows["torch.distributed"] and "cuda" in rows


def test_sft_under_fsdp_shards_the_base_and_matches_ddp(tiny_model_dir, sft_data, write_config, tmp_path):
    ddp = write_config(tiny_model_dir, sft_data, train__batch_size=2, train__max_steps=3, train__save_every=2,
                       output_dir=str(tmp_path / "ddp"))
    ok(launch(2, "sft", ddp))
    fsdp = write_config(tiny_model_dir, sft_data, train__batch_size=2, train__max_steps=3, train__save_every=2,
                        output_dir=str(tmp_path / "fsdp"), data__eval=str(sft_data))  # eval: every rank joins
    err = ok(accelerate_launch(2, "sft", fsdp, fsdp=True))
    assert "FSDP: base weights sharded over 2 processes in 3 units" in err  # 2 decoder layers + the model
    torch.testing.assert_close(losses(tmp_path / "fsdp"), losses(tmp_path / "ddp"), rtol=1e-5, atol=1e-6)
    same_adapter(tmp_path / "ddp", tmp_path / "fsdp")
    evals = [r["eval/loss"] for r in map(json.loads, (tmp_path / "fsdp" / "metrics.jsonl").read_text().splitlines())
             if "eval/loss" in r]
    assert len(evals) == 2 and all(e > 0 for e in evals)  # at step 0 and at the end, logged once
    assert (tmp_path / "fsdp" / "checkpoint-2" / "adapter_model.safetensors").is_file()
    from llmft.models.loading import load_model
    from llmft.models.sources import resolve_source

    load_model(resolve_source(str(tmp_path / "fsdp")), torch.float32, torch.device("cpu"),
               load_config("sft", fsdp).model)


def test_deepspeed_is_refused_with_a_clear_message(monkeypatch):
    from llmft import distributed
    from llmft.errors import ConfigError

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(ConfigError, match="DeepSpeed is not supported.*--use_fsdp"):
        distributed.init()
    assert distributed.world().size == 1  # nothing was started


def test_a_bad_config_under_a_launcher_is_one_clear_line(tmp_path):
    (tmp_path / "bad.yaml").write_text("model: {name: m}\ndata: {train: x.jsonl}\nbogus: 1\n")
    proc = launch(2, "sft", tmp_path / "bad.yaml")
    assert proc.returncode != 0
    assert proc.stderr.count("unknown key 'bogus'") == 1  # said by rank 0 only, not once per process


def test_grpo_two_processes_match_one_process_with_twice_the_batch(tiny_model_dir, tmp_path, monkeypatch):
    import yaml

    from llmft.stages import grpo
    from tests.helpers import grpo_row_sampler
    from tests.helpers.tiny import ROWS

    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))

    def config(batch: int, name: str) -> Path:
        cfg = {"model": {"name": str(tiny_model_dir)}, "data": {"train": str(tmp_path / "prompts.jsonl")},
               "lora": {"r": 4, "alpha": 8}, "rollout": {"max_new_tokens": 5, "temperature": 1.0},
               "reward": {"judges": {"rouge_l": 1.0}}, "grpo": {"num_generations": 4, "scale_rewards": "batch"},
               "train": {"batch_size": batch, "max_steps": 2, "learning_rate": 1e-2, "save_every": 10},
               "output_dir": str(tmp_path / name), "seed": 0}
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return path

    monkeypatch.setattr(grpo, "sample", grpo_row_sampler.sample)
    grpo.run(load_config("grpo", config(8, "one")))  # 2 prompts × 4 answers per step, in one process
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(ROOT / "tests/helpers/grpo_row_sampler.py"), str(config(4, "two"))], env=env,
                          text=True, capture_output=True, timeout=300)  # 1 prompt × 4 answers on each process
    ok(proc)
    torch.testing.assert_close(losses(tmp_path / "two"), losses(tmp_path / "one"), rtol=1e-5, atol=1e-6)
    same_adapter(tmp_path / "one", tmp_path / "two")


def test_kto_two_processes_match_one_process_at_step_one_and_keep_going(tiny_model_dir, pref_data, tmp_path):
    # at step 1 the policy is the reference (z0 = 0 however the rows are paired): 2 processes == 1 process with
    # twice the batch; later z0 pairs each process's own rows, so only finite losses and the same keys are checked
    import yaml

    from llmft.stages import kto

    def config(batch: int, name: str, steps: int) -> Path:
        cfg = {"model": {"name": str(tiny_model_dir)}, "data": {"train": str(pref_data)},
               "lora": {"r": 4, "alpha": 8}, "train": {"batch_size": batch, "max_steps": steps, "learning_rate": 1e-2,
                                                       "save_every": 10}, "output_dir": str(tmp_path / name),
               "seed": 0}
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return path

    kto.run(load_config("kto", config(4, "one", 1)))
    ok(launch(2, "kto", config(2, "two", 1)))
    torch.testing.assert_close(losses(tmp_path / "two"), losses(tmp_path / "one"), rtol=1e-5, atol=1e-6)
    same_adapter(tmp_path / "one", tmp_path / "two")
    ok(launch(2, "kto", config(2, "longer", 4)))
    rows = [json.loads(x) for x in (tmp_path / "longer" / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert len(rows) == 4 and all(math.isfinite(r["loss"]) and r["kl_reference_point"] >= 0 for r in rows)


def test_multi_turn_grpo_two_processes_match_one_process_with_twice_the_batch(talking_dir, tmp_path, monkeypatch):
    """Each process rolls out its own groups' conversations (the same number of turns everywhere): 2 processes ×
    1 prompt's 4 trajectories follow 1 process × 2 prompts' 8."""
    import yaml

    from llmft.rl import engine
    from llmft.stages import grpo
    from tests.helpers import grpo_row_sampler
    from tests.helpers.tiny import ROWS

    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))

    def config(batch: int, name: str) -> Path:
        cfg = {"model": {"name": str(talking_dir)}, "data": {"train": str(tmp_path / "prompts.jsonl")},
               "lora": {"r": 4, "alpha": 8, "dropout": 0.0}, "rollout": {"max_new_tokens": 12, "temperature": 1.0},
               "reward": {}, "env": {"name": "tests.helpers.envs:TwoTurns", "max_tokens": 48},
               "grpo": {"num_generations": 4, "scale_rewards": "batch"},
               "train": {"batch_size": batch, "max_steps": 2, "learning_rate": 1e-2, "save_every": 10},
               "output_dir": str(tmp_path / name), "seed": 0}
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return path

    monkeypatch.setattr(engine.HFEngine, "sample", grpo_row_sampler.engine_sample)
    grpo.run(load_config("grpo", config(8, "one")))
    rows = [json.loads(x) for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    assert max(r.get("env/turns", 0) for r in rows) > 1
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(ROOT / "tests/helpers/grpo_row_sampler.py"), str(config(4, "two"))], env=env,
                          text=True, capture_output=True, timeout=300)
    ok(proc)
    torch.testing.assert_close(losses(tmp_path / "two"), losses(tmp_path / "one"), rtol=1e-5, atol=1e-6)
    same_adapter(tmp_path / "one", tmp_path / "two")
