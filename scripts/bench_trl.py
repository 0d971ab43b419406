"""TRL half of the SFT benchmark: time `trl.SFTTrainer` + LoRA on a prompt/completion JSONL file.

Run it as its own process (``python scripts/bench_trl.py ...``) so that its peak RSS is isolated. Rows
``{"prompt": str, "completion": str}`` are fed as conversational prompt-completion (user / assistant
turns), so TRL applies the chat template and masks the prompt (completion-only loss). fp32, no packing,
padding to the longest sequence in the batch.

Only the optimizer steps after ``--warmup-steps`` are timed (``on_step_begin`` -> ``on_step_end``; the
batches of a step are fetched before ``on_step_begin``, so data loading is not timed). Tokens = sum of
``attention_mask`` over the micro-batches actually fed to the model. Writes the JSON result to ``--out``
and prints it as the last stdout line.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from bench import add_common  # the same options as the parent script (scripts/ is on sys.path)

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common(p, out="benchmarks/tmp/trl.json")
    p.add_argument("--gradient-checkpointing", action="store_true", help="TRL's default is on; off here")
    p.add_argument("--flush-denormal", action="store_true",
                   help="torch.set_flush_denormal(True) before training (what llmft does on CPU); off = as shipped")
    return p.parse_args(argv)


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
                unit: sum(n for _, n, _ in self.pending),
                # micro-batch losses come back scaled for grad accumulation: their sum is the step loss
                "loss": float(sum(float(v) for _, _, v in self.pending)),
            })

    return StepMeter()


def load_rows(path: str) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                r = json.loads(line)
                rows.append(
                    {
                        "prompt": [{"role": "user", "content": r["prompt"]}],
                        "completion": [{"role": "assistant", "content": r["completion"]}],
                    }
                )
    return rows


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")  # TRL pings telemetry at trainer init otherwise
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback
    from trl import SFTConfig, SFTTrainer

    if args.flush_denormal:
        torch.set_flush_denormal(True)
    cuda = torch.cuda.is_available()

    meter = step_meter("samples")

    class MeteredSFTTrainer(SFTTrainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            loss = super().training_step(model, inputs, num_items_in_batch)
            # Record lazily (no host sync inside the timed region); converted in on_step_end.
            meter.pending.append((inputs["attention_mask"].sum(), inputs["input_ids"].shape[0], loss))
            return loss

    from llmft.modeling import resolve_source

    model_dir = resolve_source(args.model).path  # an alias, .gguf file or directory, as for llmft
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    targets = args.target_modules
    lora = LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=targets if targets == "all-linear" else [t.strip() for t in targets.split(",")],
        bias="none",
        task_type="CAUSAL_LM",
    )
    tmp = tempfile.TemporaryDirectory(prefix="bench_trl_")
    config = SFTConfig(
        output_dir=tmp.name,
        max_steps=args.warmup_steps + args.steps,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        seed=args.seed,
        data_seed=args.seed,  # RandomSampler shuffle seed
        bf16=False,  # TRL defaults bf16=True; benchmark is fp32
        fp16=False,
        activation_checkpointing=args.gradient_checkpointing,  # TRL defaults gradient_checkpointing=True
        max_length=args.max_length,
        truncation_mode="keep_start",
        packing=False,
        padding_free=False,
        pad_to_multiple_of=None,  # pad to longest in batch
        completion_only_loss=True,
        report_to="none",
        logging_strategy="no",
        save_strategy="no",
        eval_strategy="no",
        dataloader_num_workers=0,
        dataloader_pin_memory=cuda,
        disable_tqdm=True,
    )
    trainer = MeteredSFTTrainer(
        model=model,
        args=config,
        train_dataset=Dataset.from_list(load_rows(args.data)),
        processing_class=tokenizer,
        peft_config=lora,
        callbacks=[meter],
    )
    trainer.remove_callback(PrinterCallback)  # keep stdout for the result line
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    tmp.cleanup()

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
