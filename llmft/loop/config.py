"""`llmft loop`'s config: rounds of answers from the current policy, feedback on them, and a stage trained on it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from llmft.config import ModelConfig, RewardSourcesConfig
from llmft.sampling import SamplingConfig
from llmft.schema import REQUIRED, opt

REFINE_TEMPLATE = ("This is what is wrong with your answer: {critique}\n"
                   "Write your answer again with that fixed. Reply with the new answer only.")


@dataclass
class PeopleConfig:
    items: int = opt(0, "People judge each round instead of programs: the round serves its answers on the annotation "
                        "page (llmft annotate) and waits until this many items are judged; 0 = programs judge "
                        "(feedback:).", ge=0)
    host: str = opt("127.0.0.1", "Address the page listens on (loopback only).")
    port: int = opt(8765, "Port of the page (0 = any free one; the address is printed).", ge=0)
    mode: Literal["feedback", "compare"] = opt("feedback", "The page's mode (llmft annotate serve --mode).")
    poll_seconds: float = opt(2.0, "How often the waiting round counts the judged items.", gt=0)


@dataclass
class RefineConfig:
    attempts: int = opt(4, "Refinements sampled per criticised answer (the worst answer to each prompt that has a "
                           "critique).", ge=1)
    min_overlap: float = opt(
        0.3, "A rewrite counts only when its ROUGE-L against the answer it rewrites is at least this: an edit that "
             "keeps what was right, not a new text. A small model shown a critique often answers the critique instead "
             "(\"This is what is wrong with your answer: …\"), which can meet the constraints and teach nothing; "
             "0 = off.",
        ge=0, le=1)
    model: str | None = opt(None, "The model that writes the rewrites (e.g. a larger local model with the policy's "
                                  "tokenizer); null = the current policy.")
    template: str = opt(REFINE_TEMPLATE, "The user turn that follows the answer: what the policy is asked to fix "
                                         "({critique} is replaced by the critique).")


@dataclass
class HeldOutPromptsConfig:
    prompts: str | None = opt(None, "Held-out prompt rows answered greedily before round 1 and after each round "
                                    "(pass rate, win rate against the previous round); null = no report of that.")
    judges: list[str] = opt(["constraints"], "What measures the held-out answers (constraints, substance, bleu, "
                                             "rouge_l, meteor, module:function).")
    reference_column: str = opt("completion", "The held-out rows' reference text column (bleu, rouge_l, meteor).")
    max_new_tokens: int = opt(64, "The longest held-out answer, in tokens.", ge=1)


@dataclass
class LoopConfig:
    prompts: str = field(default=REQUIRED, metadata={
        "help": "Prompt rows ({prompt} or {messages}, plus what the judges read, e.g. constraints); each round takes "
                "the next prompts_per_round of them (from the start again when they run out)."})
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": "The policy of round 1."})
    rounds: int = opt(3, "How many rounds.", ge=1)
    prompts_per_round: int = opt(32, "Prompts answered per round.", ge=1)
    answers: int = opt(4, "Answers sampled per prompt from the current policy.", ge=2)
    method: Literal["pairs", "refine", "both"] = opt(
        "pairs", "What the feedback becomes. pairs: each prompt's best answer ≻ its worst (iterative DPO; the scores "
                 "alone). refine: the worst answer's critique is shown to the policy, which rewrites it "
                 "refine.attempts times; the best rewrite that scores higher than the answer ≻ the answer (ILF). "
                 "both: the two sets of rows together.")
    trainer: Literal["dpo", "sft"] = opt(
        "dpo", "The stage each round trains: dpo on the pairs (its reference: the previous round's policy), or sft "
               "on their chosen answers (ILF's fine-tuning on refinements; rejection sampling for pairs).")
    train: dict[str, Any] = opt({}, "The trainer's own keys (llmft schema dpo / sft: lora, loss, train, …), the "
                                    "same every round; model, data.train, output_dir, resume and seed are the loop's.")
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(temperature=0.7, max_new_tokens=64),
                                     metadata={"help": "How answers and refinements are sampled (temperature > 0)."})
    feedback: RewardSourcesConfig = field(
        default_factory=lambda: RewardSourcesConfig(judges={"constraints": 1.0}),
        metadata={"help": "What judges the answers when programs do: judges (their critics say what is wrong: "
                          "constraints, substance, a module:function returning {score, critique}) and/or a reward "
                          "model (scores only); combine, missing_eos_penalty."})
    people: PeopleConfig = field(default_factory=PeopleConfig, metadata={"help": "Feedback from people instead."})
    refine: RefineConfig = field(default_factory=RefineConfig, metadata={"help": "Refinements (method: refine)."})
    held_out: HeldOutPromptsConfig = field(default_factory=HeldOutPromptsConfig,
                                           metadata={"help": "The per-round report's held-out prompts."})
    output_dir: str = opt("runs/loop", "Where each round's answers, feedback, training rows, model and report go "
                                       "(round-N/), with the record of the rounds (loop.json).")
    overwrite: bool = opt(False, "Delete an output_dir that holds a loop with another config.")
    seed: int = opt(42, "Seed of the rounds' sampling and training.", ge=0)
    device: Literal["auto", "cpu", "cuda"] = opt("auto", "auto = cuda when available, else cpu.")
