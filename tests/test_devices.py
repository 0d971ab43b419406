"""Device discipline without a GPU: every stage and command runs under fake CUDA (`tests/helpers/fake_cuda.py`),
where mixing a device tensor with a host tensor fails as it does on a GPU. CI has no GPU: this is what guards the
main use."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from llmft.commands import evaluation
from llmft.commands import generate as generate_command
from llmft.config import load_config
from llmft.models import loading, reward_model
from llmft.stages import dpo, grpo, ppo, reward, sft
from tests.helpers.fake_cuda import CUDA, FakeCuda, MixedDevice


@pytest.fixture
def fake_cuda(monkeypatch):
    """Stages resolve their device to cuda:0, whose tensors are fake; CUDA-only calls become no-ops."""
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a, **k: 0)
    for module in (loading, generate_command, evaluation, reward_model):
        monkeypatch.setattr(module, "resolve_device", lambda device: CUDA)
    mode = FakeCuda()
    with mode:
        yield mode
    assert mode.calls > 1000  # the step really ran inside the mode


def test_the_fake_device_catches_mixed_arithmetic():
    with FakeCuda():
        on_gpu, on_cpu = torch.ones(3, device="cuda"), torch.ones(3)
        assert on_gpu.device == CUDA and on_cpu.device.type == "cpu"
        assert torch.equal((on_gpu * torch.tensor(2.0)).cpu(), torch.full((3,), 2.0))  # a CPU scalar is fine
        assert (on_gpu[torch.tensor([0, 2])]).is_cuda  # so are host indices
        with pytest.raises(MixedDevice, match="mul"):
            on_gpu * on_cpu
        with pytest.raises(MixedDevice, match="cat"):
            torch.cat([on_gpu, on_cpu])
        model = torch.nn.Linear(3, 1).to(CUDA)
        with pytest.raises(MixedDevice):
            model(on_cpu)
        assert model(on_gpu).is_cuda


@pytest.fixture
def stage_config(tiny_model_dir, pref_data, sft_data, tmp_path):
    import yaml

    from tests.helpers.tiny import ROWS

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({**r, "constraints": [{"type": "lowercase"}]}) + "\n" for r in ROWS))

    def write(stage: str, **extra) -> object:
        data = {"sft": sft_data, "reward": pref_data, "dpo": pref_data, "ppo": prompts, "grpo": prompts}[stage]
        cfg = {"model": {"name": str(tiny_model_dir), "dtype": "float32"}, "device": "cuda",
               "data": {"train": str(data), "eval": str(data)}, "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
               "train": {"batch_size": 2, "max_steps": 2, "save_every": 1}, "output_dir": str(tmp_path / stage),
               **extra}
        if stage in ("ppo", "grpo"):
            cfg["data"]["max_prompt_length"] = 64
            cfg.update(rollout={"max_new_tokens": 4},
                       reward={"model": str(tmp_path / "reward"), "judges": {"constraints": 1.0}, "normalize": True})
            cfg[stage] = {"num_minibatches": 2} if stage == "ppo" else {
                "num_generations": 2, "num_minibatches": 2, "iterations": 2, "beta": 0.1, "scale_rewards": "batch"}
        else:
            cfg["data"]["max_length"] = 64
        path = tmp_path / f"{stage}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return load_config(stage, path)

    return write


def test_every_training_stage_keeps_its_tensors_on_one_device(stage_config, fake_cuda):
    for module in (sft, reward, dpo, ppo, grpo):  # ppo and grpo score with the reward model just trained
        name = module.__name__.rsplit(".", 1)[-1]
        extra = {"loss": {"precompute_reference": True}} if module is dpo else {}
        metrics = module.run(stage_config(name, **extra))
        assert all(v == v for v in metrics.values() if isinstance(v, float)), name  # finite, not NaN


@pytest.mark.parametrize("module", [grpo, ppo], ids=["grpo", "ppo"])
def test_multi_turn_rl_keeps_its_tensors_on_one_device(module, stage_config, talking_dir, fake_cuda):
    name = module.__name__.rsplit(".", 1)[-1]
    cfg = stage_config(name, env={"name": "tests.helpers.envs:TwoTurns", "max_tokens": 48})
    cfg.model.name, cfg.reward.model, cfg.reward.judges = str(talking_dir), None, {}
    cfg.reward.normalize = module is ppo  # ppo places each turn's reward scaled by the running std
    cfg.rollout.max_new_tokens = 12
    module.run(cfg)
    rows = [json.loads(x) for x in (Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines()]
    assert max(r.get("env/turns", 0) for r in rows) > 1  # the environment's tokens went through, on the device
    assert any("eval/env/turns" in r for r in rows)


def test_eval_with_an_environment_keeps_its_tensors_on_one_device(talking_dir, tmp_path, fake_cuda):
    from llmft.config import EnvConfig, EvalConfig, SamplingConfig

    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "hi"}\n{"prompt": "a story"}\n')
    model = str(talking_dir)
    report = evaluation.run(EvalConfig(models=[model], prompts=str(prompts), reference=model, device="cuda",
                                       env=EnvConfig(name="tests.helpers.envs:TwoTurns", max_tokens=48),
                                       sampling=SamplingConfig(max_new_tokens=12)))
    assert report["models"][model]["env/turns"] > 1 and report["models"][model]["kl_to_reference"] == 0.0


def test_generate_and_eval_keep_their_tensors_on_one_device(stage_config, tiny_model_dir, tmp_path, fake_cuda):
    from llmft.config import EvalConfig, GenerateConfig, SamplingConfig

    reward.run(stage_config("reward"))
    prompts = str(tmp_path / "prompts.jsonl")
    sampling = SamplingConfig(max_new_tokens=4, temperature=0.7, top_k=5, top_p=0.9)
    rows = generate_command.run_generate(GenerateConfig(model=str(tiny_model_dir), prompts=prompts, sampling=sampling,
                                                  limit=3, device="cuda"))
    assert len(rows) == 3
    model = str(tiny_model_dir)
    report = evaluation.run(EvalConfig(models=[model], prompts=prompts, reference=model, limit=3, device="cuda",
                                       reward_model=str(tmp_path / "reward"), judges=["constraints", "reward"],
                                       sampling=SamplingConfig(max_new_tokens=4)))
    assert {"reward", "kl_to_reference", "constraints/pass_rate"} <= set(report["models"][model])


def test_dpo_precomputes_its_reference_once_the_model_is_on_its_device(stage_config, monkeypatch, fake_cuda):
    # under FSDP the model is loaded on the CPU and reaches its GPU only when sharded, after build_model
    from llmft import distributed
    monkeypatch.setattr(distributed, "fsdp", lambda: True)
    monkeypatch.setattr(distributed, "shard_model", lambda model, lm, device: bool(model.to(device)))
    seen, real = [], dpo.reference_logps
    monkeypatch.setattr(dpo, "reference_logps", lambda model, pairs, s: seen.append(
        next(model.parameters()).is_cuda) or real(model, pairs, s))
    dpo.run(stage_config("dpo", loss={"precompute_reference": True}))
    assert seen == [True, True]  # train and eval pairs, both on the device
