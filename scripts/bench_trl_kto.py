"""TRL half of the KTO benchmark: time `trl.KTOTrainer` + LoRA on a {prompt, completion, label} JSONL file.

Run it as its own process (``python scripts/bench_trl_kto.py ...``) so that its peak RSS is isolated. The rows are
conversational (prompt = [user turn], completion = [assistant turn]); TRL renders them through the chat template, so
each answer ends ``<|im_end|>\\n`` for ChatML templates. With ``ref_model=None`` the reference is the policy with
its adapter disabled, run in every step (no precompute), as ``llmft kto`` does. Loss ``kto`` (its KL reference
point from each example's precomputed mismatched completion — the previous row's — which needs TRL's sequential
sampling), β ``--beta``, both weights 1, fp32, no gradient checkpointing, dropout off.

A micro-batch of B answers is one policy forward over B sequences with gradients, and B mismatched sequences under
the policy and the reference without (the KL estimate), and B under the reference: four forwards, like llmft.
Only the optimizer steps after ``--warmup-steps`` are timed. Tokens = sum of ``attention_mask`` of the answers fed
(the KL sequences not counted, on either side); answers = rows per step. Writes the JSON result to ``--out`` and
prints it as the last stdout line.
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
    p = child_parser(__doc__, "benchmarks/tmp/trl-kto.json")
    p.add_argument("--beta", type=float, default=0.1, help="KTO β")
    return p.parse_args(argv)


def load_rows(path: str) -> list[dict]:
    return [{"prompt": as_turns(r["prompt"], "user"), "completion": as_turns(r["completion"], "assistant"),
             "label": bool(r["label"])} for r in jsonl(path)]


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    cuda, model_dir = setup(args)

    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import KTOConfig, KTOTrainer

    meter = step_meter("answers")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    with tempfile.TemporaryDirectory(prefix="bench_trl_kto_") as tmp:
        config = KTOConfig(
            **common_config(args, tmp, cuda) | {"logging_strategy": "steps"},
            logging_steps=1,  # TRL's metrics of every step; logged after on_step_end, so not timed
            warmup_steps=0,
            gradient_checkpointing=args.gradient_checkpointing,
            model_init_kwargs={"dtype": "float32", "use_kernels": False},  # as llmft loads: no Hub kernels
            train_sampling_strategy="sequential",  # required by its KL estimate
            loss_type="kto",
            beta=args.beta,
            desirable_weight=1.0,
            undesirable_weight=1.0,
            precompute_ref_log_probs=False,  # reference log-probs in each step, as llmft
            disable_dropout=True,
        )
        trainer = metered(KTOTrainer, meter)(
            model=model_dir,
            ref_model=None,  # with a PEFT model: the policy with its adapter disabled
            args=config,
            train_dataset=Dataset.from_list(load_rows(args.data)),
            processing_class=tokenizer,
            peft_config=lora_config(args, "CAUSAL_LM"),
            callbacks=[meter],
        )
        trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        train(trainer, cuda)

    logs = [h for h in trainer.state.log_history if "kl" in h]
    return write_result(meter, args, "answers", train_answers=len(trainer.train_dataset), trainable_params=trainable,
                        beta=args.beta, step_logs=logs, kl=[h["kl"] for h in logs])


if __name__ == "__main__":
    main(sys.argv[1:])
