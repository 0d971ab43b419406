"""`scripts/bench.py kto`: llmft kto against trl.KTOTrainer, side by side, --runs times each (alternating).

    python scripts/bench.py kto [--batch-size 8 --grad-accum 2 --steps 4 --max-length 384 --runs 3] [--packing]

Same model, answers, order of magnitude of lengths, LoRA, β and batch: the demo's on-policy pairs
(data/demo/onpolicy_train.jsonl), those whose prompt + answers fit --max-length on both sides, each split into a
desirable and an undesirable row, written as {prompt, completion, label} rows: in file order for llmft, which
shuffles them (randperm from the seed), and in that shuffled order for TRL, which runs as shipped for KTO
(sequential order, each row's KL completion the previous row's): the same answers in every step. Both: the reference
is the adapter disabled, run every step; z0 from mismatched answers of the step; fp32; denormals flushed.
--packing runs llmft with data.packing: true (each micro-batch padding-free), as configs/kto.yaml; TRL as shipped.
scripts/bench_trl_kto.py has TRL's settings.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from bench_common import PAIR_KEYS, ROOT, add_common, add_packing, bench, llmft_result, run_llmft, run_trl, write_pairs


def add_parser(stages) -> None:
    p = stages.add_parser("kto", help="llmft kto vs trl.KTOTrainer (LoRA; reference = adapter disabled)")
    add_common(p, out=str(ROOT / "benchmarks/kto-cpu.json"), data="data/demo/onpolicy_train.jsonl",
               data_help="{prompt, chosen, rejected} JSONL (string answers), split into labelled rows")
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--runs", type=int, default=3, help="runs of each side, alternating")
    add_packing(p)
    p.set_defaults(func=cmd_kto, max_length=384, batch_size=8, grad_accum=2, steps=4, warmup_steps=1, lr=5e-4)


def write_labelled(args, model_dir: str, work: Path) -> tuple[Path, Path, dict]:
    """The pairs both sides keep (bench.write_pairs) as labelled rows: llmft's file, and TRL's with the same rows in
    llmft's first-epoch order (`plan.plan_steps`, the stage's own), so that TRL's sequential steps
    hold the same answers as llmft's, and the previous row TRL takes each KL completion from has another prompt
    (mostly: the order is random, not interleaved pairs)."""
    from llmft.run.plan import plan_steps

    pairs, extra = write_pairs(args, model_dir, work)
    rows = [json.loads(line) for line in pairs.read_text(encoding="utf-8").splitlines()]
    labelled = [{"prompt": r["prompt"], "completion": r[k], "label": k == "chosen"} for r in rows
                for k in ("chosen", "rejected")]
    plan = plan_steps(len(labelled), args.batch_size, args.grad_accum, 1, None, args.seed)  # llmft's own plan
    order = [i for step in plan.steps for micro in step for i in micro]
    order += sorted(set(range(len(labelled))) - set(order))  # an epoch's short last micro-batch, if dropped
    paths = work / "labelled.jsonl", work / "labelled-trl.jsonl"
    for path, rows_ in zip(paths, (labelled, [labelled[i] for i in order]), strict=True):
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows_), encoding="utf-8")
    same_prompt = sum(labelled[a]["prompt"] == labelled[b]["prompt"] for a, b in zip(order[1:], order, strict=False))
    return *paths, extra | {"answers": len(labelled), "trl_kl_pairs_with_own_prompt": same_prompt}


def llmft_kto(args, model_dir: str, work: Path, name: str) -> dict:
    rows, rss = run_llmft("kto", args, model_dir, work, loss={"beta": args.beta})
    return llmft_result(rows, rss, args, "answers") | {"impl": name, "kl": [r["kl_reference_point"] for r in rows]}


def cmd_kto(args) -> dict:
    def impls(model_dir: str, work: Path) -> tuple[list[dict], dict]:
        ours, theirs, extra = write_labelled(args, model_dir, work)
        trl_args = argparse.Namespace(**{**vars(args), "data": str(theirs)})
        args.data = str(ours)
        results = []
        for i in range(args.runs):  # alternating, so that drift of the machine hits both sides alike
            results += [run_trl("bench_trl_kto.py", trl_args, model_dir, work, True,
                                [k.replace("pairs", "answers") for k in PAIR_KEYS] + ["kl"], f"trl-{i + 1}",
                                ("--beta", str(args.beta))),
                        llmft_kto(args, model_dir, work, f"llmft-{i + 1}")]
        return results, extra

    def notes(results: list[dict], extra: dict) -> list[str]:
        pairs = list(zip(results[0::2], results[1::2], strict=True))
        speed = [b["answers_per_s"] / a["answers_per_s"] for a, b in pairs]
        memory = [b["peak_rss_mib"] / a["peak_rss_mib"] for a, b in pairs]
        return [f"llmft / TRL answers/s per run pair: {', '.join(f'{x:.2f}x' for x in speed)} "
                f"(median {statistics.median(speed):.2f}x); peak RSS: {', '.join(f'{x:.2f}x' for x in memory)}",
                f"Data: {extra['data_pairs_kept']} of {extra['data_rows']} pairs kept (both sides fit max_length), "
                f"{extra['answers']} labelled answers; trainable parameters TRL {results[0]['trainable_params']:,}.",
                "TRL - llmft tokens per step: "
                f"{[t - u for t, u in zip(results[0]['step_tokens'], results[1]['step_tokens'], strict=False)]} "
                f"(the same answers give {args.batch_size * args.grad_accum} a step: TRL renders each answer with "
                "the newline after <|im_end|>); TRL's KL completions taken from a row of the same prompt: "
                f"{extra['trl_kl_pairs_with_own_prompt']} of {extra['answers']}.",
                "First-step losses: a fresh adapter (policy = reference, z0 = 0): every answer's loss is 1/2 on "
                "both sides.",
                "Both sides flush denormals and load the model in fp32."]

    return bench("kto", args, impls, "answers", "answers_per_s", notes)


if __name__ == "__main__":
    print(json.dumps({"usage": "python scripts/bench.py kto ..."}))
