"""TRL half of the DPO benchmark: time `trl.DPOTrainer` + LoRA on a {prompt, chosen, rejected} JSONL file.

Run it as its own process (``python scripts/bench_trl_dpo.py ...``) so that its peak RSS is isolated. The policy is
loaded by TRL itself (``AutoModelForCausalLM``, fp32) and wrapped with a fresh LoRA adapter; with ``ref_model=None``
TRL takes the reference as that model with its adapter disabled, and computes the reference log-probs in every
step (no precompute), as ``llmft dpo`` does. Sigmoid loss, β ``--beta``, no label smoothing, fp32, no gradient
checkpointing, dropout off (TRL's ``disable_dropout`` default), padding to the longest sequence of the batch.

``--rows conversational`` (default, TRL as users feed it): prompt = [user turn], chosen / rejected = [assistant
turn]; TRL renders prompt + answer through the chat template, so each response ends ``<|im_end|>\\n`` (for ChatML
templates) and its log-prob includes that trailing newline. ``--rows rendered``: the prompt is rendered with the
chat template and its generation prompt and the answers are plain text, to which TRL appends EOS; the tokens are
then exactly llmft's (prompt + answer + EOS).

A micro-batch of B pairs is one forward over 2B sequences (chosen rows, then rejected rows), like llmft. Only the
optimizer steps after ``--warmup-steps`` are timed (``on_step_begin`` -> ``on_step_end``; the batches of a step are
fetched before it and the metrics are logged after it). Tokens = sum of ``attention_mask`` over what is fed to the
model; pairs = number of pairs per step. TRL's logged metrics of every step (``logps/chosen``, ``rewards/*``, ...)
are kept in the result. Writes the JSON result to ``--out`` and prints it as the last stdout line.
"""

from __future__ import annotations

import argparse
import sys
import tempfile

from bench_trl import child_parser, common_config, lora_config, metered, setup, step_meter, train, write_result
from bench_trl_reward import load_rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = child_parser(__doc__, "benchmarks/tmp/trl-dpo.json")
    p.add_argument("--beta", type=float, default=0.1, help="DPO β (sigmoid loss)")
    p.add_argument("--rows", choices=["conversational", "rendered"], default="conversational",
                   help="how the pairs are fed to TRL (see the module doc)")
    return p.parse_args(argv)


def rendered(rows: list[dict], tok) -> list[dict]:
    """Conversational rows → plain-text rows: the prompt through the chat template with its generation prompt,
    the answers as text (TRL appends EOS to them)."""
    return [{"prompt": tok.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=False),
             "chosen": r["chosen"][-1]["content"], "rejected": r["rejected"][-1]["content"]} for r in rows]


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    cuda, model_dir = setup(args)

    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    meter = step_meter("pairs")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = load_rows(args.data)
    with tempfile.TemporaryDirectory(prefix="bench_trl_dpo_") as tmp:
        config = DPOConfig(
            **common_config(args, tmp, cuda) | {"logging_strategy": "steps"},
            logging_steps=1,  # TRL's metrics of every step; logged after on_step_end, so not timed
            warmup_steps=0,
            gradient_checkpointing=args.gradient_checkpointing,  # TRL defaults gradient_checkpointing=True
            model_init_kwargs={"dtype": "float32", "use_kernels": False},  # as llmft loads: no Hub kernels
            truncation_mode="keep_start",  # nothing is truncated: the parent keeps the pairs that fit
            padding_free=False,
            loss_type=["sigmoid"],
            beta=args.beta,
            label_smoothing=0.0,
            precompute_ref_log_probs=False,  # reference log-probs in each step, as llmft (by default)
            disable_dropout=True,  # TRL's default; llmft turns every dropout off too
        )
        trainer = metered(DPOTrainer, meter, rows_per_unit=2)(  # 2B rows = B chosen + B rejected
            model=model_dir,
            ref_model=None,  # with a PEFT model: the policy with its adapter disabled
            args=config,
            train_dataset=Dataset.from_list(rendered(rows, tokenizer) if args.rows == "rendered" else rows),
            processing_class=tokenizer,
            peft_config=lora_config(args, "CAUSAL_LM"),
            callbacks=[meter],
        )
        trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        train(trainer, cuda)

    logs = [h for h in trainer.state.log_history if "logps/chosen" in h]
    return write_result(meter, args, "pairs", train_pairs=len(trainer.train_dataset), trainable_params=trainable,
                        rows=args.rows, beta=args.beta, step_logs=logs,
                        logps_chosen=[h["logps/chosen"] for h in logs],
                        logps_rejected=[h["logps/rejected"] for h in logs])


if __name__ == "__main__":
    main(sys.argv[1:])
