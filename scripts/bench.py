"""Benchmark llmft against TRL, one subcommand per post-training stage (only `sft` so far).

    python scripts/bench.py sft [--batch-size 8 --grad-accum 1 --steps 6 ...]   # needs `pip install trl`

Each implementation runs as its own subprocess on the same model, data, max length, LoRA settings and
batch; the parent takes its peak RSS with os.wait4. Only optimizer steps after --warmup-steps are timed.
TRL runs twice: as shipped, and with torch.set_flush_denormal(True) (which llmft sets on CPU).
See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from importlib.metadata import version
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
SCRATCH = ROOT / "benchmarks" / "tmp"


def add_common(p: argparse.ArgumentParser, out: str) -> None:
    p.add_argument("--model", default="smollm2-135m-instruct", help="llmft model source (alias, dir, ...)")
    p.add_argument("--data", default=str(ROOT / "data/demo/sft_train.jsonl"), help="prompt/completion JSONL")
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


def timed_rates(rows: list[dict], warmup: int, per_step: int) -> dict:
    """Tokens/s and samples/s over the optimizer steps after `warmup` (llmft metrics.jsonl rows)."""
    timed = [r for r in rows if r["step"] > warmup]
    seconds = sum(r["tokens"] / r["tokens_per_s"] for r in timed)
    tokens = sum(r["tokens"] for r in timed)
    return {"tokens_per_s": tokens / seconds, "samples_per_s": per_step * len(timed) / seconds,
            "steps": len(timed), "seconds": seconds, "tokens": tokens, "samples": per_step * len(timed)}


def llmft_sft(args: argparse.Namespace, model_dir: str, work: Path) -> dict:
    targets = args.target_modules
    cfg = {
        "model": {"name": model_dir},
        "data": {"train": args.data, "max_length": args.max_length},
        "lora": {"r": args.lora_r, "alpha": args.lora_alpha, "dropout": args.lora_dropout,
                 "target_modules": targets if targets == "all-linear" else targets.split(",")},
        "train": {"batch_size": args.batch_size, "grad_accum": args.grad_accum, "learning_rate": args.lr,
                  "max_steps": args.warmup_steps + args.steps, "scheduler": "constant", "warmup_ratio": 0,
                  "log_every": 1, "save_every": 100000},
        "output_dir": str(work / "llmft_out"), "overwrite": True, "seed": args.seed,
    }
    (work / "llmft.yaml").write_text(yaml.safe_dump(cfg), encoding="utf-8")
    rss = run_child([sys.executable, "-m", "llmft", "sft", str(work / "llmft.yaml")], work / "llmft.log")
    lines = (work / "llmft_out" / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    rows = [r for r in map(json.loads, lines) if "tokens_per_s" in r]
    per_step = args.batch_size * args.grad_accum
    return {"impl": "llmft", **timed_rates(rows, args.warmup_steps, per_step), "peak_rss_mib": rss,
            "peak_cuda_mib": max((r["cuda_peak_mib"] for r in rows if "cuda_peak_mib" in r), default=None),
            "losses": [r["loss"] for r in rows], "step_tokens": [r["tokens"] for r in rows],
            "step_seconds": [r["tokens"] / r["tokens_per_s"] for r in rows if r["step"] > args.warmup_steps],
            "flush_denormal": True}


def trl_sft(args: argparse.Namespace, model_dir: str, work: Path, flush: bool) -> dict:
    name = "trl+flush" if flush else "trl"
    opts = ["model", "data", "max_length", "batch_size", "grad_accum", "steps", "warmup_steps", "lora_r",
            "lora_alpha", "lora_dropout", "target_modules", "lr", "seed"]
    cmd = [sys.executable, str(ROOT / "scripts" / "bench_trl.py"), "--out", str(work / f"{name}.json")]
    for k in opts:
        cmd += [f"--{k.replace('_', '-')}", str(model_dir if k == "model" else getattr(args, k))]
    rss = run_child(cmd + ["--flush-denormal"] * flush, work / f"{name}.log")
    res = json.loads((work / f"{name}.json").read_text(encoding="utf-8"))
    keep = ["tokens_per_s", "samples_per_s", "steps", "seconds", "tokens", "samples", "peak_cuda_mib",
            "losses", "step_tokens", "step_seconds"]
    return {"impl": name, **{k: res[k] for k in keep}, "peak_rss_mib": rss, "flush_denormal": flush,
            "child_rss_mib": res["peak_rss_mib"]}


def machine_info() -> dict:
    import torch

    info = {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(), "python": platform.python_version(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    for pkg in ("torch", "transformers", "peft", "trl", "llmft"):
        info[pkg] = version(pkg)
    return info


def report(title: str, results: list[dict], machine: dict) -> None:
    base = results[0]["tokens_per_s"]
    cols = ["impl", "tokens/s", "samples/s", "peak RSS MiB", "peak CUDA MiB", "first-step loss", "vs TRL"]
    rows = [[r["impl"], f"{r['tokens_per_s']:.0f}", f"{r['samples_per_s']:.2f}", f"{r['peak_rss_mib']:.0f}",
             "-" if r["peak_cuda_mib"] is None else f"{r['peak_cuda_mib']:.0f}", f"{r['losses'][0]:.4f}",
             f"{r['tokens_per_s'] / base:.2f}x"] for r in results]
    try:
        from rich.console import Console
        from rich.table import Table

        table = Table(*cols, title=title)
        for row in rows:
            table.add_row(*row)
        Console().print(table)
    except ImportError:
        print(title, *("  ".join(row) for row in [cols, *rows]), sep="\n")
    print("machine: " + ", ".join(f"{k}={v}" for k, v in machine.items()))
    if all(r["step_tokens"] == results[0]["step_tokens"] for r in results):
        print("Same tokens in every step on all sides: same batches (llmft's data order, "
              "randperm(seed), is TRL's RandomSampler order), so first-step losses should agree closely.")
    else:
        print("Per-step token counts differ: the sides saw different batches (different shuffles), "
              "so first-step losses need only be of similar magnitude.")


def cmd_sft(args: argparse.Namespace) -> dict:
    from llmft.modeling import resolve_source

    model_dir = resolve_source(args.model).path
    args.data = str(Path(args.data).resolve())  # children run in the repo root
    SCRATCH.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="sft-", dir=SCRATCH) as tmp:
        work = Path(tmp)
        results = [trl_sft(args, model_dir, work, flush=False), trl_sft(args, model_dir, work, flush=True),
                   llmft_sft(args, model_dir, work)]
    for r in results:
        r["ratio_vs_trl"] = r["tokens_per_s"] / results[0]["tokens_per_s"]
    machine = machine_info()
    title = (f"SFT {Path(model_dir).name}: batch {args.batch_size} x accum {args.grad_accum}, "
             f"max_length {args.max_length}, {args.steps} timed steps")
    report(title, results, machine)
    out = {"stage": "sft", "args": vars(args) | {"func": None, "model_dir": model_dir},
           "machine": machine, "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    stages = parser.add_subparsers(dest="stage", required=True)
    sft = stages.add_parser("sft", help="llmft sft vs trl.SFTTrainer (LoRA)")
    add_common(sft, out=str(ROOT / "benchmarks/sft-cpu.json"))
    sft.set_defaults(func=cmd_sft)
    # reward / dpo / ppo: add a parser + cmd_<stage> here the same way.
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
