"""QLoRA (`model.quantization: nf4 | int8`): every stage trains LoRA on a bitsandbytes-quantised base, and whatever
reads the run afterwards (a later stage, eval, export) merges the adapter into that base de-quantised — checked against
transformers' and peft's own QLoRA, not against llmft's code."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml

from llmft.config import load_config
from llmft.errors import ModelError
from llmft.rl.stage import sample
from llmft.stages import dpo, ppo, reward, sft
from tests.helpers.cli import assert_one_line_error, llmft
from tests.helpers.runs import train_in_process
from tests.helpers.tiny import PAIRS, ROWS, ids


def bitsandbytes_here() -> str | None:
    """Why QLoRA cannot be tested on this machine (None: it can)."""
    try:
        import bitsandbytes as bnb

        layer = bnb.nn.Linear4bit(64, 64, compute_dtype=torch.float32, quant_type="nf4")
        layer.weight = bnb.nn.Params4bit(torch.randn(64, 64), requires_grad=False, quant_type="nf4")
        layer.to("cpu")(torch.randn(1, 64))
    except Exception as e:  # noqa: BLE001
        return f"bitsandbytes cannot quantise on this machine's CPU: {type(e).__name__}: {e}"
    return None


pytestmark = pytest.mark.skipif(bool(bitsandbytes_here()), reason=str(bitsandbytes_here()))


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    """sft with an nf4 base on the tiny model, then dpo (nf4) on its output: two steps each at a learning rate that
    moves every LoRA weight visibly."""
    d = tmp_path_factory.mktemp("qlora")
    (d / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (d / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in PAIRS))

    def run(stage, module, model, data):
        cfg = {"model": {"name": str(model), "quantization": "nf4"},
               "data": {"train": str(d / data), "max_length": 64}, "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
               "output_dir": str(d / stage), "seed": 0,
               "train": {"batch_size": 4, "max_steps": 2, "learning_rate": 5e-2, "warmup_ratio": 0.0,
                         "save_every": 100}}
        (d / f"{stage}.yaml").write_text(yaml.safe_dump(cfg))
        module.run(load_config(stage, d / f"{stage}.yaml"))
        return d / stage

    return {"dir": d, "base": tiny_model_dir, "sft": run("sft", sft, tiny_model_dir, "sft.jsonl"),
            "dpo": run("dpo", dpo, d / "sft", "pairs.jsonl")}


def peft_qlora(base_dir, adapter_dir):
    """The base quantised by transformers (BitsAndBytesConfig: nf4, double quantisation, fp32 compute) with the run's
    adapter applied by peft: the model the run trained."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=q, dtype=torch.float32)
    return PeftModel.from_pretrained(model, adapter_dir).train()  # train mode: bitsandbytes' CPU repacking is off


@torch.no_grad()
def test_export_of_a_qlora_run_equals_the_adapter_on_the_quantised_base(runs, capsys, monkeypatch):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = runs["dir"] / "exported-sft"
    code, _, err = llmft(capsys, monkeypatch, "export", runs["sft"], "--out", out, "--dtype", "float32")
    assert code == 0, err
    exported = AutoModelForCausalLM.from_pretrained(out).eval()
    assert not any("4bit" in type(m).__name__ for m in exported.modules())  # a plain model, de-quantised
    x = ids(AutoTokenizer.from_pretrained(out))
    expected = peft_qlora(runs["base"], runs["sft"])(x).logits
    torch.testing.assert_close(exported(x).logits, expected, atol=1e-4, rtol=0)
    # merged into the original full-precision weights instead, the model would be another one
    naive = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(runs["base"]), runs["sft"]).eval()
    assert (naive(x).logits - expected).abs().max() > 1e-2


def test_the_manifest_records_the_quantised_base_and_a_chained_stage_starts_from_its_parent(runs):
    record = json.loads((runs["sft"] / "llmft.json").read_text())
    assert record["model"]["quantization"] == {"kind": "nf4", "compute_dtype": "float32"}
    first = json.loads((runs["dpo"] / "metrics.jsonl").read_text().splitlines()[0])
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)  # reference == policy at step 1 on the nf4 base


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_only_lora_weights_train_on_a_quantised_base(tiny_model_dir, sft_data, write_config, kind):
    cfg = load_config("sft", write_config(tiny_model_dir, sft_data, model__quantization=kind, train__max_steps=2,
                                          train__gradient_checkpointing=True))
    model, before, final = train_in_process(sft, cfg)
    layers = {type(m.base_layer).__name__ for n, m in model.named_modules() if hasattr(m, "base_layer")}
    assert layers == {"Linear4bit" if kind == "nf4" else "Linear8bitLt"}
    assert type(model.get_output_embeddings()).__name__ == "Linear"  # the LM head stays in full precision
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}
    assert changed and all("lora_" in n for n in changed), sorted(changed)[:5]
    assert math.isfinite(final["loss"])


def test_the_reward_stage_trains_lora_and_head_on_an_nf4_base(tiny_model_dir, pref_data, write_config):
    cfg = load_config("reward", write_config(tiny_model_dir, pref_data, model__quantization="nf4",
                                             train__max_steps=2))
    model, before, final = train_in_process(reward, cfg)
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}
    assert changed and all("lora_" in n or n.startswith("head.") for n in changed), sorted(changed)[:5]
    assert math.isfinite(final["loss"])


def test_ppo_on_an_nf4_base_samples_what_it_trains(ppo_config):  # noqa: F811
    s = ppo.setup(ppo_config(model__quantization="nf4"))
    assert not s.share_reward  # the reward model was trained on the full-precision base: it keeps its own
    model = ppo.build_model(s)
    exp = sample(model, s, s.train.ids[:4], 0)
    ppo.role_forwards(model, s, exp)
    assert torch.equal(exp.old_logps, exp.ref_logps)
    assert exp.logprob_gap()[0] < 1e-4  # the trainer recomputes what the sampler drew from, on the same nf4 base


def test_grpo_on_an_nf4_base_starts_at_ratio_one(grpo_config):  # noqa: F811
    from tests.helpers.runs import first_update

    s, exp, stats, _ = first_update(grpo_config, model__quantization="nf4", grpo__num_minibatches=1)
    assert stats[0]["ratio"] == pytest.approx(1.0, abs=1e-6) and exp.logprob_gap()[0] < 1e-4


def test_quantization_errors(tiny_model_dir, sft_data, write_config, capsys, monkeypatch):
    cfg = write_config(tiny_model_dir, sft_data, model__quantization="fp8")
    code, _, err = llmft(capsys, monkeypatch, "sft", cfg)
    assert_one_line_error(code, err, "model.quantization", "'nf4', 'int8'")
    monkeypatch.setitem(__import__("sys").modules, "bitsandbytes", None)  # not installed
    code, _, err = llmft(capsys, monkeypatch, "sft", write_config(tiny_model_dir, sft_data, model__quantization="nf4"),
                         "--dry-run")
    assert_one_line_error(code, err, "model.quantization: nf4 needs bitsandbytes", "llmft[qlora]")
    monkeypatch.undo()
    monkeypatch.setattr("llmft.distributed.fsdp", lambda: True)
    s = sft.setup(load_config("sft", write_config(tiny_model_dir, sft_data, model__quantization="nf4")))
    with pytest.raises(ModelError, match="FSDP does not shard"):
        sft.load_model(s.source, s.dtype, s.device, s.cfg.model)



def test_generation_and_training_see_the_same_quantised_weights():
    # bitsandbytes' CPU fast path would repack a layer's weight with bf16 block constants on its first no-grad call
    # in eval mode (as in generation): sampler and trainer would then use two different bases
    from llmft.models.quantization import quantize

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(128, 128), torch.nn.Linear(128, 64))
    model.get_output_embeddings = lambda: None
    model = quantize(model, "nf4", torch.float32).to("cpu")
    x = torch.randn(3, 128)
    with torch.no_grad():
        sampled = model.eval()(x)
    trained = model.train()(x.requires_grad_())
    assert torch.equal(sampled, trained.detach())


@pytest.mark.parametrize("kind", ["nf4", "int8"])
@torch.no_grad()
def test_every_family_merges_its_qlora_adapter_into_the_dequantised_base(kind, tmp_path):
    from peft import PeftModel

    from llmft.config import LoraConfig, ModelConfig
    from llmft.models.adapters import add_lora
    from llmft.models.loading import load_model
    from llmft.models.quantization import round_trip
    from llmft.models.sources import resolve_source
    from tests.helpers.families import FAMILIES, build

    x = torch.tensor([[5, 9, 14, 3, 27, 8, 11]])
    for f in FAMILIES:
        path = build(f, tmp_path / f.name)
        quantized = load_model(resolve_source(str(path)), torch.float32, torch.device("cpu"),
                               ModelConfig(name=str(path), quantization=kind))
        lm = add_lora(quantized, LoraConfig(r=4, alpha=8, dropout=0.0))
        torch.manual_seed(1)
        for name, p in lm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
        trained = lm.train()(x).logits  # as the stage computes them (train mode, dropout 0)
        lm.save_pretrained(tmp_path / f"{f.name}-adapter")
        full = load_model(resolve_source(str(path)), torch.float32, torch.device("cpu"), ModelConfig(name=str(path)))
        merged = PeftModel.from_pretrained(round_trip(full, kind, torch.float32), tmp_path / f"{f.name}-adapter")
        torch.testing.assert_close(merged.merge_and_unload().eval()(x).logits, trained, atol=1e-4, rtol=0,
                                   msg=f.name)
