"""`scripts/bench.py kto`: llmft kto against trl.KTOTrainer, side by side, --runs times each (alternating).

    python scripts/bench.py kto [--batch-size 8 --grad-accum 2 --steps 4 --max-length 384 --runs 3] [--packing]

Same model, answers, order of magnitude of lengths, LoRA, β and batch: the demo's on-policy pairs
(data/demo/onpolicy_train.jsonl), those whose prompt + answers fit --max-length on both sides, each split into a
desirable and an undesirable row, interleaved, written once as {prompt, completion, label} rows that both sides
read. TRL runs as shipped for KTO (sequential order, each row's KL completion the previous row's; the parent
cannot make the steps hold the same rows, so compare rates, not losses); llmft shuffles. Both sides: the reference
is the adapter disabled, run every step; z0 from mismatched answers of the step; fp32; denormals flushed.
--packing runs llmft with data.packing: true (each micro-batch padding-free), as configs/kto.yaml; TRL as shipped.
scripts/bench_trl_kto.py has TRL's settings.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from bench import PAIR_KEYS, ROOT, add_common, add_packing, bench, llmft_result, run_llmft, run_trl, write_pairs


def add_parser(stages) -> None:
    p = stages.add_parser("kto", help="llmft kto vs trl.KTOTrainer (LoRA; reference = adapter disabled)")
    add_common(p, out=str(ROOT / "benchmarks/kto-cpu.json"), data="data/demo/onpolicy_train.jsonl",
               data_help="{prompt, chosen, rejected} JSONL (string answers), split into labelled rows")
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--runs", type=int, default=3, help="runs of each side, alternating")
    add_packing(p)
    p.set_defaults(func=cmd_kto, max_length=384, batch_size=8, grad_accum=2, steps=4, warmup_steps=1, lr=5e-4)


def write_labelled(args, model_dir: str, work: Path) -> tuple[Path, dict]:
    """The pairs both sides keep (bench.write_pairs), as interleaved labelled rows."""
    pairs, extra = write_pairs(args, model_dir, work)
    rows = [json.loads(line) for line in pairs.read_text(encoding="utf-8").splitlines()]
    labelled = [{"prompt": r["prompt"], "completion": r[k], "label": k == "chosen"} for r in rows
                for k in ("chosen", "rejected")]
    path = work / "labelled.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in labelled), encoding="utf-8")
    return path, extra | {"answers": len(labelled)}


def llmft_kto(args, model_dir: str, work: Path, name: str) -> dict:
    rows, rss = run_llmft("kto", args, model_dir, work, loss={"beta": args.beta})
    return llmft_result(rows, rss, args, "answers") | {"impl": name, "kl": [r["kl"] for r in rows]}


def cmd_kto(args) -> dict:
    def impls(model_dir: str, work: Path) -> tuple[list[dict], dict]:
        data, extra = write_labelled(args, model_dir, work)
        args.data = str(data)
        results = []
        for i in range(args.runs):  # alternating, so that drift of the machine hits both sides alike
            results += [run_trl("bench_trl_kto.py", args, model_dir, work, True,
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
                "First-step losses: a fresh adapter (policy = reference, z0 = 0): every answer's loss is 1/2 on "
                "both sides.",
                "Both sides flush denormals and load the model in fp32."]

    return bench("kto", args, impls, "answers", "answers_per_s", notes)


if __name__ == "__main__":
    print(json.dumps({"usage": "python scripts/bench.py kto ..."}))
