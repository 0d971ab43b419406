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
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
from importlib.metadata import version
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
SCRATCH = ROOT / "benchmarks" / "tmp"


def add_common(p: argparse.ArgumentParser, out: str, data: str = "data/demo/sft_train.jsonl",
               data_help: str = "prompt/completion JSONL") -> None:
    p.add_argument("--model", default="smollm2-135m-instruct", help="llmft model source (alias, dir, ...)")
    p.add_argument("--data", default=str(ROOT / data), help=data_help)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--steps", type=int, default=6, help="timed optimizer steps")
    p.add_argument("--warmup-steps", type=int, default=2, help="untimed optimizer steps run first")
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lora-alpha", type=float, default=32)
    p.add_argument("--lora-dropout", type=float, default=0.0)
    p.add_argument("--target-modules", default="all-linear", help="'all-linear' or comma-separated names")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=out, help="result JSON")


def run_child(cmd: list[str], log: Path) -> float:
    """Run cmd (output to log); return its peak RSS in MiB. Exits with the log tail if it fails."""
    with open(log, "w", encoding="utf-8") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        tail = log.read_text(encoding="utf-8", errors="replace").splitlines()[-30:]
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}); end of {log}:\n" + "\n".join(tail))
    return usage.ru_maxrss / 1024  # KiB on Linux


def timed_rates(rows: list[dict], warmup: int, per_step: int, unit: str = "samples") -> dict:
    """Tokens/s and `unit`/s over the optimizer steps after `warmup` (llmft metrics.jsonl rows); a row's
    `unit` count is its own column when llmft logs one (reward: "pairs"), else `per_step`."""
    timed = [r for r in rows if r["step"] > warmup]
    seconds = sum(r["tokens"] / r["tokens_per_s"] for r in timed)
    tokens = sum(r["tokens"] for r in timed)
    done = sum(r.get(unit, per_step) for r in timed)
    return {"tokens_per_s": tokens / seconds, f"{unit}_per_s": done / seconds,
            "steps": len(timed), "seconds": seconds, "tokens": tokens, unit: done}


def llmft_config(args: argparse.Namespace, model_dir: str, work: Path) -> dict:
    """The llmft YAML config of a bench run (keys every training stage shares)."""
    targets = args.target_modules
    return {
        "model": {"name": model_dir},
        "data": {"train": args.data, "max_length": args.max_length,
                 **({"packing": packing} if (packing := LLMFT_PACKING.get(getattr(args, "packing", False))) else {})},
        "lora": {"r": args.lora_r, "alpha": args.lora_alpha, "dropout": args.lora_dropout,
                 "target_modules": targets if targets == "all-linear" else targets.split(",")},
        "train": {"batch_size": args.batch_size, "grad_accum": args.grad_accum, "learning_rate": args.lr,
                  "max_steps": args.warmup_steps + args.steps, "scheduler": "constant", "warmup_ratio": 0,
                  "log_every": 1, "save_every": 100000},
        "output_dir": str(work / "llmft_out"), "overwrite": True, "seed": args.seed,
    }


def run_llmft(stage: str, args: argparse.Namespace, model_dir: str, work: Path,
              **sections) -> tuple[list[dict], float]:
    """`python -m llmft STAGE CFG` (CFG: llmft_config + the stage's `sections`): its metrics.jsonl step rows and
    its peak RSS (MiB)."""
    cfg = work / f"llmft-{stage}.yaml"
    cfg.write_text(yaml.safe_dump(llmft_config(args, model_dir, work) | sections), encoding="utf-8")
    rss = run_child([sys.executable, "-m", "llmft", stage, str(cfg)], work / f"llmft-{stage}.log")
    lines = (work / "llmft_out" / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [r for r in map(json.loads, lines) if "tokens_per_s" in r], rss


def llmft_result(rows: list[dict], rss: float, args: argparse.Namespace, unit: str) -> dict:
    return {"impl": "llmft", **timed_rates(rows, args.warmup_steps, args.batch_size * args.grad_accum, unit),
            "peak_rss_mib": rss,
            "peak_cuda_mib": max((r["cuda_peak_mib"] for r in rows if "cuda_peak_mib" in r), default=None),
            "losses": [r["loss"] for r in rows], "step_tokens": [r["tokens"] for r in rows],
            "step_seconds": [r["tokens"] / r["tokens_per_s"] for r in rows if r["step"] > args.warmup_steps],
            "flush_denormal": True}


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


def run_trl(script: str, args: argparse.Namespace, model_dir: str, work: Path, flush: bool,
            keep: list[str], name: str = "", extra: tuple[str, ...] = ()) -> dict:
    """Run a bench_trl*.py child with the common options (+ `extra`); `keep` its result keys, add the RSS from
    wait4. `name` (default trl, trl+flush) labels the run."""
    name = name or ("trl+flush" if flush else "trl")
    opts = ["model", "data", "max_length", "batch_size", "grad_accum", "steps", "warmup_steps", "lora_r",
            "lora_alpha", "lora_dropout", "target_modules", "lr", "seed"]
    cmd = [sys.executable, str(ROOT / "scripts" / script), "--out", str(work / f"{name}.json")]
    for k in opts:
        cmd += [f"--{k.replace('_', '-')}", str(model_dir if k == "model" else getattr(args, k))]
    rss = run_child(cmd + [*extra] + ["--flush-denormal"] * flush, work / f"{name}.log")
    res = json.loads((work / f"{name}.json").read_text(encoding="utf-8"))
    keep = ["tokens_per_s", "steps", "seconds", "tokens", "peak_cuda_mib", "losses", "step_tokens",
            "step_seconds", *keep]
    return {"impl": name, **{k: res[k] for k in keep}, "peak_rss_mib": rss, "flush_denormal": flush,
            "child_rss_mib": res["peak_rss_mib"]}


def trl_sft(args: argparse.Namespace, model_dir: str, work: Path, flush: bool) -> dict:
    return run_trl("bench_trl.py", args, model_dir, work, flush, ["samples_per_s", "samples"],
                   extra=("--packing", args.packing))


PAIR_KEYS = ["pairs_per_s", "pairs", "step_pairs", "train_pairs", "trainable_params"]


def trl_reward(args: argparse.Namespace, model_dir: str, work: Path, flush: bool) -> dict:
    return run_trl("bench_trl_reward.py", args, model_dir, work, flush, PAIR_KEYS)


def trl_dpo(args: argparse.Namespace, model_dir: str, work: Path, flush: bool, rows: str = "conversational") -> dict:
    name = "trl-rendered" if rows == "rendered" else ""
    return run_trl("bench_trl_dpo.py", args, model_dir, work, flush,
                   [*PAIR_KEYS, "rows", "logps_chosen", "logps_rejected", "step_logs"], name,
                   ("--beta", str(args.beta), "--rows", rows))


def machine_info() -> dict:
    import torch

    info = {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(), "python": platform.python_version(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    for pkg in ("torch", "transformers", "peft", "trl", "llmft"):
        info[pkg] = version(pkg)
    return info


def report(title: str, results: list[dict], machine: dict, notes: list[str], unit: str = "samples",
           columns: dict | None = None) -> None:
    """Print the results table (ratios = each result's `ratio_vs_trl`, `rss_vs_trl`; `columns`: more, header →
    function of a result), the machine and `notes`."""
    columns = columns or {}
    cols = ["impl", f"{unit}/s", "tokens/s", "peak RSS MiB", "peak CUDA MiB", "first-step loss", *columns, "vs TRL",
            "RSS vs TRL"]
    rows = [[r["impl"], f"{r[f'{unit}_per_s']:.2f}", f"{r['tokens_per_s']:.0f}", f"{r['peak_rss_mib']:.0f}",
             "-" if r["peak_cuda_mib"] is None else f"{r['peak_cuda_mib']:.0f}", f"{r['losses'][0]:.4f}",
             *(f(r) for f in columns.values()), f"{r['ratio_vs_trl']:.2f}x", f"{r['rss_vs_trl']:.2f}x"]
            for r in results]
    try:
        from rich.console import Console
        from rich.table import Table

        table = Table(*cols, title=title)
        for row in rows:
            table.add_row(*row)
        Console(width=max(Console().width, 150)).print(table)  # logs: not cut to 80 columns
    except ImportError:
        print(title, *("  ".join(row) for row in [cols, *rows]), sep="\n")
    print("machine: " + ", ".join(f"{k}={v}" for k, v in machine.items()))
    print(*notes, sep="\n")


def bench(stage: str, args: argparse.Namespace, runs, unit: str, rate: str, notes, columns: dict | None = None) -> dict:
    """Run `runs(model_dir, work)` (the implementations, TRL first) in a scratch folder; ratio = `rate` (and peak
    RSS) over TRL's; print the table (+ `columns`, see report) and `notes(results, extra)`; write --out."""
    from llmft.sources import resolve_source

    model_dir = resolve_source(args.model).path
    args.data = str(Path(args.data).resolve())  # children run in the repo root
    SCRATCH.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"{stage}-", dir=SCRATCH) as tmp:
        results, extra = runs(model_dir, Path(tmp))
    for r in results:
        r["ratio_vs_trl"] = r[rate] / results[0][rate]
        r["rss_vs_trl"] = r["peak_rss_mib"] / results[0]["peak_rss_mib"]
    machine = machine_info()
    title = (f"{stage.upper()} {Path(model_dir).name}: batch {args.batch_size} {unit} x accum {args.grad_accum}, "
             f"max_length {args.max_length}, {args.steps} timed steps (ratio: {rate} vs TRL)")
    report(title, results, machine, notes(results, extra), unit, columns)
    out = {"stage": stage, "args": vars(args) | {"func": None, "model_dir": model_dir}, **extra,
           "machine": machine, "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")
    return out


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
def chat(value: str | list, role: str) -> list[dict]:
    return [{"role": role, "content": value}] if isinstance(value, str) else value


def pair_lengths(tok, row: dict) -> list[int]:
    """Token counts of a pair's sequences as llmft (prompt + generation prompt, answer, EOS) and TRL (the whole
    conversation through the chat template, which adds a newline after EOS) build them."""
    prompt = chat(row["prompt"], "user")
    gen = len(tok.apply_chat_template(prompt, add_generation_prompt=True, return_dict=True)["input_ids"])
    out = []
    for answer in (row["chosen"], row["rejected"]):
        whole = tok.apply_chat_template(prompt + chat(answer, "assistant"), return_dict=True)["input_ids"]
        out += [gen + len(tok(answer, add_special_tokens=False)["input_ids"]) + 1, len(whole)]
    return out


def write_pairs(args: argparse.Namespace, model_dir: str, work: Path) -> tuple[Path, dict]:
    """The {prompt, chosen, rejected} rows (string answers) that both sides keep, in work/pairs.jsonl.

    llmft drops pairs with identical answers or with prompt + answer + EOS over max_length; TRL drops pairs with
    a side over max_length (its sequences are one token longer). Filtering first gives both the same n pairs,
    so the same shuffle, randperm(n) from the seed, and the same pairs in every step."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    rows = [json.loads(line) for line in Path(args.data).read_text(encoding="utf-8").splitlines() if line.strip()]
    keep = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows
            if r["chosen"].strip() != r["rejected"].strip() and max(pair_lengths(tok, r)) <= args.max_length]
    path = work / "pairs.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in keep), encoding="utf-8")
    return path, {"data_rows": len(rows), "data_pairs_kept": len(keep)}


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


def add_packing(p: argparse.ArgumentParser) -> None:
    p.add_argument("--packing", action=argparse.BooleanOptionalAction, default=False,
                   help="llmft with data.packing: true (padding-free micro-batches); TRL as shipped")


# sft --packing: llmft's data.packing, and TRL's alike (bench_trl.py --packing)
LLMFT_PACKING = {True: True, "none": None, "rows": True, "blocks": "blocks"}


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
