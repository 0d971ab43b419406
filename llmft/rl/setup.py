"""What the RL stages (ppo, grpo) set up before their loops: the model with its roles on one base, the reward
sources, the sampling (config checks, per-step seeds, one answer per prompt into an `Experience`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from llmft import distributed
from llmft.checkpoint import content_hash
from llmft.console import console
from llmft.data.chat import tokenizer_difference
from llmft.data.prompts import PromptSet, load_prompts
from llmft.errors import ConfigError, ModelError
from llmft.models import quantization
from llmft.models.adapters import add_lora, disable_dropout, require_dropout_off
from llmft.models.loading import load_model, load_tokenizer
from llmft.models.reward_model import RewardScorer
from llmft.models.sources import resolve_source
from llmft.rl.actor_critic import ActorCritic
from llmft.rl.engine import rollout_engine
from llmft.rl.held_out import check_watched
from llmft.rl.multi_turn import Conversations, check_env_config
from llmft.rl.scoring import Scorer
from llmft.run import loop
from llmft.run.held_out import make_judges


@dataclass
class RLSetup(loop.Setup):
    scorer: Scorer | None = None
    share_reward: bool = False  # the reward checkpoint was trained on the policy's own base weights
    external_reward: RewardScorer | None = None  # the reward model when it cannot share the base
    engine: Any = None  # rl.engine.HFEngine | VLLMPolicyEngine: what samples the answers (made by rl_stage)
    conversations: Any = None  # rl.multi_turn.Conversations: the environment of multi-turn rollouts (env.name)
    judges: dict = field(default_factory=dict)  # eval.judges: the held-out answers' independent judges

    def close(self) -> None:
        """The rollout engine ends with the run (vLLM: its process), not at the interpreter's exit."""
        if self.engine is not None:
            self.engine.close()


def prompt_sets(cfg, chat) -> tuple[Conversations | None, PromptSet, PromptSet | None]:
    """The environment (env.name; else None) and the training and held-out prompts: with an environment, each
    row's opening from its reset (the template's prefix self-test on the first)."""
    env = Conversations(cfg, chat) if cfg.env.name else None

    def load(path: str) -> PromptSet:
        if env:
            return env.prompts(path, cfg.data.split, cfg.data.max_prompt_length)
        return load_prompts(path, cfg, chat)

    return env, load(cfg.data.train), load(cfg.data.eval) if cfg.data.eval else None


def held_out_judges(cfg, evals: PromptSet | None) -> dict:
    """eval.judges, checked against every held-out row before anything loads."""
    if (cfg.eval.judges or cfg.eval.select_by) and not evals:
        raise ConfigError("eval.judges and eval.select_by need held-out answers: set data.eval (held-out prompts)")
    if cfg.eval.select_by:
        distributed.refuse_fsdp("eval.select_by", "the best policy is written by one process")
    sources = ["env"] if cfg.env.name else [*(["reward_model"] if cfg.reward.model else []), *cfg.reward.judges]
    check_watched(cfg, sources)
    return make_judges(cfg.eval, evals.records) if evals else {}


def build_model(s: RLSetup, critic: bool) -> ActorCritic:
    """The RL stages' model: a fresh policy adapter on the policy source, the reward model's adapter and head when
    it shares the base (else loaded on its own into s.external_reward), a value adapter and head with a critic,
    dropout off."""
    cfg = s.cfg
    lm = add_lora(load_model(s.source, s.dtype, s.device, cfg.model), cfg.lora, cfg.train.gradient_checkpointing)
    model = ActorCritic(lm, cfg.reward.model, s.share_reward, critic=critic)
    disable_dropout(model)
    s.engine = rollout_engine(s, model)
    if cfg.reward.model and not s.share_reward:
        console.print(f"[yellow]reward model {cfg.reward.model} was trained on other base weights: loading it "
                      f"separately (a second copy of the base in memory)")
        s.external_reward = RewardScorer.load(cfg.reward.model, cfg.device, cfg.model.dtype, cfg.train.batch_size)
    return model


def check_sampling_config(cfg, stage: str) -> None:
    """What every RL stage refuses: dropout (ratios compare outputs of the same network), a new chat template (it
    belongs to the stage that starts from the base model), greedy or truncated sampling (the trainer's log-probs
    are those of softmax(z / T) over the whole vocabulary)."""
    require_dropout_off(cfg, stage, "ratios and KL compare outputs of the same network")
    if cfg.env.name:
        check_env_config(cfg)
    if cfg.alarm.independent and not (cfg.data.eval and cfg.train.eval_every):
        raise ConfigError("alarm.independent names a held-out score (an eval/… metric, e.g. "
                          "eval/constraints/pass_rate): it needs data.eval (held-out prompts) and train.eval_every")
    if cfg.model.chat_template:
        raise ConfigError(f"model.chat_template: give a model its chat template in the stage that starts from it "
                          f"(usually sft); {stage} keeps the template of the policy it starts from")
    r = cfg.rollout
    if r.temperature <= 0:
        raise ConfigError(f"rollout.temperature must be > 0: {stage} samples its answers (0.7 to 1 is usual)")
    if r.top_p < 1 or r.top_k:
        raise ConfigError(f"rollout.top_p must be 1.0 and rollout.top_k 0 in {stage}: the trainer's log-probs are "
                          f"those of softmax(z / T) over the whole vocabulary, so the sampler must draw from exactly "
                          f"that")


def check_reward_model(cfg, source, chat, dtype: torch.dtype) -> bool:
    """Refuse a reward model that tokenizes or templates differently (it scores the policy's own token ids);
    return whether it was trained on the policy's own base weights, quantised alike (then all roles share one
    base)."""
    if not cfg.reward.model:
        return False
    rm = resolve_source(cfg.reward.model)
    if rm.kind != "stage" or rm.manifest.get("stage") != "reward":
        raise ModelError(f"reward.model {cfg.reward.model} is not a reward model (an llmft reward output)")
    if what := tokenizer_difference(load_tokenizer(rm), chat.tokenizer):
        raise ModelError(f"reward model {cfg.reward.model} has another {what} than policy {cfg.model.name}: it "
                         f"must score the policy's own tokens, so both need the same tokenizer and chat template")
    parent = rm.manifest.get("parent") or {}
    same_base = rm.manifest["model"]["resolved"] == source.resolved and (
        source.kind != "stage" or parent.get("sha256") == content_hash(source.path))
    return same_base and rm.manifest["model"].get("quantization") == quantization.record(cfg.model.quantization, dtype)


def stop_names(chat) -> str:
    return ", ".join(chat.tokenizer.convert_ids_to_tokens(i) for i in chat.stop_ids)


def reward_rollout_rows(t, s: RLSetup) -> None:
    """The plan table's rows for the reward sources and the sampling."""
    cfg, rm = s.cfg, s.cfg.reward.model
    roles = f"reward model {rm} ({'shares the base' if s.share_reward else 'own base'})" if rm else "no reward model"
    if s.conversations:
        env, tools = cfg.env, s.conversations.tools
        t.add_row("env", f"{env.name}: ≤ {env.max_turns} turns, ≤ {env.max_tokens} tokens after the opening; tools "
                         f"{', '.join(x['function']['name'] for x in tools) or 'none'} "
                         f"({s.conversations.format or 'no'} call format); on_error {env.on_error}")
    else:
        t.add_row("reward", f"{roles}; judges {dict(cfg.reward.judges) or 'none'}"
                  + ("; combined by their minimum" if cfg.reward.combine == "min" else ""))
    t.add_row("penalty", f"no stop id: −{cfg.reward.missing_eos_penalty}")
    t.add_row("rollout", f"temperature {cfg.rollout.temperature}, max_new_tokens {cfg.rollout.max_new_tokens}; "
                         f"stops at {stop_names(s.chat)}")
    t.add_row("engine", engine_row(cfg.rollout))


def engine_row(r) -> str:
    correction = f"; {r.correction} correction, cap {r.correction_cap}" if r.correction != "none" else ""
    if r.engine == "hf":
        return "hf: transformers' forward with llmft's sampler, in this process" + correction
    return ("vllm, in a process of its own; the policy's LoRA adapter reaches it before every rollout after an "
            "update, checked by a probe's log-probs" + correction)
