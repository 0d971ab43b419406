#!/usr/bin/env python3
"""Generate the llmft preference and prompt-only demo data from the embedded model's own answers.

For every prompt (same requests and constraint types as the SFT data, see make_demo_data.py) the
embedded SmolLM2-135M-Instruct samples K answers; llmft's constraint judge scores each. The pair is:

    chosen   = the best-scoring sample when it satisfies every constraint, else the verified
               hand-built completion (score 1.0)
    rejected = the worst-scoring sample (ties: the first), kept only when it scores below chosen

so the rejected side is always a realistic model answer and chosen always satisfies more constraints.
Prompts whose K samples all pass are skipped.

Outputs (the default arguments reproduce the shipped files byte for byte on CPU with torch 2.13):
    data/demo/pref_train.jsonl   pairs on prompts from the 36 training requests
    data/demo/pref_eval.jsonl    pairs on prompts from the 6 held-out requests
    data/demo/ppo_train.jsonl    prompt-only rows (prompt, constraints, request_id) for PPO
The held-out prompts for PPO evaluation are data/demo/sft_eval.jsonl.

Regenerate (about 20 minutes on 2 CPU cores):
    python scripts/make_pref_data.py --seed 0 --out data/demo

On-policy pairs for DPO (`--model runs/sft --on-policy`): the samples come from the named model (here the
SFT output of configs/sft.yaml) and chosen is always a sample, never the template: the best-scoring one,
kept when it beats the worst. Writes onpolicy_train.jsonl and onpolicy_eval.jsonl (--prefix onpolicy):
    python scripts/make_pref_data.py --model runs/sft --on-policy --prefix onpolicy --out data/demo
Pairs for a reward model that scores PPO's own rollouts (`--train-from ppo_train`: the SFT model's answers to
PPO's prompts, 8 samples each, at PPO's rollout length):
    python scripts/make_pref_data.py --model runs/sft --on-policy --prefix rollout --train-from ppo_train \
        --samples 8 --max-new-tokens 64 --skip-eval --out data/demo
Prompts are sampled in chunks of --chunk prompts, each chunk generated in one batch seeded by its index,
so `--limit N` (N a multiple of --chunk) reproduces the first N prompts of a full run exactly.
"""

import argparse
import dataclasses
import importlib.util
import random
from pathlib import Path

import torch

from llmft.cli import quiet_libraries
from llmft.config import ModelConfig, SamplingConfig
from llmft.judges.constraints import judge
from llmft.models.loading import load_chat, load_model
from llmft.models.sources import resolve_source
from llmft.rollout.generation import generate

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("make_demo_data", HERE / "make_demo_data.py")
demo = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(demo)

MODEL = "smollm2-135m-instruct"


def prompt_rows(seed: int, n_train: int, n_eval: int, n_ppo: int) -> dict[str, list[dict]]:
    """The prompts of every output, from the same request split as the SFT data (make_demo_data)."""
    train_reqs, eval_reqs = demo.split_requests(demo.load_requests(), 2, random.Random(seed))
    rng = random.Random(seed + 1)  # a stream of its own: the SFT files stay as they are
    return {"pref_train": demo.make_split(train_reqs, n_train, rng),
            "pref_eval": demo.make_split(eval_reqs, n_eval, rng),
            "ppo_train": demo.make_split(train_reqs, n_ppo, rng)}


def sample_answers(model, chat, rows: list[dict], k: int, chunk: int, sampling: SamplingConfig,
                   seed: int) -> list[list[str]]:
    """K sampled answers per row; each chunk of rows is one batch with its own seed."""
    answers = []
    for c in range(0, len(rows), chunk):
        part = rows[c:c + chunk]
        prompts = [chat.prompt_ids([{"role": "user", "content": r["prompt"]}]) for r in part]
        s = dataclasses.replace(sampling, seed=seed * 100_003 + c // chunk, batch_size=len(part) * k)
        gens = generate(model, chat, [p for p in prompts for _ in range(k)], s)
        answers += [[g.text for g in gens[i * k:(i + 1) * k]] for i in range(len(part))]
        print(f"  {c + len(part)}/{len(rows)} prompts", flush=True)
    return answers


def make_pair(row: dict, samples: list[str], on_policy: bool = False) -> dict | None:
    scores = [judge(row["constraints"], s).score for s in samples]
    best = max(range(len(samples)), key=lambda i: scores[i])
    worst = min(range(len(samples)), key=lambda i: scores[i])
    if scores[best] == 1.0 or on_policy:
        chosen, chosen_score, source = samples[best], scores[best], "model"
    else:
        chosen, chosen_score, source = (row["completion"], judge(row["constraints"], row["completion"]).score,
                                         "template")
    if source == "template" and chosen_score != 1.0:
        raise ValueError(f"hand-built completion fails its constraints: {row}")
    if scores[worst] >= chosen_score:
        return None
    return {"prompt": row["prompt"], "chosen": chosen, "rejected": samples[worst], "constraints": row["constraints"],
            "request_id": row["request_id"], "chosen_score": round(chosen_score, 4),
            "rejected_score": round(scores[worst], 4), "chosen_source": source}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default=MODEL, help="the model to sample from (an llmft model source)")
    ap.add_argument("--on-policy", action="store_true",
                    help="chosen is always the best sample (no hand-built fallback)")
    ap.add_argument("--prefix", default="pref", help="preference files are PREFIX_train/PREFIX_eval.jsonl; "
                    "ppo_train.jsonl is written only with the default prefix")
    ap.add_argument("--out", default="data/demo", help="output directory")
    ap.add_argument("--train-prompts", type=int, default=256)
    ap.add_argument("--eval-prompts", type=int, default=80)
    ap.add_argument("--ppo-prompts", type=int, default=256)
    ap.add_argument("--samples", type=int, default=4, help="answers sampled per prompt (K)")
    ap.add_argument("--chunk", type=int, default=8, help="prompts per generation batch")
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--train-from", choices=["pref_train", "ppo_train"], default="pref_train",
                    help="the prompts of the train pairs: the preference prompts, or PPO's own prompts")
    ap.add_argument("--skip-eval", action="store_true", help="write no eval pairs")
    ap.add_argument("--limit", type=int, default=None,
                    help="only the first N prompts of each preference file (a multiple of --chunk)")
    args = ap.parse_args()
    if args.limit is not None and args.limit % args.chunk:
        ap.error("--limit must be a multiple of --chunk")
    quiet_libraries()
    rows = prompt_rows(args.seed, args.train_prompts, args.eval_prompts, args.ppo_prompts)
    source = resolve_source(args.model)
    chat = load_chat(source)
    model = load_model(source, torch.float32, torch.device("cpu"), ModelConfig(name=args.model))
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                              draw="multinomial")  # as the shipped files were sampled
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for offset, split in enumerate(("train", "eval")):
        if split == "eval" and args.skip_eval:
            continue
        part = rows[args.train_from if split == "train" else "pref_eval"][:args.limit]
        print(f"{split}: sampling {args.samples} answers for {len(part)} prompts", flush=True)
        answers = sample_answers(model, chat, part, args.samples, args.chunk, sampling, args.seed * 2 + offset)
        pairs = [p for r, a in zip(part, answers, strict=True) if (p := make_pair(r, a, args.on_policy))]
        report(out / f"{args.prefix}_{split}.jsonl", pairs, len(part))
    if args.prefix != "pref":
        return
    ppo = [{k: r[k] for k in ("prompt", "constraints", "request_id")} for r in rows["ppo_train"]]
    report(out / "ppo_train.jsonl", ppo, len(ppo))


def report(path: Path, rows: list[dict], prompts: int) -> None:
    demo.write_jsonl(path, rows)
    print(f"{path}: {len(rows)} rows from {prompts} prompts, {path.stat().st_size} bytes", flush=True)


if __name__ == "__main__":
    main()
