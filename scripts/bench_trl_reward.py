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
import sys
import tempfile

from bench_trl import (
    as_turns,
    child_parser,
    common_config,
    jsonl,
    lora_config,
    metered,
    setup,
    step_meter,
    train,
    write_result,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return child_parser(__doc__, "benchmarks/tmp/trl-reward.json").parse_args(argv)


def load_rows(path: str) -> list[dict]:
    """{prompt, chosen, rejected} rows in TRL's conversational explicit-prompt form."""
    return [{"prompt": as_turns(r["prompt"], "user"), "chosen": as_turns(r["chosen"], "assistant"),
             "rejected": as_turns(r["rejected"], "assistant")} for r in jsonl(path)]


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    cuda, model_dir = setup(args)

    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    meter = step_meter("pairs")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)  # TRL falls back to eos as pad when it has none
    with tempfile.TemporaryDirectory(prefix="bench_trl_reward_") as tmp:
        config = RewardConfig(
            **common_config(args, tmp, cuda),
            warmup_steps=0,
            gradient_checkpointing=args.gradient_checkpointing,  # TRL defaults gradient_checkpointing=True
            model_init_kwargs={"dtype": "float32", "use_kernels": False},  # as llmft loads: no Hub kernels
            center_rewards_coefficient=None,  # llmft's loss.center_coef defaults to 0
            disable_dropout=True,  # TRL's default; llmft turns every dropout off too
        )
        # max_length: pairs with a longer side are dropped (the parent pre-filters anyway)
        trainer = metered(RewardTrainer, meter, rows_per_unit=2)(  # 2B rows = B chosen + B rejected
            model=model_dir,
            args=config,
            train_dataset=Dataset.from_list(load_rows(args.data)),
            processing_class=tokenizer,
            peft_config=lora_config(args, "SEQ_CLS"),  # LoRA on the body, `score` head fully trained
            callbacks=[meter],
        )
        trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        train(trainer, cuda)

    return write_result(meter, args, "pairs", train_pairs=len(trainer.train_dataset), trainable_params=trainable,
                        pad_token_id=tokenizer.pad_token_id)


if __name__ == "__main__":
    main(sys.argv[1:])
