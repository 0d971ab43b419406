"""Hub kernels stay off unless a config asks: no model llmft loads is kernelized by transformers (in train or eval
mode), `model.kernels: true` asks for them and is recorded, and bitsandbytes' import fetches nothing from the Hub."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest
import torch

from llmft.commands.evaluation import run as run_eval
from llmft.commands.generate import run_generate
from llmft.config import ModelConfig, load_config
from llmft.export.hf import run_export
from llmft.models import hub_kernels
from llmft.models.loading import load_model
from llmft.models.reward_model import RewardScorer
from llmft.models.sources import resolve_source
from llmft.schema import build
from llmft.stages import reward, sft


@pytest.fixture
def kernelize_calls(monkeypatch):
    """Every call transformers makes to `kernelize` (the Hub kernel swap), recorded instead of run."""
    pytest.importorskip("kernels")
    modeling_utils = pytest.importorskip("transformers.modeling_utils")
    if not hasattr(modeling_utils, "kernelize"):
        pytest.skip("this transformers has no Hub kernels")
    calls = []

    def kernelize(model, *args, **kwargs):
        calls.append(type(model).__name__)
        model._use_kernels = True  # as the real one marks it

    monkeypatch.setattr(modeling_utils, "kernelize", kernelize)
    monkeypatch.delenv("USE_HUB_KERNELS", raising=False)  # transformers' default: on
    return calls


def flip_modes(model) -> None:
    model.train()
    model.eval()


def test_no_model_llmft_loads_is_kernelized(kernelize_calls, tiny_model_dir, sft_data, pref_data, write_config,
                                             tmp_path):
    assert ModelConfig().kernels is False
    flip_modes(load_model(resolve_source(str(tiny_model_dir)), torch.float32, torch.device("cpu"),
                          ModelConfig(name=str(tiny_model_dir))))
    sft.run(load_config("sft", write_config(tiny_model_dir, sft_data, train__max_steps=1,
                                            output_dir=str(tmp_path / "sft"))))
    reward.run(load_config("reward", write_config(tmp_path / "sft", pref_data, train__max_steps=1,
                                                  output_dir=str(tmp_path / "rm"))))
    flip_modes(RewardScorer.load(str(tmp_path / "rm"), "cpu").model)
    run_generate(build_generate(tmp_path / "sft", sft_data, tmp_path))
    run_eval(load_config("eval", None, base={"models": [str(tmp_path / "sft")], "prompts": str(sft_data),
                                             "reference": str(tiny_model_dir), "limit": 2, "judges": ["rouge_l"],
                                             "sampling": {"max_new_tokens": 3}}))
    run_export(str(tmp_path / "sft"), str(tmp_path / "exported"))
    assert kernelize_calls == []
    assert json.loads((tmp_path / "sft" / "llmft.json").read_text())["model"]["kernels"] is False


def build_generate(model, prompts, tmp_path):
    from llmft.config import GenerateConfig

    return build(GenerateConfig, {"model": str(model), "prompts": str(prompts), "out": str(tmp_path / "gen.jsonl"),
                                  "limit": 2, "sampling": {"max_new_tokens": 3}}, "test")


def test_model_kernels_true_asks_transformers_and_is_recorded(kernelize_calls, tiny_model_dir, sft_data,
                                                              write_config, tmp_path):
    cfg = load_config("sft", write_config(tiny_model_dir, sft_data, train__max_steps=1, model__kernels=True,
                                          output_dir=str(tmp_path / "sft")))
    sft.run(cfg)
    assert kernelize_calls  # loaded with use_kernels=True: transformers kernelized it (here: recorded only)
    record = json.loads((tmp_path / "sft" / "llmft.json").read_text())
    assert record["model"]["kernels"] is True and record["config"]["model"]["kernels"] is True


def test_a_model_kernelized_against_the_config_is_refused():
    class Kernelized(torch.nn.Module):
        use_kernels = True

    with pytest.raises(hub_kernels.ModelError, match="kernelized m although model.kernels is false"):
        hub_kernels.check_loaded(Kernelized(), False, "m")
    assert isinstance(hub_kernels.check_loaded(Kernelized(), True, "m"), Kernelized)


def test_the_refused_fetch_raises_and_only_its_warning_is_dropped(monkeypatch, caplog):
    kernels = pytest.importorskip("kernels")
    fetched = []
    monkeypatch.setattr(kernels, "get_kernel", lambda repo, **k: fetched.append(repo))
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.WARNING, logger=logger.name), hub_kernels.fetch_refused():
        with pytest.raises(hub_kernels.HubKernelsRefused):
            kernels.get_kernel("kernels-community/quantization-bitsandbytes", version=1)
        try:
            kernels.get_kernel("kernels-community/x")
        except hub_kernels.HubKernelsRefused as e:
            logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s", e)
        logger.warning("another warning: %s", "kept")
    assert [r.getMessage() for r in caplog.records] == ["another warning: kept"]
    assert fetched == []
    kernels.get_kernel("after")  # restored on exit
    assert fetched == ["after"]


def test_importing_llmft_fetches_no_kernel_and_prints_nothing(tmp_path):
    """In a fresh process (bitsandbytes not imported yet), with `kernels.get_kernel` recording what it is asked."""
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("kernels")
    probe = ("import kernels, sys\n"
             "asked = []\n"
             "kernels.get_kernel = lambda repo, *a, **k: asked.append(repo)\n"
             "import llmft.models.loading, peft, bitsandbytes\n"
             "print(asked, kernels.get_kernel.__name__)\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[] <lambda>"  # no fetch, and the recorder back in place
    assert "kernels-community" not in out.stderr and "Failed to load" not in out.stderr
