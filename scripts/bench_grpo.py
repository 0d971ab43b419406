"""`scripts/bench.py grpo`: llmft grpo against trl.GRPOTrainer, side by side, --runs times each (alternating).

    python scripts/bench.py grpo [--batch-size 8 --grad-accum 2 --num-generations 8 --max-new-tokens 64 --steps 3]
    python scripts/bench.py grpo --sides trl-vllm,llmft-vllm,llmft --trl-python /path/to/env-with-trl-and-vllm/python

Same model, prompts (data/demo/ppo_train.jsonl), G, max new tokens, LoRA, batch and reward function (the demo's
constraint checker; llmft with no EOS penalty, as TRL has none), β = 0, one iteration, ε = 0.2, token-mean loss,
group-std advantages (scripts/bench_trl_grpo.py has TRL's settings). --sides picks what runs, each --runs times,
alternating: trl and llmft sample with transformers (llmft's hf engine); trl-vllm is GRPOTrainer with use_vllm=True
colocate (vLLM in TRL's process; needs an environment with TRL and vLLM: --trl-python), llmft-vllm is
rollout.engine: vllm (merged sync). Each run is its own process; the parent takes its peak RSS with os.wait4, and
with a vLLM side in the run, every side's as the peak of its process tree's summed RSS (llmft's engine is a process
of its own). Episodes/s count the answers of the timed steps (after
--warmup-steps); a step is one generation of batch × accumulation answers and one optimizer step on both sides.
Both sides load fp32 weights and flush denormals; the timed steps' mean answer length is reported for each run.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from bench_common import ROOT, add_common, bench, llmft_result, run_llmft, run_trl


def add_parser(stages) -> None:
    p = stages.add_parser("grpo", help="llmft grpo vs trl.GRPOTrainer (LoRA, judge reward, no vLLM)")
    add_common(p, out=str(ROOT / "benchmarks/grpo-cpu.json"), data="data/demo/ppo_train.jsonl",
               data_help="prompt rows with their constraints")
    p.add_argument("--num-generations", type=int, default=8, help="G: answers per prompt")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--runs", type=int, default=3, help="runs of each side, alternating")
    p.add_argument("--sides", default="trl,llmft", help="comma-separated, the first is the ratios' base: "
                                                        f"{', '.join(SIDES)}")
    p.add_argument("--trl-python", default="", help="the interpreter of TRL's runs (default this one)")
    p.add_argument("--kv-cache-gb", type=float, default=1.0, help="vLLM's KV cache on a CPU, both sides")
    p.add_argument("--vllm-eager", action="store_true",
                   help="llmft-vllm with enforce_eager (llmft's default); without, compiled as TRL's vLLM is")
    p.set_defaults(func=cmd_grpo, batch_size=8, grad_accum=2, steps=4, warmup_steps=1, lr=3e-4)


SIDES = ("trl", "trl-vllm", "llmft", "llmft-vllm")


def llmft_grpo(args, model_dir: str, work: Path, name: str, vllm: bool = False, tree: bool = False) -> dict:
    engine = {"engine": "vllm", "vllm": {"kv_cache_gb": args.kv_cache_gb, "enforce_eager": args.vllm_eager}}
    sections = {"model": {"name": model_dir, "dtype": "float32"},  # TRL's side loads fp32 too
                "data": {"train": args.data, "max_prompt_length": 512},
                "rollout": {"max_new_tokens": args.max_new_tokens, "temperature": 1.0, "top_p": 1.0, "top_k": 0,
                            "batch_size": args.batch_size * args.grad_accum,
                            **(engine if vllm else {})},
                "reward": {"judges": {"constraints": 1.0}, "missing_eos_penalty": 0.0},
                "grpo": {"num_generations": args.num_generations, "epsilon_low": 0.2, "epsilon_high": 0.2,
                         "loss_aggregation": "token_mean", "scale_rewards": "group", "iterations": 1,
                         "num_minibatches": 1, "beta": 0.0, "dynamic_sampling": "off"}}
    rows, rss = run_llmft("grpo", args, model_dir, work, tree, **sections)
    timed = [r for r in rows if r["step"] > args.warmup_steps]
    return llmft_result(rows, rss, args, "episodes") | {
        "impl": name, "rewards": [r["reward"] for r in rows],
        "mean_length": statistics.mean(r["completions/mean_length"] for r in timed)}


def cmd_grpo(args) -> dict:
    sides = args.sides.split(",")
    unknown = sorted(set(sides) - set(SIDES))
    if unknown or len(sides) < 2:
        raise SystemExit(f"--sides: two or more of {', '.join(SIDES)} (not {', '.join(unknown) or args.sides})")
    tree = any(side.endswith("vllm") for side in sides)

    def trl_grpo(model_dir: str, work: Path, name: str, vllm: bool) -> dict:
        extra = ("--num-generations", str(args.num_generations), "--max-new-tokens", str(args.max_new_tokens),
                 *(("--use-vllm", "--reload-sync", "--kv-cache-gb", str(args.kv_cache_gb)) if vllm else ()))
        trl = run_trl("bench_trl_grpo.py", args, model_dir, work, True, ["episodes_per_s", "episodes", "rewards",
                                                                          "step_logs"], name, extra,
                      args.trl_python, tree)
        logs = trl.pop("step_logs")[args.warmup_steps:]  # as llmft's: the timed steps' mean answer length
        trl["mean_length"] = statistics.mean(h["completions/mean_length"] for h in logs)
        return trl

    def impls(model_dir: str, work: Path) -> tuple[list[dict], dict]:
        results = []
        for i in range(args.runs):  # alternating, so that drift of the machine hits every side alike
            for side in sides:
                name, vllm = f"{side}-{i + 1}", side.endswith("vllm")
                results.append(trl_grpo(model_dir, work, name, vllm) if side.startswith("trl") else
                               llmft_grpo(args, model_dir, work, name, vllm, tree))
        return results, {}

    def notes(results: list[dict], extra: dict) -> list[str]:
        k = len(sides)
        lines = []
        for j, side in enumerate(sides[1:], 1):
            pairs = list(zip(results[0::k], results[j::k], strict=True))
            speed = [b["episodes_per_s"] / a["episodes_per_s"] for a, b in pairs]
            memory = [b["peak_rss_mib"] / a["peak_rss_mib"] for a, b in pairs]
            lengths = [f"{a['mean_length']:.1f} / {b['mean_length']:.1f}" for a, b in pairs]
            lines.append(f"{side} / {sides[0]} episodes/s per run: {', '.join(f'{x:.2f}x' for x in speed)} (median "
                         f"{statistics.median(speed):.2f}x); peak RSS: {', '.join(f'{x:.2f}x' for x in memory)}; "
                         f"mean answer length, {sides[0]} / {side}: {', '.join(lengths)} tokens")
        return lines + ["Each side samples its own answers: a side that drew longer answers did more work per "
                        "episode. Every side flushes denormals and loads the model in fp32."
                        + (" Peak RSS: the process tree's, summed." if tree else "")]

    return bench("grpo", args, impls, "episodes", "episodes_per_s", notes)


if __name__ == "__main__":
    print(json.dumps({"usage": "python scripts/bench.py grpo ..."}))
