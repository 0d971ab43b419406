"""`scripts/bench.py grpo`: llmft grpo against trl.GRPOTrainer, side by side, --runs times each (alternating).

    python scripts/bench.py grpo [--batch-size 8 --grad-accum 2 --num-generations 8 --max-new-tokens 64 --steps 3]

Same model, prompts (data/demo/ppo_train.jsonl), G, max new tokens, LoRA, batch and reward function (the demo's
constraint checker; llmft with no EOS penalty, as TRL has none), β = 0, one iteration, ε = 0.2, token-mean loss,
group-std advantages, no vLLM on either side (scripts/bench_trl_grpo.py has TRL's settings). Each run is its own
process; the parent takes its peak RSS with os.wait4. Episodes/s count the answers of the timed steps (after
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
    p.set_defaults(func=cmd_grpo, batch_size=8, grad_accum=2, steps=4, warmup_steps=1, lr=3e-4)


def llmft_grpo(args, model_dir: str, work: Path, name: str) -> dict:
    sections = {"model": {"name": model_dir, "dtype": "float32"},  # TRL's side loads fp32 too
                "data": {"train": args.data, "max_prompt_length": 512},
                "rollout": {"max_new_tokens": args.max_new_tokens, "temperature": 1.0, "top_p": 1.0, "top_k": 0,
                            "batch_size": args.batch_size * args.grad_accum},
                "reward": {"judges": {"constraints": 1.0}, "missing_eos_penalty": 0.0},
                "grpo": {"num_generations": args.num_generations, "epsilon_low": 0.2, "epsilon_high": 0.2,
                         "loss_aggregation": "token_mean", "scale_rewards": "group", "iterations": 1,
                         "num_minibatches": 1, "beta": 0.0, "dynamic_sampling": "off"}}
    rows, rss = run_llmft("grpo", args, model_dir, work, **sections)
    timed = [r for r in rows if r["step"] > args.warmup_steps]
    return llmft_result(rows, rss, args, "episodes") | {
        "impl": name, "rewards": [r["reward"] for r in rows],
        "mean_length": statistics.mean(r["completions/mean_length"] for r in timed)}


def cmd_grpo(args) -> dict:
    def impls(model_dir: str, work: Path) -> tuple[list[dict], dict]:
        results = []
        for i in range(args.runs):  # alternating, so that drift of the machine hits both sides alike
            trl = run_trl("bench_trl_grpo.py", args, model_dir, work, True, ["episodes_per_s", "episodes",
                                                                              "rewards", "step_logs"], f"trl-{i + 1}",
                          ("--num-generations", str(args.num_generations),
                           "--max-new-tokens", str(args.max_new_tokens)))
            logs = trl.pop("step_logs")[args.warmup_steps:]  # as llmft's: the timed steps' mean answer length
            trl["mean_length"] = statistics.mean(h["completions/mean_length"] for h in logs)
            results += [trl, llmft_grpo(args, model_dir, work, f"llmft-{i + 1}")]
        return results, {}

    def notes(results: list[dict], extra: dict) -> list[str]:
        pairs = list(zip(results[0::2], results[1::2], strict=True))
        speed = [b["episodes_per_s"] / a["episodes_per_s"] for a, b in pairs]
        memory = [b["peak_rss_mib"] / a["peak_rss_mib"] for a, b in pairs]
        tokens = [b["tokens_per_s"] / a["tokens_per_s"] for a, b in pairs]
        lengths = [f"{a['mean_length']:.1f} / {b['mean_length']:.1f}" for a, b in pairs]
        return [f"llmft / TRL episodes/s per run pair: {', '.join(f'{x:.2f}x' for x in speed)} "
                f"(median {statistics.median(speed):.2f}x); tokens/s: {', '.join(f'{x:.2f}x' for x in tokens)}; "
                f"peak RSS: {', '.join(f'{x:.2f}x' for x in memory)}",
                f"mean answer length of the timed steps, TRL / llmft, per pair: {', '.join(lengths)} tokens "
                "(each side samples its own answers: a side that drew longer answers did more work per episode)",
                "Both sides flush denormals and load the model in fp32."]

    return bench("grpo", args, impls, "episodes", "episodes_per_s", notes)


if __name__ == "__main__":
    print(json.dumps({"usage": "python scripts/bench.py grpo ..."}))
