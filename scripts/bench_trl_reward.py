"""TRL half of the reward benchmark: time `trl.RewardTrainer` + LoRA on a {prompt, chosen, rejected} JSONL file.

Run it as its own process (``python scripts/bench_trl_reward.py ...``) so that its peak RSS is isolated. Rows are
fed in conversational form (prompt = [user turn], chosen / rejected = [assistant turn]), so TRL renders each side
with the chat template, as llmft does. The model is loaded by TRL itself (``AutoModelForSequenceClassification``,
num_labels=1, fp32); PEFT's SEQ_CLS task keeps LoRA off the ``score`` head and trains that head in full. fp32, no
gradient checkpointing, dropout off (TRL's ``disable_dropout`` default), no reward centering, padding to the
longest sequence of the batch.

A micro-batch of B pairs is one forward over 2B sequences (chosen rows, then rejected rows), like llmft. Only the
optimizer steps after ``--warmup-steps`` are timed (``on_step_begin`` -> ``on_step_end``; the batches of a step are
fetched before ``on_step_begin``). Tokens = sum of ``attention_mask`` over what is fed to the model; pairs = number
of pairs per step. Writes the JSON result to ``--out`` and prints it as the last stdout line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from bench import add_common  # the same options as the parent script (scripts/ is on sys.path)

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common(p, out="benchmarks/tmp/trl-reward.json")
    p.add_argument("--gradient-checkpointing", action="store_true", help="TRL's default is on; off here")
    p.add_argument("--flush-denormal", action="store_true",
                   help="torch.set_flush_denormal(True) before training (what llmft does on CPU); off = as shipped")
    return p.parse_args(argv)


def as_turns(value: str | list, role: str) -> list[dict]:
    return [{"role": role, "content": value}] if isinstance(value, str) else value


def load_rows(path: str) -> list[dict]:
    """{prompt, chosen, rejected} rows in TRL's conversational explicit-prompt form."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                r = json.loads(line)
                rows.append({"prompt": as_turns(r["prompt"], "user"), "chosen": as_turns(r["chosen"], "assistant"),
                             "rejected": as_turns(r["rejected"], "assistant")})
    return rows


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")  # TRL pings telemetry at trainer init otherwise
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer, PrinterCallback
    from trl import RewardConfig, RewardTrainer

    if args.flush_denormal:
        torch.set_flush_denormal(True)
    cuda = torch.cuda.is_available()

    from bench_trl import step_meter, write_result  # scripts/ is on sys.path

    meter = step_meter("pairs")

    class MeteredRewardTrainer(RewardTrainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            loss = super().training_step(model, inputs, num_items_in_batch)
            # Lazily (no host sync inside the timed region); 2B rows = B chosen + B rejected.
            meter.pending.append((inputs["attention_mask"].sum(), inputs["input_ids"].shape[0] // 2, loss))
            return loss

    from llmft.modeling import resolve_source

    model_dir = resolve_source(args.model).path  # an alias, .gguf file or directory, as for llmft
    tokenizer = AutoTokenizer.from_pretrained(model_dir)  # TRL falls back to eos as pad when it has none
    targets = args.target_modules
    lora = LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=targets if targets == "all-linear" else [t.strip() for t in targets.split(",")],
        bias="none",
        task_type="SEQ_CLS",  # LoRA on the body, `score` head fully trained (modules_to_save)
    )
    tmp = tempfile.TemporaryDirectory(prefix="bench_trl_reward_")
    config = RewardConfig(
        output_dir=tmp.name,
        max_steps=args.warmup_steps + args.steps,
        per_device_train_batch_size=args.batch_size,  # pairs per micro-batch
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        seed=args.seed,
        data_seed=args.seed,  # RandomSampler shuffle seed: randperm(n) from it = llmft's epoch-0 order
        bf16=False,  # TRL defaults bf16=True; benchmark is fp32
        fp16=False,
        gradient_checkpointing=args.gradient_checkpointing,  # TRL defaults gradient_checkpointing=True
        model_init_kwargs={"dtype": "float32"},
        max_length=args.max_length,  # pairs with a longer side are dropped (the parent pre-filters anyway)
        pad_to_multiple_of=None,  # pad to longest in batch
        center_rewards_coefficient=None,  # llmft's loss.center_coef defaults to 0
        disable_dropout=True,  # TRL's default; llmft turns every dropout off too
        report_to="none",
        logging_strategy="no",
        save_strategy="no",
        eval_strategy="no",
        dataloader_num_workers=0,
        dataloader_pin_memory=cuda,
        disable_tqdm=True,
    )
    trainer = MeteredRewardTrainer(
        model=model_dir,
        args=config,
        train_dataset=Dataset.from_list(load_rows(args.data)),
        processing_class=tokenizer,
        peft_config=lora,
        callbacks=[meter],
    )
    trainer.remove_callback(PrinterCallback)  # keep stdout for the result line
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    tmp.cleanup()

    return write_result(meter, args, "pairs", train_pairs=len(trainer.train_dataset), trainable_params=trainable,
                        pad_token_id=tokenizer.pad_token_id)


if __name__ == "__main__":
    main(sys.argv[1:])
