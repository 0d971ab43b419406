"""What every benchmark of scripts/bench.py shares: the common options, running llmft and TRL children side by side,
their measured rates, the machine, and the report."""

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


def run_child(cmd: list[str], log: Path, tree: bool = False, env: dict | None = None) -> float:
    """Run cmd (output to log); return its peak RSS in MiB. Exits with the log tail if it fails. `tree`: the peak of
    the RSS summed over the process and its descendants, sampled every 0.2 s (a trainer with an engine process of
    its own counts both; wait4 would give the larger of the two)."""
    with open(log, "w", encoding="utf-8") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        sampler = TreeRSS(proc.pid) if tree else None
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        tail = log.read_text(encoding="utf-8", errors="replace").splitlines()[-30:]
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}); end of {log}:\n" + "\n".join(tail))
    own = usage.ru_maxrss / 1024  # KiB on Linux
    return max(own, sampler.stop()) if sampler else own


class TreeRSS:
    """The peak over time of a process tree's summed resident memory, in MiB, sampled in a thread."""

    def __init__(self, pid: int, every: float = 0.2):
        import threading

        self.pid, self.every, self.peak, self.done = pid, every, 0.0, threading.Event()
        self.thread = threading.Thread(target=self.watch, daemon=True)
        self.thread.start()

    def watch(self) -> None:
        import psutil

        try:
            root = psutil.Process(self.pid)
        except psutil.NoSuchProcess:
            return
        while not self.done.wait(self.every):
            total = 0
            for p in [root, *root.children(recursive=True)]:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total / (1 << 20))

    def stop(self) -> float:
        self.done.set()
        self.thread.join()
        return self.peak


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


def run_llmft(stage: str, args: argparse.Namespace, model_dir: str, work: Path, tree: bool = False,
              **sections) -> tuple[list[dict], float]:
    """`python -m llmft STAGE CFG` (CFG: llmft_config + the stage's `sections`): its metrics.jsonl step rows and
    its peak RSS (MiB; `tree`: with its engine process's, see run_child)."""
    cfg = work / f"llmft-{stage}.yaml"
    cfg.write_text(yaml.safe_dump(llmft_config(args, model_dir, work) | sections), encoding="utf-8")
    rss = run_child([sys.executable, "-m", "llmft", stage, str(cfg)], work / f"llmft-{stage}.log", tree)
    lines = (work / "llmft_out" / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [r for r in map(json.loads, lines) if "tokens_per_s" in r], rss


def llmft_result(rows: list[dict], rss: float, args: argparse.Namespace, unit: str) -> dict:
    return {"impl": "llmft", **timed_rates(rows, args.warmup_steps, args.batch_size * args.grad_accum, unit),
            "peak_rss_mib": rss,
            "peak_cuda_mib": max((r["cuda_peak_mib"] for r in rows if "cuda_peak_mib" in r), default=None),
            "losses": [r["loss"] for r in rows], "step_tokens": [r["tokens"] for r in rows],
            "step_seconds": [r["tokens"] / r["tokens_per_s"] for r in rows if r["step"] > args.warmup_steps],
            "flush_denormal": True}


def run_trl(script: str, args: argparse.Namespace, model_dir: str, work: Path, flush: bool,
            keep: list[str], name: str = "", extra: tuple[str, ...] = (), python: str = "",
            tree: bool = False) -> dict:
    """Run a bench_trl*.py child with the common options (+ `extra`), by `python` (default this interpreter; the repo
    root is put on its PYTHONPATH, so another environment's imports llmft's judges too); `keep` its result keys, add
    the RSS from wait4 (`tree`: run_child).
    `name` (default trl, trl+flush) labels the run."""
    name = name or ("trl+flush" if flush else "trl")
    opts = ["model", "data", "max_length", "batch_size", "grad_accum", "steps", "warmup_steps", "lora_r",
            "lora_alpha", "lora_dropout", "target_modules", "lr", "seed"]
    cmd = [python or sys.executable, str(ROOT / "scripts" / script), "--out", str(work / f"{name}.json")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    for k in opts:
        cmd += [f"--{k.replace('_', '-')}", str(model_dir if k == "model" else getattr(args, k))]
    rss = run_child(cmd + [*extra] + ["--flush-denormal"] * flush, work / f"{name}.log", tree, env)
    res = json.loads((work / f"{name}.json").read_text(encoding="utf-8"))
    keep = ["tokens_per_s", "steps", "seconds", "tokens", "peak_cuda_mib", "losses", "step_tokens",
            "step_seconds", *keep]
    return {"impl": name, **{k: res[k] for k in keep}, "peak_rss_mib": rss, "flush_denormal": flush,
            "child_rss_mib": res["peak_rss_mib"]}


PAIR_KEYS = ["pairs_per_s", "pairs", "step_pairs", "train_pairs", "trainable_params"]


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
    from llmft.models.sources import resolve_source

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


def add_packing(p: argparse.ArgumentParser) -> None:
    p.add_argument("--packing", action=argparse.BooleanOptionalAction, default=False,
                   help="llmft with data.packing: true (padding-free micro-batches); TRL as shipped")


# sft --packing: llmft's data.packing, and TRL's alike (bench_trl.py --packing)
LLMFT_PACKING = {True: True, "none": None, "rows": True, "blocks": "blocks"}
