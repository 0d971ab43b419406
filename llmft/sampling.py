"""How answers are generated: the sampling options every generating command shares (`sampling:` of eval and
generate, `rollout:` of ppo and grpo), the rollout engine that does it, and the RL stages' importance correction."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from llmft.schema import opt


@dataclass
class VLLMConfig:
    python: str | None = opt(None, "The interpreter of an environment with vLLM; null = $LLMFT_VLLM_PYTHON, this one "
                                   "when it has vLLM, or the .venv-vllm that scripts/setup_vllm.sh makes.")
    kv_cache_gb: float = opt(1.0, "CPU: memory for the engine's KV cache, in GiB.", gt=0)
    gpu_memory_utilization: float = opt(0.3, "CUDA: the share of the GPU's memory the engine may take (weights and "
                                             "KV cache); training has the rest.", gt=0, le=1)
    sync: Literal["merged", "adapter"] = opt(
        "merged", "How the policy reaches the engine after each update: merged (the base's weights plus the adapter's "
                  "s·B·A, reloaded in place in the engine's full-precision copy: vLLM's plain kernels, 3× faster than "
                  "its LoRA path on a CPU) or adapter (loaded as a LoRA adapter; the engine's base untouched).")
    sleep: bool = opt(True, "CUDA: the engine sleeps while training runs (weights to host memory, KV cache freed).")
    enforce_eager: bool = opt(True, "No torch.compile / CUDA graphs in the engine: a start in seconds rather than "
                                    "minutes; false for long runs on a GPU.")


@dataclass
class SamplingConfig:
    max_new_tokens: int = opt(128, "Longest answer, in new tokens.", ge=1)
    temperature: float = opt(0.0, "Sampling temperature; 0 = greedy.", ge=0)
    top_p: float = opt(1.0, "Nucleus sampling mass.", gt=0, le=1)
    top_k: int = opt(0, "Top-k sampling; 0 = off.", ge=0)
    seed: int = opt(0, "Sampling seed.", ge=0)
    batch_size: int = opt(16, "Sequences per generation batch (in grpo, each of a prompt's G answers counts "
                              "as one).", ge=1)
    draw: Literal["inverse_cdf", "multinomial"] = opt(
        "inverse_cdf", "How a sampled token is drawn: inverse_cdf (llmft's, one uniform per row; 40x faster over a "
                       "49k vocabulary on a CPU) or multinomial (torch.multinomial on the global seed, as "
                       "transformers samples: reproduces samples made that way). The same distribution either way.")
    engine: Literal["hf", "vllm"] = opt(
        "hf", "What generates: hf (transformers' forward with llmft's sampler, in this process) or vllm (vLLM in a "
              "process of its own on this machine: docs/rollout.md). The same sampling either way.")
    vllm: VLLMConfig = field(default_factory=lambda: VLLMConfig(), metadata={"help": "The vLLM engine (engine: vllm)."})


@dataclass
class RolloutConfig(SamplingConfig):
    correction: Literal["none", "tis", "mis"] = opt(
        "none", "Importance correction for the sampler's distribution differing from the trainer's: tis weighs each "
                "token's policy loss by min(π_trainer / π_sampler, correction_cap) (truncated importance sampling), "
                "mis drops the tokens whose ratio exceeds the cap (masked); none when the log-prob gap is within "
                "tolerance (with a correction on, a step-1 gap above it warns instead of stopping).")
    correction_cap: float = opt(2.0, "C of tis / mis.", gt=0)


@dataclass
class EnvConfig:
    name: str | None = opt(None, "module:Class of a multi-turn environment (docs/environments.md): each trajectory "
                                 "is a conversation in which the policy's turns alternate with what the environment "
                                 "and its tools return, scored by the environment; null = single-turn answers "
                                 "scored by reward.")
    args: dict[str, Any] = opt({}, "Keyword arguments the class is made with, one instance per trajectory.")
    max_turns: int = opt(4, "Policy turns per trajectory at most.", ge=1)
    max_tokens: int = opt(512, "Tokens per trajectory after its opening messages at most, the policy's and the "
                               "environment's; a trajectory over it is cut (counted, and penalised as an answer "
                               "without a stop id).", ge=1)
    timeout: float = opt(10.0, "Seconds a call of reset, step or a tool may take; 0 = no limit.", ge=0)
    on_error: Literal["raise", "zero"] = opt(
        "raise", "An environment that raises, times out or breaks the protocol: stop with one error naming the row "
                 "(raise), or end that trajectory with reward 0 and count it (zero). A tool's failure is never this: "
                 "its error message is the tool's result, read by the model, and counted.")
