"""What held-out answers are measured by during training: the RL stages' `eval` section (their prompts are data.eval)
and sft's, dpo's and kto's (their prompts are eval.prompts; their data.eval holds examples, pairs or labels).
Import-light: the configs import it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from llmft.schema import opt


@dataclass
class HeldOutConfig:
    judges: list[str] = opt([], "Judges of the held-out answers, independent of what the stage trains on "
                                "(constraints, substance, bleu, rouge_l, meteor, module:function): eval/<judge>; in "
                                "ppo and grpo what alarm.independent can watch.")
    reference_column: str = opt("completion", "The held-out rows' reference text column (bleu, rouge_l, meteor).")
    select_by: str | None = opt(
        None, "An eval/… metric to keep the best policy by (e.g. eval/constraints/pass_rate; an independent one, not "
              "eval/reward): the policy at the evaluation where it was best is written to output_dir/best/, a stage "
              "output like the final one, and named in llmft.json (best/step, best/value).")
    select_mode: Literal["max", "min"] = opt("max", "Whether higher (max) or lower (min) select_by is better.")


@dataclass
class AnswersConfig(HeldOutConfig):
    prompts: str | None = opt(
        None, "Held-out prompt rows ({prompt} or {messages}: an ending assistant turn is not shown), with the "
              "columns the judges read (constraints, completion): answered greedily at step 0, every "
              "train.eval_every steps and at the end, logged as eval/<judge>, eval/kl (to the model this stage starts "
              "from) and eval/completions/…, every answer in eval_samples.jsonl. null = none.")
    max_new_tokens: int = opt(128, "The longest held-out answer, in tokens.", ge=1)
