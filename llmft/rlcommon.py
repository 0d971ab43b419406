"""What the RL stages (ppo, grpo) share around their algorithms: their prompts, the reward (a reward model sharing
the policy's base or loaded on its own, and program judges), sampling into an `Experience`, the sampler-vs-trainer
log-prob check, greedy evaluation, decoded samples, and the timing of phases."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from llmft import distributed, loop, quantization
from llmft.actor_critic import POLICY, ActorCritic
from llmft.chat import tokenizer_difference
from llmft.checkpoint import content_hash
from llmft.data import Record, read_all
from llmft.errors import ConfigError, DataError, ModelError, TrainingAborted
from llmft.generation import generate, prompt_messages
from llmft.loop import resolved_name
from llmft.modeling import add_lora, disable_dropout, load_model, load_tokenizer
from llmft.reward_model import RewardScorer
from llmft.rewards import Scorer
from llmft.rollout import Experience, chunks, pack, response_logps
from llmft.sources import resolve_source
from llmft.training import MetricsLog, console, require_dropout_off


@dataclass
class RLSetup(loop.Setup):
    scorer: Scorer | None = None
    share_reward: bool = False  # the reward checkpoint was trained on the policy's own base weights
    external_reward: RewardScorer | None = None  # the reward model when it cannot share the base


def build_model(s: RLSetup, critic: bool) -> ActorCritic:
    """The RL stages' model: a fresh policy adapter on the policy source, the reward model's adapter and head when
    it shares the base (else loaded on its own into s.external_reward), a value adapter and head with a critic,
    dropout off."""
    cfg = s.cfg
    lm = add_lora(load_model(s.source, s.dtype, s.device, cfg.model), cfg.lora, cfg.train.gradient_checkpointing)
    model = ActorCritic(lm, cfg.reward.model, s.share_reward, critic=critic)
    disable_dropout(model)
    if cfg.reward.model and not s.share_reward:
        console.print(f"[yellow]reward model {cfg.reward.model} was trained on other base weights: loading it "
                      f"separately (a second copy of the base in memory)")
        s.external_reward = RewardScorer.load(cfg.reward.model, cfg.device, cfg.model.dtype, cfg.train.batch_size)
    return model


def rl_stage(name: str, s: RLSetup, model: ActorCritic, rl_step, shown: tuple[str, ...],
             extra_state: Callable[[], dict] = dict, load_extra: Callable[[dict], None] = lambda state: None
             ) -> loop.Stage:
    """An RL stage for `loop.fit`: rl_step(prompt indices, update, step number) → (metrics with "episodes" and
    "tokens", samples rows); decoded samples go to samples.jsonl at step 1 and every cfg.samples_every steps. A
    checkpoint keeps the score normaliser's moments and whatever `extra_state` returns (`load_extra` restores
    it)."""
    samples: dict[str, MetricsLog] = {}

    def step(micro_batches: list[list[int]], ctx: loop.StepContext) -> tuple[dict, dict]:
        metrics, rows = rl_step(micro_batches[0], ctx.update, ctx.number)
        if ctx.number % s.cfg.samples_every == 0 or ctx.number == 1:
            for row in rows:
                samples["log"].log(ctx.number, row)
        return metrics, {"episodes": metrics.pop("episodes"), "tokens": metrics.pop("tokens")}

    def resume(state: dict | None) -> None:
        samples["log"] = MetricsLog(Path(s.cfg.output_dir), state["step"] if state else None, False,
                                    name="samples.jsonl")
        if state:
            s.scorer.moments = dataclasses.replace(s.scorer.moments, **state["score_moments"])
            load_extra(state)

    def state() -> dict:
        return {"score_moments": dataclasses.asdict(s.scorer.moments), **extra_state()}

    return loop.Stage(name, s.cfg, s.plan, s.device, step, (lambda: evaluate(model, s)) if s.eval else None,
                      shown=shown, state=state, resume=resume)


def rollout_seed(s: RLSetup, step: int, round_: int = 0) -> int:
    """The sampling seed of a step (and of a refill round in it) on this process: a pure function of them, so a
    resumed run samples what the uninterrupted one did."""
    cfg = s.cfg
    return (cfg.seed * 1_000_003 + cfg.rollout.seed * 1009 + step + 7_919 * round_
            + 100_000_007 * distributed.world().rank)


def reward_rollout_rows(t, s: RLSetup) -> None:
    """The plan table's rows for the reward sources and the sampling."""
    cfg, rm = s.cfg, s.cfg.reward.model
    roles = f"reward model {rm} ({'shares the base' if s.share_reward else 'own base'})" if rm else "no reward model"
    t.add_row("reward", f"{roles}; judges {dict(cfg.reward.judges) or 'none'}; "
                        f"no-stop penalty {cfg.reward.missing_eos_penalty}")
    t.add_row("rollout", f"temperature {cfg.rollout.temperature}, max_new_tokens {cfg.rollout.max_new_tokens}; "
                         f"stops at {stop_names(s.chat)}")


def check_sampling_config(cfg, stage: str) -> None:
    """What every RL stage refuses: dropout (ratios compare outputs of the same network), a new chat template (it
    belongs to the stage that starts from the base model), greedy or truncated sampling (the trainer's log-probs
    are those of softmax(z / T) over the whole vocabulary)."""
    require_dropout_off(cfg, stage, "ratios and KL compare outputs of the same network")
    if cfg.model.chat_template:
        raise ConfigError(f"model.chat_template: give a model its chat template in the stage that starts from it "
                          f"(usually sft); {stage} keeps the template of the policy it starts from")
    r = cfg.rollout
    if r.temperature <= 0:
        raise ConfigError(f"rollout.temperature must be > 0: {stage} samples its responses (0.7 to 1 is usual)")
    if r.top_p < 1 or r.top_k:
        raise ConfigError(f"rollout.top_p must be 1.0 and rollout.top_k 0 in {stage}: the trainer's log-probs are "
                          f"those of softmax(z / T) over the whole vocabulary, so the sampler must draw from exactly "
                          f"that")


def sample(model: ActorCritic, s: RLSetup, prompts: list[list[int]], seed: int) -> Experience:
    """One response to each prompt from the policy, with the sampler's own log-probs, packed on the device."""
    model.use(POLICY)
    sampling = dataclasses.replace(s.cfg.rollout, seed=seed)
    return pack(generate(model.lm, s.chat, prompts, sampling, logprobs=True), s.chat.pad_id, s.device)


@dataclass
class PromptSet:
    records: list[Record]
    ids: list[list[int]]  # chat-templated prompt token ids, ready to be answered
    too_long: int  # prompts dropped for exceeding data.max_prompt_length


def load_prompts(path: str | list[str], cfg, chat) -> PromptSet:
    records, ids, too_long = [], [], 0
    for r in read_all(path, cfg.data.split):
        p = chat.prompt_ids(prompt_messages(r), r.where)
        if len(p) > cfg.data.max_prompt_length:
            too_long += 1
            continue
        records.append(r)
        ids.append(p)
    if not ids:
        raise DataError(f"{path}: no prompt fits data.max_prompt_length={cfg.data.max_prompt_length} "
                        f"({too_long} longer)")
    return PromptSet(records, ids, too_long)


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
    same_base = rm.manifest["model"]["resolved"] == resolved_name(source) and (
        source.kind != "stage" or parent.get("sha256") == content_hash(source.path))
    return same_base and rm.manifest["model"].get("quantization") == quantization.record(cfg.model.quantization, dtype)


def stop_names(chat) -> str:
    return ", ".join(chat.tokenizer.convert_ids_to_tokens(i) for i in chat.stop_ids)


def score_rollout(model: ActorCritic, s: RLSetup, exp: Experience, rows: list[dict]):
    """Every source's scores and their total [B] (before normalisation), on the host."""
    model_scores = None
    if s.share_reward:
        model_scores = torch.cat([model.rewards(exp.input_ids[r], exp.attention_mask[r])
                                  for r in chunks(range(exp.size), s.cfg.train.batch_size)])
    elif s.external_reward:
        model_scores = s.external_reward.score_ids([g.prompt_ids + g.response_ids for g in exp.generations])
    prompts = [s.chat.decode(g.prompt_ids) for g in exp.generations]
    parts = s.scorer.parts(prompts, [g.text for g in exp.generations], rows, model_scores)
    finished = torch.tensor([g.finished for g in exp.generations])
    return parts, s.scorer.total(parts, finished)


def policy_logps(model: ActorCritic, s: RLSetup, exp: Experience, rows: list[int], with_entropy: bool = False):
    """log π(y_t) of the active role at the sampling temperature [b, R], and the entropy when asked."""
    return response_logps(model.lm, model.hidden, exp, rows, s.cfg.rollout.temperature, s.dtype, with_entropy)


def check_logprob_gap(s: RLSetup, exp: Experience, step: int, tolerance: float | None, key: str) -> tuple[float, float]:
    """The sampler's log-probs against the trainer's recomputation (largest and mean gap per token, over every
    process's answers); at step 1 a mean gap above the tolerance stops the run before any update: the trainer is
    not computing the distribution the responses were drawn from (soft-capping, a sampling processor,
    temperature, padding...). `key` names the tolerance's config key."""
    largest, summed, tokens = exp.logprob_gap()
    gap, gap_mean = distributed.maximum(largest), distributed.total(summed) / max(distributed.total(tokens), 1.0)
    tolerance = tolerance or default_gap_tolerance(s.device, s.dtype)
    if step == 1 and gap_mean > tolerance:
        raise TrainingAborted(f"step 1: the trainer's log-probs differ from the sampler's by {gap_mean:.3g} per token "
                              f"on average (largest {gap:.3g}; tolerance {tolerance:g}): the run would optimise "
                              f"another distribution than the one it samples. Report it with `llmft env`; {key} "
                              f"raises the limit")
    return gap, gap_mean


def default_gap_tolerance(device: torch.device, dtype: torch.dtype) -> float:
    """Exact fp32 on the CPU agrees to ~1e-6 per token; TF32 and 16-bit kernels on a GPU differ more."""
    return 1e-3 if device.type == "cpu" and dtype == torch.float32 else 0.05


# ----------------------------------------------------------------------------------------------- eval
@torch.no_grad()
def evaluate(model: ActorCritic, s: RLSetup) -> dict[str, float]:
    """Greedy answers to the held-out prompts, scored by the same sources (no penalty shaping, no KL)."""
    model.use(POLICY)
    sampling = dataclasses.replace(s.cfg.rollout, temperature=0.0)
    exp = pack(generate(model.lm, s.chat, s.eval.ids, sampling), s.chat.pad_id, s.device)
    parts, score = score_rollout(model, s, exp, [r.row for r in s.eval.records])
    out = {"eval/score": float(score.mean()), **{f"eval/score/{k}": float(v.mean()) for k, v in parts.items()},
           "eval/length": float(exp.lengths().mean()), "eval/no_eos": no_eos_share(exp)}
    if "constraints" in parts:
        out["eval/constraints/pass_rate"] = float((parts["constraints"] == 1.0).float().mean())
    model.train()
    return out


# ---------------------------------------------------------------------------------------------- utils
def sample_rows(exp: Experience, rows: list[dict], parts: dict, score: torch.Tensor, n: int = 4) -> list[dict]:
    return [{"prompt": prompt_messages(Record(row, "sample"))[-1]["content"], "response": g.text,
             "finished": g.finished, "score": float(score[i]), **{k: float(v[i]) for k, v in parts.items()}}
            for i, (row, g) in enumerate(zip(rows[:n], exp.generations[:n], strict=False))]


def no_eos_share(exp: Experience) -> float:
    return 1 - sum(g.finished for g in exp.generations) / exp.size


def token_weighted(parts: list[dict]) -> dict:
    """Micro-batch statistics → the minibatch's, each weighted by its micro-batch's "tokens" (all 0 when none)."""
    tokens = sum(p["tokens"] for p in parts)
    return {k: sum(p[k] * p["tokens"] for p in parts) / tokens if tokens else 0.0 for k in parts[0] if k != "tokens"}


def mean_of(stats: list[dict], key: str) -> float:
    return sum(st[key] for st in stats) / len(stats)


def check_finite(step: int, what: str, values: torch.Tensor) -> None:
    if distributed.any_rank(not bool(torch.isfinite(values).all())):  # every process stops together
        raise TrainingAborted(f"non-finite {what} at step {step} ({values.tolist()[:4]}...); stopped before "
                              f"updating the weights with it; the last checkpoint in the output_dir is kept")


@contextmanager
def phase(times: dict, name: str, device: torch.device):
    start = time.perf_counter()
    yield
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    times[name] = time.perf_counter() - start
