"""Typed, validated stage configs.

Each stage's config is a tree of dataclasses. `load_config` reads a YAML file with `yaml.safe_load`, applies
`--set a.b=value` overrides, and validates every key against the schema: unknown keys are errors that name
the key path and suggest the closest valid one, wrong types and out-of-range values name the key and what
was expected. Field metadata carries each key's documentation and range (`llmft schema STAGE` prints it).
The validation machinery is in `llmft.schema`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

from llmft.rl.alarms import AlarmConfig  # noqa: F401 (the configs name them here)
from llmft.rl.algo_config import GRPOAlgoConfig, PPOAlgoConfig  # noqa: F401 (the configs name them here)
from llmft.run.eval_config import AnswersConfig, HeldOutConfig  # noqa: F401 (the configs name them here)
from llmft.sampling import EnvConfig, RolloutConfig, SamplingConfig, VLLMConfig  # noqa: F401 (the configs name them here)
from llmft.schema import REQUIRED, apply_override, build, opt, read_yaml


@dataclass
class ModelConfig:
    name: str = opt("smollm2-135m-instruct",
                    "Model source: a local Hugging Face directory, a hub id, a .gguf file, the embedded "
                    "'smollm2-135m-instruct', or the output directory of an earlier llmft stage.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = opt(
        "auto", "Weights/compute dtype; auto = bfloat16 on CUDA, float32 on CPU.")
    trust_remote_code: bool = opt(False, "Allow model code from the hub to run (off unless you need it).")
    revision: str | None = opt(None, "Hub revision (branch, tag or commit) for hub ids.")
    attn_implementation: str | None = opt(None, "Attention kernel: sdpa, eager, flash_attention_2; "
                                                "null = the transformers default.")
    chat_template: str | None = opt(
        None, "A chat template for a model without one (a base model), or to replace its own: chatml, llama3, gemma, "
              "or a Jinja file. Special tokens it needs are added, trained with the adapter and saved with the run; "
              "later stages keep it. null = the model's own (none: prompt and answer joined by a blank line).")
    special_tokens: list[str] = opt([], "Special tokens a chat_template Jinja file needs that the tokenizer lacks "
                                        "(named templates know theirs).")
    allow_pickle: bool = opt(False, "Load pickled weights (pytorch_model.bin) when a model has no safetensors. "
                                    "Unpickling can run code: only for files you trust.")
    quantization: Literal["nf4", "int8"] | None = opt(
        None, "QLoRA: hold the frozen base's linear layers (all but the LM head) in 4-bit NF4 or 8-bit int8 through "
              "bitsandbytes (pip install 'llmft[qlora]') and train LoRA on top in `dtype`. null = full precision.")
    kernels: bool = opt(False, "Hub kernels: let transformers replace layers with compiled kernels fetched from the "
                               "Hugging Face Hub (the `kernels` package; remote code, needs the network). Off: "
                               "transformers' own PyTorch code runs in every stage.")


@dataclass
class LoraConfig:
    r: int = opt(16, "LoRA rank.", ge=1)
    alpha: float = opt(32.0, "LoRA scaling numerator (scale = alpha / r).", gt=0)
    dropout: float = opt(0.05, "Dropout on the LoRA input.", ge=0, lt=1)
    target_modules: Union[str, list[str]] = opt(  # noqa: UP007
        "all-linear", "Modules to adapt: 'all-linear' or a list of module names (e.g. [q_proj, v_proj]).")


@dataclass
class DataConfig:
    train: Union[str, list[str]] = field(default=REQUIRED, metadata={  # noqa: UP007
        "help": "Training data: a .jsonl/.json/.parquet/.csv file or a hub dataset id (online only), or a list of "
                "them (read in order)."})
    eval: Union[str, list[str], None] = opt(  # noqa: UP007
        None, "Evaluation data (same forms as train); null = none, or see eval_fraction.")
    eval_fraction: float = opt(0.0, "Fraction of train held out for eval when `eval` is null.", ge=0, lt=1)
    split: str = opt("train", "Split to read from hub datasets.")
    format: Literal["auto", "prompt_completion", "messages", "text"] = opt(
        "auto", "Row format: {prompt, completion}, {messages: [...]}, {text}; auto detects it.")
    max_length: int = opt(1024, "Longest tokenised example; longer rows are truncated (and counted).", ge=8)
    loss_on: Literal["completion", "all"] = opt(
        "completion", "Train on completion/assistant tokens only, or on every token.")
    packing: Union[bool, Literal["blocks"]] = opt(  # noqa: UP007
        False, "true: run each micro-batch's rows as one padding-free sequence (positions restart at each row, "
               "attention never crosses rows): the same batches and losses, no layer computes padding. blocks: "
               "regroup the rows into blocks of up to max_length tokens (best-fit decreasing, like TRL's packing), "
               "each block a row of the batch (padded to the longest block; flash-attention: one padding-free "
               "sequence); train.batch_size then counts blocks.")


@dataclass
class TrainConfig:
    epochs: int = opt(1, "Passes over the training data (ignored when max_steps is set).", ge=1)
    max_steps: int | None = opt(None, "Stop after this many optimizer steps.", ge=1)
    batch_size: int = opt(8, "Examples per micro-batch.", ge=1)
    grad_accum: int = opt(1, "Micro-batches per optimizer step.", ge=1)
    learning_rate: float = opt(2e-4, "Peak learning rate (AdamW).", gt=0)
    weight_decay: float = opt(0.0, "AdamW weight decay.", ge=0)
    scheduler: Literal["cosine", "linear", "constant"] = opt("cosine", "Learning-rate schedule after warmup.")
    warmup_ratio: float = opt(0.03, "Share of steps spent warming the learning rate up linearly.", ge=0, le=1)
    max_grad_norm: float | None = opt(1.0, "Clip the gradient norm to this; null = no clipping.", gt=0)
    gradient_checkpointing: bool = opt(False, "Recompute activations in backward to save memory.")
    log_every: int = opt(1, "Write metrics every N optimizer steps.", ge=1)
    eval_every: int | None = opt(None, "Evaluate every N steps (and always at the end); null = end only.",
                                 ge=1)
    save_every: int = opt(50, "Write a resumable checkpoint-N/ every N steps.", ge=1)
    keep_checkpoints: int = opt(2, "How many checkpoint-N/ folders to keep.", ge=1)


@dataclass
class RunConfig:
    """The keys every training stage has; a stage adds its data (and loss) sections."""

    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": "Model to fine-tune."})
    lora: LoraConfig = field(default_factory=LoraConfig, metadata={"help": "LoRA adapter."})
    train: TrainConfig = field(default_factory=TrainConfig, metadata={"help": "Optimisation."})
    output_dir: str = opt("runs/run", "Where the adapter, checkpoints, metrics and manifest go.")
    overwrite: bool = opt(False, "Delete an existing output_dir that holds another run.")
    resume: Union[bool, str] = opt(  # noqa: UP007
        False, "false, 'auto' (continue from the latest checkpoint-N/ if any) or a checkpoint path.")
    allow_data_change: bool = opt(False, "Resume even when a data file's content changed since the run started "
                                         "(the run then trains on two datasets); off: such a resume is refused.")
    seed: int = opt(42, "Seed for data order, LoRA init and dropout.", ge=0)
    device: Literal["auto", "cpu", "cuda"] = opt("auto", "auto = cuda when available, else cpu.")
    report_to: list[Literal["tensorboard", "wandb", "mlflow", "trackio"]] = opt(
        [], "Also log every metric, under metrics.jsonl's names, to these trackers (each an extra: pip install "
            "'llmft[wandb]'); W&B online or offline as WANDB_MODE says, MLflow to MLFLOW_TRACKING_URI or a file "
            "store in output_dir/mlruns, trackio to its local database (docs/metrics.md#trackers).")
    report_project: str = opt("llmft", "The W&B and trackio project, the MLflow experiment; the run is named after "
                                       "output_dir.")
    tensorboard: bool = opt(False, "The same as report_to: [tensorboard] (kept for older configs).")


ANSWERS = "Greedy answers to held-out prompts during training, judged (eval.prompts; docs/metrics.md)."


@dataclass
class SFTConfig(RunConfig):
    output_dir: str = opt("runs/sft", "Where the adapter, checkpoints, metrics and manifest go.")
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "Dataset."})
    eval: AnswersConfig = field(default_factory=AnswersConfig, metadata={"help": ANSWERS})


@dataclass
class PreferenceDataConfig:
    train: Union[str, list[str]] = field(default=REQUIRED, metadata={  # noqa: UP007
        "help": "Preference data: {prompt, chosen, rejected[, margin]} or ranked {prompt, responses: "
                "[best, ..., worst]} rows in a .jsonl/.json/.parquet/.csv file or a hub dataset id, or a list "
                "of them (read in order)."})
    eval: Union[str, list[str], None] = opt(  # noqa: UP007
        None, "Held-out preference data (same forms as train); null = none, or see eval_fraction.")
    eval_fraction: float = opt(0.0, "Fraction of train held out for eval when `eval` is null.", ge=0, lt=1)
    split: str = opt("train", "Split to read from hub datasets.")
    format: Literal["auto", "pairs", "ranked"] = opt(
        "auto", "pairs = {prompt, chosen, rejected}, ranked = {prompt, responses}; auto detects it.")
    max_length: int = opt(1024, "Longest prompt + answer in tokens; longer pairs are dropped (and counted).",
                          ge=8)
    packing: bool = opt(False, "Run each micro-batch padding-free, each pair as [prompt | chosen | rejected] with the "
                               "prompt computed once (sdpa/eager attention; else each row packed on its own): the "
                               "same losses, no padding computed.")


@dataclass
class RewardLossConfig:
    type: Literal["bradley_terry", "hinge"] = opt(
        "bradley_terry", "bradley_terry: -log σ(r_c - r_r - m); hinge: max(0, m - (r_c - r_r)).")
    margin: float | None = opt(None, "m when a row has no 'margin' column; null = 0 for bradley_terry, 1 for hinge (a "
                                     "hinge at margin 0 is met by a constant model: refused).", ge=0)
    use_margin_column: bool = opt(True, "Use a row's 'margin' value as m when the data has one.")
    center_coef: float = opt(0.0, "Weight of the centering term mean((r_c + r_r)^2) that keeps rewards near 0 "
                                  "(0.01 is usual).", ge=0)


@dataclass
class RewardConfig(RunConfig):
    lora: LoraConfig = field(default_factory=lambda: LoraConfig(dropout=0.0),
                             metadata={"help": "LoRA adapter (dropout must stay 0: see loss)."})
    output_dir: str = opt("runs/reward", "Where the adapter, head, checkpoints, metrics and manifest go.")
    data: PreferenceDataConfig = field(default_factory=PreferenceDataConfig, metadata={"help": "Preferences."})
    loss: RewardLossConfig = field(default_factory=RewardLossConfig, metadata={"help": "Pairwise loss."})


@dataclass
class DPOLossConfig:
    type: Literal["sigmoid", "robust", "hinge", "ipo", "simpo", "orpo"] = opt(
        "sigmoid", "sigmoid = DPO (cDPO with label_smoothing > 0), robust, hinge, ipo; simpo and orpo need no "
                   "reference model.")
    beta: float = opt(0.1, "β: strength of the pull towards the reference (simpo: reward scale, ~2).", gt=0)
    label_smoothing: float = opt(0.0, "ε: assumed rate of flipped labels (sigmoid → cDPO, robust).", ge=0, lt=0.5)
    gamma: float = opt(0.5, "γ: SimPO's target reward margin.", ge=0)
    orpo_lambda: float = opt(0.1, "λ: weight of ORPO's odds-ratio term.", gt=0)
    sft_weight: float = opt(0.0, "α: adds α × the chosen answer's per-token NLL to the loss (RPO), which keeps "
                                 "the chosen log-probs from falling; 0 = off.", ge=0)
    precompute_reference: bool = opt(False, "Compute the reference log-probs once before training and reuse "
                                            "them every epoch (saves a forward per step after the first epoch).")


@dataclass
class DPOConfig(RunConfig):
    lora: LoraConfig = field(default_factory=lambda: LoraConfig(dropout=0.0),
                             metadata={"help": "LoRA adapter (dropout must stay 0: the policy starts equal to "
                                               "the reference)."})
    output_dir: str = opt("runs/dpo", "Where the adapter, checkpoints, metrics and manifest go.")
    data: PreferenceDataConfig = field(default_factory=PreferenceDataConfig, metadata={"help": "Preferences."})
    loss: DPOLossConfig = field(default_factory=DPOLossConfig, metadata={"help": "Preference objective."})
    eval: AnswersConfig = field(default_factory=AnswersConfig, metadata={"help": ANSWERS})


@dataclass
class LabelledDataConfig:
    train: Union[str, list[str]] = field(default=REQUIRED, metadata={  # noqa: UP007
        "help": "Labelled answers: {prompt, completion, label: true/false} rows (or a numeric 'rating' with "
                "rating_threshold), or preference pairs {prompt, chosen, rejected} (each a desirable and an "
                "undesirable answer), in a .jsonl/.json/.parquet/.csv file or a hub dataset id, or a list of them."})
    eval: Union[str, list[str], None] = opt(  # noqa: UP007
        None, "Held-out rows (same forms as train); null = none, or see eval_fraction.")
    eval_fraction: float = opt(0.0, "Fraction of train held out for eval when `eval` is null.", ge=0, lt=1)
    split: str = opt("train", "Split to read from hub datasets.")
    format: Literal["auto", "labelled", "pairs"] = opt(
        "auto", "labelled = {prompt, completion, label}, pairs = {prompt, chosen, rejected}; auto detects it.")
    rating_threshold: float | None = opt(None, "Rows with a numeric 'rating' instead of 'label': desirable when "
                                               "rating >= this (e.g. 4 on a 1-5 scale).")
    max_length: int = opt(1024, "Longest prompt + answer in tokens; longer answers are dropped (and counted).", ge=8)
    packing: bool = opt(False, "Run each micro-batch's rows as one padding-free sequence: the same losses, no "
                               "padding computed.")


@dataclass
class KTOLossConfig:
    beta: float = opt(0.1, "β: strength of the pull towards the reference.", gt=0)
    desirable_weight: float = opt(1.0, "λ_D: weight of desirable answers' losses.", gt=0)
    undesirable_weight: float = opt(1.0, "λ_U: weight of undesirable answers' losses (for imbalanced data, set "
                                         "λ_D n_D / (λ_U n_U) between 1 and 4/3).", gt=0)


@dataclass
class KTOConfig(RunConfig):
    lora: LoraConfig = field(default_factory=lambda: LoraConfig(dropout=0.0),
                             metadata={"help": "LoRA adapter (dropout must stay 0: the policy starts equal to "
                                               "the reference)."})
    output_dir: str = opt("runs/kto", "Where the adapter, checkpoints, metrics and manifest go.")
    data: LabelledDataConfig = field(default_factory=LabelledDataConfig, metadata={"help": "Labelled answers."})
    loss: KTOLossConfig = field(default_factory=KTOLossConfig, metadata={"help": "KTO objective."})
    eval: AnswersConfig = field(default_factory=AnswersConfig, metadata={"help": ANSWERS})


@dataclass
class PromptDataConfig:
    train: Union[str, list[str]] = field(default=REQUIRED, metadata={  # noqa: UP007
        "help": "Prompt rows: {prompt} or {messages: [...]}, plus the columns the reward judges read "
                "(e.g. 'constraints'); a .jsonl/.json/.parquet/.csv file or a hub dataset id, or a list of them."})
    eval: Union[str, list[str], None] = opt(  # noqa: UP007
        None, "Held-out prompt rows, answered greedily and scored at eval steps; null = none.")
    split: str = opt("train", "Split to read from hub datasets.")
    max_prompt_length: int = opt(512, "Longest prompt in tokens; longer prompts are dropped (and counted).", ge=1)


@dataclass
class RewardSourcesConfig:
    model: str | None = opt(None, "A reward model (an llmft reward output). Trained on the policy's own base "
                                  "weights it shares them; else it is loaded on its own.")
    model_weight: float = opt(1.0, "Weight of the reward model's score in the combined score.")
    judges: dict[str, float] = opt({}, "Program judges and their weights: constraints, substance, bleu, rouge_l, "
                                       "meteor, or module:function taking (prompts, answers, rows).")
    combine: Literal["sum", "min"] = opt(
        "sum", "How the sources' weighted scores make one: their sum, or their minimum (conservative: an answer "
               "scores as well as its weakest side, so gaming one source pays nothing).")
    reference_column: str = opt("completion", "Column with the reference text for bleu, rouge_l and meteor.")
    missing_eos_penalty: float = opt(1.0, "Subtracted from the score of an answer that never reaches a stop token "
                                          "(EOS or the chat template's turn end).", ge=0)
    normalize: bool = opt(False, "Normalise scores by the running mean and std of every score seen so far.")
    clip: float | None = opt(None, "Clip scores (after normalising) to ±clip; null = no clipping.", gt=0)


RL_SECTIONS = {  # the sections ppo and grpo share, declared once
    "env": (EnvConfig, "A multi-turn, tool-using environment (env.name); none = single-turn answers."),
    "alarm": (AlarmConfig, "The reward-hacking alarm (docs/metrics.md#the-alarm)."),
    "eval": (HeldOutConfig, "What the held-out answers (data.eval) are measured by.")}


def rl_section(name: str):
    cls, text = RL_SECTIONS[name]
    return field(default_factory=cls, metadata={"help": text})


@dataclass
class PPOConfig(RunConfig):
    lora: LoraConfig = field(default_factory=lambda: LoraConfig(dropout=0.0),
                             metadata={"help": "The policy's LoRA adapter (dropout must stay 0: ratios and KL "
                                               "compare outputs of the same network)."})
    output_dir: str = opt("runs/ppo", "Where the policy adapter, value adapter and head, checkpoints, metrics, "
                                      "samples and manifest go.")
    data: PromptDataConfig = field(default_factory=PromptDataConfig, metadata={"help": "Prompts."})
    rollout: RolloutConfig = field(default_factory=lambda: RolloutConfig(max_new_tokens=96, temperature=0.7),
                                    metadata={"help": "Sampling of the answers (temperature > 0)."})
    reward: RewardSourcesConfig = field(default_factory=RewardSourcesConfig,
                                        metadata={"help": "What scores an answer."})
    ppo: PPOAlgoConfig = field(default_factory=PPOAlgoConfig, metadata={"help": "The PPO update."})
    env: EnvConfig = rl_section("env")
    alarm: AlarmConfig = rl_section("alarm")
    eval: HeldOutConfig = rl_section("eval")
    samples_every: int = opt(10, "Write a few decoded samples with their scores to samples.jsonl every N steps.",
                             ge=1)


@dataclass
class GRPOConfig(RunConfig):
    lora: LoraConfig = field(default_factory=lambda: LoraConfig(dropout=0.0),
                             metadata={"help": "The policy's LoRA adapter (dropout must stay 0: ratios compare "
                                               "outputs of the same network)."})
    output_dir: str = opt("runs/grpo", "Where the policy adapter, checkpoints, metrics, samples and manifest go.")
    data: PromptDataConfig = field(default_factory=PromptDataConfig, metadata={"help": "Prompts."})
    rollout: RolloutConfig = field(default_factory=lambda: RolloutConfig(max_new_tokens=96, temperature=1.0),
                                    metadata={"help": "Sampling of the answers (temperature > 0)."})
    reward: RewardSourcesConfig = field(default_factory=RewardSourcesConfig,
                                        metadata={"help": "What scores an answer (judges, a reward model)."})
    grpo: GRPOAlgoConfig = field(default_factory=GRPOAlgoConfig, metadata={"help": "The GRPO-family update."})
    env: EnvConfig = rl_section("env")
    alarm: AlarmConfig = rl_section("alarm")
    eval: HeldOutConfig = rl_section("eval")
    samples_every: int = opt(10, "Write a few decoded samples with their scores to samples.jsonl every N steps.",
                             ge=1)


@dataclass
class EvalConfig:
    models: list[str] = opt([], "Policies to evaluate (any model source); the first is the baseline for win rates.")
    prompts: str | None = opt(None, "Held-out prompts: rows with 'prompt' (or 'messages') and what the judges need "
                                    "(required with models).")
    reference: str | None = opt(None, "Model to measure the KL against (mean summed log-ratio of the "
                                      "answers); null = no KL.")
    judges: list[str] = opt(["constraints"], "Judges: constraints, bleu, rouge_l, meteor, or module:function taking "
                                             "(prompts, answers, rows) and returning one score per answer.")
    reward_model: str | None = opt(None, "A reward model (llmft reward output): every policy's answers get its "
                                         "score (judge 'reward': mean and win rates).")
    preferences: str | None = opt(None, "Preference pairs to report the reward model's pairwise accuracy on.")
    reference_column: str = opt("completion", "Column with the reference text for bleu, rouge_l and meteor.")
    limit: int | None = opt(None, "Only the first N prompts.", ge=1)
    sampling: SamplingConfig = field(default_factory=SamplingConfig, metadata={"help": "Generation."})
    out: str | None = opt(None, "Write the JSON report (metrics, win rates, every answer) here.")
    device: Literal["auto", "cpu", "cuda"] = opt("auto", "auto = cuda when available, else cpu.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = opt("auto", "auto = bfloat16 on CUDA, else float32.")
    kernels: bool = opt(False, "Hub kernels for the models it loads (as model.kernels in a stage); off by default.")
    env: EnvConfig = field(default_factory=EnvConfig, metadata={
        "help": "A multi-turn environment (env.name, as in grpo): each prompt row becomes a whole conversation, "
                "scored by the environment (the judges are not used then; a reward_model is refused)."})


@dataclass
class GenerateConfig:
    """`llmft generate` takes these as command-line flags; they are validated like any config."""

    model: str = field(default=REQUIRED, metadata={"help": "Model source to generate with."})
    prompts: str = field(default=REQUIRED, metadata={"help": "Rows with 'prompt' (or 'messages')."})
    out: str | None = opt(None, "Write JSONL here; null = standard output.")
    limit: int | None = opt(None, "Only the first N prompts.", ge=1)
    sampling: SamplingConfig = field(default_factory=SamplingConfig, metadata={"help": "Generation."})
    device: Literal["auto", "cpu", "cuda"] = opt("auto", "auto = cuda when available, else cpu.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = opt("auto", "auto = bfloat16 on CUDA, else float32.")
    kernels: bool = opt(False, "Hub kernels for the models it loads (as model.kernels in a stage); off by default.")


STAGE_CONFIGS: dict[str, type] = {"sft": SFTConfig, "reward": RewardConfig, "dpo": DPOConfig, "kto": KTOConfig,
                                  "ppo": PPOConfig,
                                  "grpo": GRPOConfig, "eval": EvalConfig,
                                  "generate": GenerateConfig}

# Keys that do not change what a run computes: a resumed run may differ from the original in these.
RESUME_NEUTRAL_KEYS = {"resume", "overwrite", "allow_data_change", "tensorboard", "report_to", "report_project",
                       "train.log_every", "train.save_every", "train.keep_checkpoints"}


# ----------------------------------------------------------------------------------------------- loading
def load_config(stage: str, path: str | Path | None, overrides: list[str] = (), base: dict | None = None,
                schema: type | None = None) -> Any:
    """Read, override and validate the config of `stage` from the YAML file at `path` (or from `base`); `schema`: a
    config class defined outside this module (`llmft loop`'s)."""
    schema = schema or STAGE_CONFIGS[stage]
    raw = read_yaml(path) if path is not None else {}
    raw.update(base or {})
    where = str(path) if path is not None else "command line"
    for item in overrides:
        apply_override(raw, item, schema)
    cfg = build(schema, raw, where)
    for key in ("output_dir", "out"):  # `~` expands in what a run writes, as in what it reads
        if isinstance(getattr(cfg, key, None), str):
            setattr(cfg, key, os.path.expanduser(getattr(cfg, key)))
    return cfg
