"""Benchmark llmft against TRL, one subcommand per post-training stage (`sft`, `reward`, `dpo`, `kto`, `grpo`).

    python scripts/bench.py sft [--batch-size 8 --grad-accum 1 --steps 6 ...]      # needs `pip install trl`
    python scripts/bench.py reward [--batch-size 4 --max-length 384 --steps 4 ...]
    python scripts/bench.py dpo [--batch-size 4 --max-length 384 --steps 4 --beta 0.1 ...]
    python scripts/bench.py kto [--batch-size 8 --grad-accum 2 --max-length 384 --runs 3 --packing ...]
    python scripts/bench.py ppo [--batch-size 8 --max-new-tokens 64 --steps 3 ...]
    python scripts/bench.py grpo [--batch-size 8 --grad-accum 2 --num-generations 8 --max-new-tokens 64 ...]

Each implementation runs as its own subprocess on the same model, data, max length, LoRA settings and
batch; the parent takes its peak RSS with os.wait4. Only optimizer steps after --warmup-steps are timed.
sft: TRL runs twice, as shipped and with torch.set_flush_denormal(True) (which llmft sets on CPU).
reward: the same for trl.RewardTrainer (--no-trl-flush: as shipped only) vs `llmft reward`, on the
pairs both sides keep. dpo: trl.DPOTrainer vs `llmft dpo` likewise, plus TRL fed pre-rendered prompts
(--no-trl-rendered: not), whose tokens are exactly llmft's; the first batch's logps/* are compared.
ppo (scripts/bench_ppo.py): llmft ppo alone, its peak memory against llmft sft's. grpo (scripts/bench_grpo.py):
llmft grpo vs trl.GRPOTrainer, --runs times each, alternating; kto (scripts/bench_kto.py): llmft kto vs
trl.KTOTrainer likewise. See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from bench_common import PAIR_KEYS, ROOT, add_common, add_packing, bench, llmft_result, run_llmft, run_trl, write_pairs  # noqa: E501


def llmft_sft(args: argparse.Namespace, model_dir: str, work: Path) -> dict:
    rows, rss = run_llmft("sft", args, model_dir, work)
    return llmft_result([r | {"samples": r["examples"]} for r in rows], rss, args, "samples")


def llmft_pairs(stage: str, args: argparse.Namespace, model_dir: str, work: Path, **sections) -> tuple[list, dict]:
    """A pairwise stage's metrics rows and result (pairs per step, trainable parameters from its log)."""
    rows, rss = run_llmft(stage, args, model_dir, work, **sections)
    log = (work / f"llmft-{stage}.log").read_text(encoding="utf-8", errors="replace")
    trainable = re.search(r"trainable parameters: ([\d,]+)", log)
    count = int(trainable[1].replace(",", "")) if trainable else None
    return rows, llmft_result(rows, rss, args, "pairs") | {"step_pairs": [r["pairs"] for r in rows],
                                                           "trainable_params": count}


def llmft_reward(args: argparse.Namespace, model_dir: str, work: Path) -> dict:
    rows, result = llmft_pairs("reward", args, model_dir, work)
    return result | {"accuracies": [r["accuracy"] for r in rows]}


def llmft_dpo(args: argparse.Namespace, model_dir: str, work: Path) -> dict:
    loss = {"type": "sigmoid", "beta": args.beta, "label_smoothing": 0.0, "precompute_reference": False}
    rows, result = llmft_pairs("dpo", args, model_dir, work, loss=loss)
    return result | {"logps_chosen": [r["logps/chosen"] for r in rows],
                     "logps_rejected": [r["logps/rejected"] for r in rows],
                     "reward_accuracies": [r["rewards/accuracies"] for r in rows]}




def trl_sft(args: argparse.Namespace, model_dir: str, work: Path, flush: bool) -> dict:
    return run_trl("bench_trl.py", args, model_dir, work, flush, ["samples_per_s", "samples"],
                   extra=("--packing", args.packing))




def trl_reward(args: argparse.Namespace, model_dir: str, work: Path, flush: bool) -> dict:
    return run_trl("bench_trl_reward.py", args, model_dir, work, flush, PAIR_KEYS)


def trl_dpo(args: argparse.Namespace, model_dir: str, work: Path, flush: bool, rows: str = "conversational") -> dict:
    name = "trl-rendered" if rows == "rendered" else ""
    return run_trl("bench_trl_dpo.py", args, model_dir, work, flush,
                   [*PAIR_KEYS, "rows", "logps_chosen", "logps_rejected", "step_logs"], name,
                   ("--beta", str(args.beta), "--rows", rows))








def sft_notes(results: list[dict], extra: dict) -> list[str]:
    if extra["packing"] == "blocks":
        return ["Packed into blocks: each side forms its own (best-fit decreasing on both, each in its own order), so "
                "the steps hold different rows: compare rates, not losses."]
    trl, ours = results[0]["step_tokens"], results[-1]["step_tokens"]
    if all(r["step_tokens"] == trl for r in results):
        return ["Same tokens in every step on all sides: same batches (llmft's data order, "
                "randperm(seed), is TRL's RandomSampler order), so first-step losses should agree closely."]
    if all(t - o == extra["rows_per_step"] for t, o in zip(trl, ours, strict=True)):
        return ["TRL's steps hold one token more per row: the newline its chat template renders after <|im_end|>, "
                "which llmft does not supervise (the next turn's context). The same rows in every step (llmft's "
                "order, randperm(seed), is TRL's RandomSampler order); first-step losses differ by that token."]
    return ["Per-step token counts differ beyond one token per row: the sides saw different batches, so first-step "
            "losses need only be of similar magnitude."]


def cmd_sft(args: argparse.Namespace) -> dict:
    def runs(model_dir: str, work: Path) -> tuple[list[dict], dict]:
        return [trl_sft(args, model_dir, work, flush=False), trl_sft(args, model_dir, work, flush=True),
                llmft_sft(args, model_dir, work)], {"packing": args.packing,
                                                     "rows_per_step": args.batch_size * args.grad_accum}

    return bench("sft", args, runs, "samples", "tokens_per_s", sft_notes)


# ------------------------------------------------------------------------------------------------ reward






def on_pairs(args: argparse.Namespace, impls):
    """bench()'s `runs` for a pairwise stage: write the pairs both sides keep, then run `impls(args reading them,
    model_dir, work)`."""
    def runs(model_dir: str, work: Path) -> tuple[list[dict], dict]:
        data, extra = write_pairs(args, model_dir, work)
        return impls(argparse.Namespace(**{**vars(args), "data": str(data)}), model_dir, work), extra

    return runs


def pair_notes(trl: dict, llmft: dict, extra: dict, params: str, per_seq: int = 1) -> list[str]:
    """Data kept, trainable parameters (`params`: what they are) and whether the steps saw the same pairs
    (TRL's tokens = llmft's + `per_seq` per sequence)."""
    extra_tokens = [t - u for t, u in zip(trl["step_tokens"], llmft["step_tokens"], strict=True)]
    same = trl["step_pairs"] == llmft["step_pairs"] and extra_tokens == [2 * per_seq * n for n in trl["step_pairs"]]
    return [
        f"Data: {extra['data_pairs_kept']} of {extra['data_rows']} rows kept (both sides fit max_length, answers "
        f"differ); {trl['impl']} trained on {trl['train_pairs']} pairs. Trainable parameters: TRL "
        f"{trl['trainable_params']:,}, llmft {llmft['trainable_params'] or 0:,} ({params}).",
        f"{trl['impl']}: same pairs in every step as llmft ("
        + (f"per step, TRL's tokens = llmft's + {2 * per_seq} x pairs)" if per_seq else "and the same tokens)")
        if same else f"{trl['impl']}: per-step batches differ from llmft's (TRL - llmft tokens per step: "
        f"{extra_tokens}; pairs {trl['step_pairs']} vs {llmft['step_pairs']})",
    ]


def reward_notes(results: list[dict], extra: dict) -> list[str]:
    return [
        *pair_notes(results[0], results[-1], extra, "TRL: LoRA + score head, no bias; llmft: LoRA + head with bias"),
        "Tokens: TRL renders the whole conversation, so each sequence ends '<|im_end|>\\n' (one token more than "
        "llmft's prompt + answer + EOS), and its head reads that trailing newline (last token != pad id); llmft's "
        "reads the EOS (last token by attention mask). Compare pairs/s; tokens/s counts the extra token for TRL.",
        "First-step losses: the reward heads start differently (llmft: w ~ N(0, 1/sqrt(d+1)), b = 0; TRL/"
        "transformers: score ~ N(0, initializer_range), no bias), so they need only be close to ln 2 = 0.693 on "
        "both sides, not equal.",
    ]


def cmd_reward(args: argparse.Namespace) -> dict:
    def impls(same: argparse.Namespace, model_dir: str, work: Path) -> list[dict]:
        trl = [trl_reward(same, model_dir, work, flush) for flush in [False] + [True] * args.trl_flush]
        return [*trl, llmft_reward(same, model_dir, work)]

    return bench("reward", args, on_pairs(args, impls), "pairs", "pairs_per_s", reward_notes)


# --------------------------------------------------------------------------------------------------- dpo
def dpo_notes(results: list[dict], extra: dict) -> list[str]:
    llmft, trls = results[-1], results[:-1]
    notes = [*pair_notes(trls[0], llmft, extra, "LoRA only"),
             *(pair_notes(r, llmft, extra, "", r["rows"] == "conversational")[1] for r in trls[1:])]
    for key in ("chosen", "rejected"):
        first = {r["impl"]: r[f"logps_{key}"][0] for r in results}
        notes.append(f"First batch logps/{key} (mean summed response log-prob, policy = reference): " + ", ".join(
            f"{k} {v:.4f}" + (f" ({v - first['llmft']:+.4f} vs llmft)" if k != "llmft" else "")
            for k, v in first.items()))
    rendered = [r for r in trls if r["rows"] == "rendered"]
    newline = [trls[0][f"logps_{k}"][0] - rendered[0][f"logps_{k}"][0] for k in ("chosen", "rejected")] if rendered \
        else None
    notes += [
        "Tokens: fed conversational rows, TRL renders prompt + answer through the chat template, so each response "
        "ends '<|im_end|>\\n': one token more than llmft's answer + EOS, and its log-prob is part of logps/*"
        + (f" (conversational - rendered on the first batch: {newline[0]:+.4f} chosen, {newline[1]:+.4f} rejected, "
           "the mean log-prob of that newline)." if newline else ".")
        + " Fed rendered rows (prompt through the template with the generation prompt, answers as text + EOS), "
        "TRL's tokens are llmft's exactly.",
        "First-step loss: ln 2 = 0.6931 on both sides (a fresh LoRA adapter: policy = reference at step 1).",
        "LM head: on CPU (no Triton) TRL's fused LM head scores every position of the padded batch (prompt and "
        "padding too, in both the policy and the reference forward) and also computes entropy, mean logits and "
        "top-1 for its metrics; llmft projects only the response positions.",
    ]
    return notes


def cmd_dpo(args: argparse.Namespace) -> dict:
    def impls(same: argparse.Namespace, model_dir: str, work: Path) -> list[dict]:
        trl = [trl_dpo(same, model_dir, work, flush) for flush in [False] + [True] * args.trl_flush]
        if args.trl_rendered:
            trl.append(trl_dpo(same, model_dir, work, False, "rendered"))
        return [*trl, llmft_dpo(same, model_dir, work)]

    columns = {"1st logps/chosen": lambda r: f"{r['logps_chosen'][0]:.4f}",
               "1st logps/rejected": lambda r: f"{r['logps_rejected'][0]:.4f}"}
    return bench("dpo", args, on_pairs(args, impls), "pairs", "pairs_per_s", dpo_notes, columns)


def pair_parser(stages, name: str, text: str, func) -> argparse.ArgumentParser:
    """The subcommand of a pairwise stage: common options, preference data, batch 4 pairs, max_length 384."""
    p = stages.add_parser(name, help=text)
    add_common(p, out=str(ROOT / f"benchmarks/{name}-cpu.json"), data="data/demo/pref_train.jsonl",
               data_help="{prompt, chosen, rejected} JSONL (string answers)")
    p.add_argument("--trl-flush", action=argparse.BooleanOptionalAction, default=True,
                   help="also run TRL with torch.set_flush_denormal(True), as llmft sets on CPU")
    add_packing(p)
    p.set_defaults(func=func, max_length=384, batch_size=4, steps=4)
    return p






def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    stages = parser.add_subparsers(dest="stage", required=True)
    sft = stages.add_parser("sft", help="llmft sft vs trl.SFTTrainer (LoRA)")
    add_common(sft, out=str(ROOT / "benchmarks/sft-cpu.json"))
    sft.add_argument("--packing", choices=("none", "rows", "blocks"), default="none",
                     help="both sides padding-free: rows = each batch's rows as one sequence (llmft data.packing: "
                          "true, TRL padding_free), blocks = rows regrouped into max_length blocks (llmft "
                          "data.packing: blocks, TRL packing)")
    sft.set_defaults(func=cmd_sft)
    pair_parser(stages, "reward", "llmft reward vs trl.RewardTrainer (LoRA + scalar head)", cmd_reward)
    dpo = pair_parser(stages, "dpo", "llmft dpo vs trl.DPOTrainer (LoRA; reference = adapter disabled)",
                      cmd_dpo)
    dpo.add_argument("--beta", type=float, default=0.1, help="DPO β (sigmoid loss)")
    dpo.add_argument("--trl-rendered", action=argparse.BooleanOptionalAction, default=True,
                     help="also run TRL on pre-rendered prompts (its tokens are then exactly llmft's)")
    import bench_grpo  # llmft grpo vs trl.GRPOTrainer
    import bench_kto  # llmft kto vs trl.KTOTrainer
    import bench_ppo  # llmft ppo alone: speed, generation share, memory against llmft sft

    bench_kto.add_parser(stages)
    bench_ppo.add_parser(stages)
    bench_grpo.add_parser(stages)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
