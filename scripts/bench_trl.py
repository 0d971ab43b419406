"""TRL half of the SFT benchmark: time `trl.SFTTrainer` + LoRA on a prompt/completion JSONL file.

Run it as its own process (``python scripts/bench_trl.py ...``) so that its peak RSS is isolated. Rows
``{"prompt": str, "completion": str}`` are fed as conversational prompt-completion (user / assistant
turns), so TRL applies the chat template and masks the prompt (completion-only loss). fp32; by default no packing,
padding to the longest sequence in the batch (`--packing rows|blocks`: TRL's padding_free or packing).

Only the optimizer steps after ``--warmup-steps`` are timed (``on_step_begin`` -> ``on_step_end``; the
batches of a step are fetched before ``on_step_begin``, so data loading is not timed). Tokens = sum of
``attention_mask`` over the micro-batches actually fed to the model. Writes the JSON result to ``--out``
and prints it as the last stdout line.

The helpers below (options, setup, LoRA, common trainer config, step metering, result) are shared by the
other TRL children, bench_trl_reward.py and bench_trl_dpo.py.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time


def child_parser(doc: str, out: str) -> argparse.ArgumentParser:
    """The options of a TRL child: the parent's common ones (`doc`'s first line as description)."""
    from bench_common import add_common  # the same options as the parent script (scripts/ is on sys.path)

    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    add_common(p, out=out)
    p.add_argument("--gradient-checkpointing", action="store_true", help="TRL's default is on; off here")
    p.add_argument("--flush-denormal", action="store_true",
                   help="torch.set_flush_denormal(True) before training (what llmft does on CPU); off = as shipped")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = child_parser(__doc__, "benchmarks/tmp/trl.json")
    p.add_argument("--packing", choices=PACKING, default="none",
                   help="rows: padding_free=True (each batch's rows flattened into one sequence); blocks: "
                        "packing=True (best-fit decreasing into max_length blocks, padding-free)")
    return p.parse_args(argv)


PACKING = ("none", "rows", "blocks")


def setup(args: argparse.Namespace) -> tuple[bool, str]:
    """Offline, quiet environment, the denormal flag; returns (cuda available, the model's local directory)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")  # TRL pings telemetry at trainer init otherwise
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    from llmft.models.sources import resolve_source

    if args.flush_denormal:
        torch.set_flush_denormal(True)
    return torch.cuda.is_available(), resolve_source(args.model).path  # an alias, .gguf or directory, as for llmft


def lora_config(args: argparse.Namespace, task_type: str):
    from peft import LoraConfig

    targets = args.target_modules
    return LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=targets if targets == "all-linear" else [t.strip() for t in targets.split(",")],
        bias="none",
        task_type=task_type,
    )


def common_config(args: argparse.Namespace, output_dir: str, cuda: bool) -> dict:
    """TRL config keys every bench child sets the same way (fp32, constant lr, seeded order, no logging/saving)."""
    return dict(
        output_dir=output_dir,
        max_steps=args.warmup_steps + args.steps,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        seed=args.seed,
        data_seed=args.seed,  # RandomSampler shuffle seed: randperm(n) from it = llmft's epoch-0 order
        bf16=False,  # TRL defaults bf16=True; benchmark is fp32
        fp16=False,
        max_length=args.max_length,
        pad_to_multiple_of=None,  # pad to longest in batch
        report_to="none",
        logging_strategy="no",
        save_strategy="no",
        eval_strategy="no",
        dataloader_num_workers=0,
        dataloader_pin_memory=cuda,
        disable_tqdm=True,
    )


def step_meter(unit: str):
    """A TrainerCallback timing each optimizer step; `pending` gets (tokens, rows, loss) per micro-batch
    from the trainer's training_step, turned into {step, seconds, tokens, `unit`, loss} at the step's end."""
    import torch
    from transformers import TrainerCallback

    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)

    class StepMeter(TrainerCallback):
        def __init__(self) -> None:
            self.pending: list[tuple] = []
            self.records: list[dict] = []

        def on_step_begin(self, args_, state, control, **kwargs):
            self.pending = []
            sync()
            self.t0 = time.perf_counter()

        def on_step_end(self, args_, state, control, **kwargs):
            sync()
            dt = time.perf_counter() - self.t0
            self.records.append({
                "step": state.global_step, "seconds": dt,
                "tokens": int(sum(int(t) for t, _, _ in self.pending)),
                unit: int(sum(int(n) for _, n, _ in self.pending)),
                # micro-batch losses come back scaled for grad accumulation: their sum is the step loss
                "loss": float(sum(float(v) for _, _, v in self.pending)),
            })

    return StepMeter()


def metered(trainer_cls, meter, rows_per_unit: int = 1):
    """`trainer_cls` whose training_step feeds `meter` (tokens, rows / rows_per_unit, loss) per micro-batch;
    lazily, as tensors, so there is no host sync inside the timed region (converted in on_step_end)."""

    class Metered(trainer_cls):
        def training_step(self, model, inputs, num_items_in_batch=None):
            loss = super().training_step(model, inputs, num_items_in_batch)
            if "attention_mask" in inputs:
                tokens, rows = inputs["attention_mask"].sum(), inputs["input_ids"].shape[0] // rows_per_unit
            else:  # padding-free (packing): the rows of the batch flattened into one, positions restarting
                tokens, rows = inputs["input_ids"].numel(), (inputs["position_ids"] == 0).sum() // rows_per_unit
            meter.pending.append((tokens, rows, loss))
            return loss

    return Metered


def train(trainer, cuda: bool) -> None:
    """Quiet stdout (kept for the result line), reset the CUDA peak, train."""
    import torch
    from transformers import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()


def jsonl(path: str) -> list[dict]:
    """The rows of a JSONL file (blank lines skipped)."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def as_turns(value: str | list, role: str) -> list[dict]:
    return [{"role": role, "content": value}] if isinstance(value, str) else value


def load_rows(path: str) -> list[dict]:
    """{prompt, completion} rows in TRL's conversational prompt-completion form."""
    return [{"prompt": as_turns(r["prompt"], "user"), "completion": as_turns(r["completion"], "assistant")}
            for r in jsonl(path)]


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    cuda, model_dir = setup(args)

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    meter = step_meter("samples")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, use_kernels=False)  # as llmft
    with tempfile.TemporaryDirectory(prefix="bench_trl_") as tmp:
        config = SFTConfig(
            **common_config(args, tmp, cuda),
            activation_checkpointing=args.gradient_checkpointing,  # TRL defaults gradient_checkpointing=True
            truncation_mode="keep_start",
            packing=args.packing == "blocks",
            padding_free=args.packing == "rows",
            completion_only_loss=True,
        )
        trainer = metered(SFTTrainer, meter)(
            model=model,
            args=config,
            train_dataset=Dataset.from_list(load_rows(args.data)),
            processing_class=tokenizer,
            peft_config=lora_config(args, "CAUSAL_LM"),
            callbacks=[meter],
        )
        train(trainer, cuda)

    return write_result(meter, args, "samples")


def write_result(meter, args: argparse.Namespace, unit: str, **extra) -> dict:
    """Rates over the timed steps (after warmup) and per-step records; written to --out and printed as the
    last stdout line."""

    import torch
    import trl

    cuda = torch.cuda.is_available()
    timed = [r for r in meter.records if r["step"] > args.warmup_steps]
    seconds = sum(r["seconds"] for r in timed)
    tokens = sum(r["tokens"] for r in timed)
    done = sum(r[unit] for r in timed)
    result = {
        "impl": "trl",
        "trl_version": trl.__version__,
        "tokens_per_s": tokens / seconds if seconds else None,
        f"{unit}_per_s": done / seconds if seconds else None,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_cuda_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
        "steps": len(timed),
        "warmup_steps": args.warmup_steps,
        "losses": [r["loss"] for r in meter.records],  # every optimizer step, warmup included
        "step_tokens": [r["tokens"] for r in meter.records],  # likewise
        f"step_{unit}": [r[unit] for r in meter.records],  # likewise
        "seconds": seconds,
        "tokens": tokens,
        unit: done,
        "step_seconds": [r["seconds"] for r in timed],
        "device": "cuda" if cuda else "cpu",
        "flush_denormal": args.flush_denormal,
        "threads": torch.get_num_threads(),
        **extra,
    }
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
