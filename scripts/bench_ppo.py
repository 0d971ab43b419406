"""`scripts/bench.py ppo`: llmft ppo's speed and memory, and its peak memory against llmft sft's on the same
model and batch.

    python scripts/bench.py ppo [--model smollm2-135m-instruct --batch-size 8 --max-new-tokens 64 --steps 3]

In a scratch folder: (1) a one-step `llmft reward` run gives a reward checkpoint on the model (so PPO runs
with all four roles: policy, value, reward, reference on one base); (2) `llmft ppo` with rollout batch =
micro-batch = --batch-size prompts; (3) `llmft sft` with the same micro-batch on prompt/completion rows.
Each runs as its own process; the parent takes its peak RSS with os.wait4 (CUDA: llmft's cuda_peak_mib).
PPO's rates count the steps after --warmup-steps: episodes/s, tokens/s (prompt + response tokens), and the
share of time in generation / scoring / update.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml
from bench_common import ROOT, SCRATCH, machine_info, run_child  # scripts/ is on sys.path


def add_parser(stages) -> None:
    p = stages.add_parser("ppo", help="llmft ppo: episodes/s, generation share, peak memory vs llmft sft")
    p.add_argument("--model", default="smollm2-135m-instruct", help="llmft model source (alias, dir, ...)")
    p.add_argument("--prompts", default=str(ROOT / "data/demo/ppo_train.jsonl"))
    p.add_argument("--pairs", default=str(ROOT / "data/demo/pref_train.jsonl"), help="for the reward checkpoint")
    p.add_argument("--sft-data", default=str(ROOT / "data/demo/sft_train.jsonl"))
    p.add_argument("--batch-size", type=int, default=8, help="prompts per rollout = micro-batch (and SFT's)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--max-length", type=int, default=384, help="SFT and reward max_length")
    p.add_argument("--ppo-epochs", type=int, default=2)
    p.add_argument("--steps", type=int, default=3, help="timed PPO steps")
    p.add_argument("--warmup-steps", type=int, default=1)
    p.add_argument("--out", default=str(ROOT / "benchmarks/tmp/ppo.json"))
    p.set_defaults(func=cmd_ppo)


def config(args, stage: str, work: Path, steps: int, **sections) -> Path:
    cfg = {"model": {"name": args.model_dir}, "lora": {"r": 16, "alpha": 32, "dropout": 0.0},
           "train": {"batch_size": args.batch_size, "max_steps": steps, "learning_rate": 1e-5,
                     "scheduler": "constant", "warmup_ratio": 0, "save_every": 100000},
           "output_dir": str(work / stage), "overwrite": True, "seed": 0, **sections}
    path = work / f"{stage}.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def run(stage: str, cfg: Path, work: Path) -> tuple[list[dict], float]:
    rss = run_child([sys.executable, "-m", "llmft", stage, str(cfg)], work / f"{stage}.log")
    rows = [json.loads(x) for x in (work / stage / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r], rss


def ppo_rates(rows: list[dict], warmup: int) -> dict:
    timed = [r for r in rows if r["step"] > warmup]
    phases = {k: sum(r[f"time/{k}"] for r in timed) for k in ("generation", "scoring", "update")}
    seconds = sum(phases.values())
    return {"episodes_per_s": sum(r["episodes"] for r in timed) / seconds,
            "tokens_per_s": sum(r["tokens"] for r in timed) / seconds,
            **{f"share_{k}": v / seconds for k, v in phases.items()}, "seconds": seconds,
            "mean_response_length": sum(r["completions/mean_length"] for r in timed) / len(timed)}


def cmd_ppo(args: argparse.Namespace) -> dict:
    from llmft.models.sources import resolve_source

    args.model_dir = resolve_source(args.model).path
    SCRATCH.mkdir(parents=True, exist_ok=True)
    work = SCRATCH / "ppo"
    work.mkdir(exist_ok=True)
    run("reward", config(args, "reward", work, 1, data={"train": args.pairs, "max_length": args.max_length}), work)
    ppo_rows, ppo_rss = run("ppo", config(
        args, "ppo", work, args.warmup_steps + args.steps, data={"train": args.prompts},
        rollout={"max_new_tokens": args.max_new_tokens, "temperature": 0.7, "batch_size": args.batch_size},
        reward={"model": str(work / "reward")}, ppo={"epochs": args.ppo_epochs, "num_minibatches": 1}), work)
    sft_rows, sft_rss = run("sft", config(args, "sft", work, 3, data={"train": args.sft_data,
                                                                      "max_length": args.max_length}), work)
    cuda = {name: max((r.get("cuda_peak_mib", 0) for r in rows), default=0) or None
            for name, rows in (("ppo", ppo_rows), ("sft", sft_rows))}
    result = {"stage": "ppo", "args": {k: v for k, v in vars(args).items() if k != "func"},
              "ppo": {**ppo_rates(ppo_rows, args.warmup_steps), "peak_rss_mib": ppo_rss, "peak_cuda_mib": cuda["ppo"],
                      "tokens_per_step": [r["tokens"] for r in ppo_rows]},
              "sft": {"peak_rss_mib": sft_rss, "peak_cuda_mib": cuda["sft"],
                      "tokens_per_step": [r["tokens"] for r in sft_rows]},
              "machine": machine_info()}
    key = "peak_cuda_mib" if cuda["ppo"] else "peak_rss_mib"
    result["memory_ratio_ppo_vs_sft"] = result["ppo"][key] / result["sft"][key]
    show(result, key)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")
    return result


def show(r: dict, key: str) -> None:
    p = r["ppo"]
    print(f"PPO {Path(r['args']['model_dir']).name}, rollout batch {r['args']['batch_size']}, "
          f"max_new_tokens {r['args']['max_new_tokens']}, {r['args']['steps']} timed steps:")
    print(f"  {p['episodes_per_s']:.3f} episodes/s, {p['tokens_per_s']:.0f} tokens/s; time in generation "
          f"{p['share_generation']:.0%}, scoring {p['share_scoring']:.0%}, update {p['share_update']:.0%}; "
          f"mean response {p['mean_response_length']:.1f} tokens")
    print(f"  peak memory ({key}): ppo {p[key]:.0f} MiB, sft {r['sft'][key]:.0f} MiB "
          f"→ ppo/sft = {r['memory_ratio_ppo_vs_sft']:.2f} (target ≤ 1.5)")
    print("machine: " + ", ".join(f"{k}={v}" for k, v in r["machine"].items()))
