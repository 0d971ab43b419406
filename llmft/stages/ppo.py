"""Proximal policy optimisation (RLHF): optimise the policy against a reward, held near its start by a KL penalty.

    setup     → policy source (the SFT output, its adapter merged), prompts, reward sources, plan (a step = one
                rollout batch of train.batch_size × train.grad_accum × ppo.num_minibatches prompts)
    model     → ActorCritic on one base: policy adapter (new), value adapter + head (from the reward model),
                reward adapter + head (frozen), reference = every adapter off; dropout off
    step      → rollout    sample answers to left-padded prompts with the KV cache, cut at the first stop id;
                           the sampler's own log-probs come along                      → Experience (on the device)
                score      reward model + judges, − penalty without a stop id, [normalise, clip]     [B]
                forwards   old log-probs, reference log-probs, values, entropy                      [B, R]
                           (old vs the sampler's: `logprob_gap`, checked at step 1)
                advantage  r_t = −β·k1_t, + score at the last real token → GAE(γ, λ) → whiten        [B, R]
                           (env: each turn's reward at its last policy token; GAE over policy tokens only)
                update     ppo.epochs × shuffled minibatches: clipped policy loss + vf_coef · clipped value loss
    save      → the policy adapter at the top level (a policy for `llmft eval` or a later stage), value/ and
                value_head.safetensors for resuming; samples.jsonl holds decoded samples with their scores
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from llmft import distributed
from llmft.config import PPOConfig
from llmft.console import console
from llmft.errors import ConfigError
from llmft.maths.losses import ppo_policy_loss, ppo_value_loss
from llmft.maths.rl import KLController, explained_variance, gae, kl_per_token, shaped_rewards, turn_rewards, whiten
from llmft.models.loading import resolve_model
from llmft.rl import held_out
from llmft.rl import setup as rl_setup
from llmft.rl import stage as rl_stage
from llmft.rl.actor_critic import POLICY, REFERENCE, VALUE, ActorCritic
from llmft.rl.multi_turn import sample_trajectories, turn_tensors
from llmft.rl.scoring import Scorer
from llmft.rl.setup import (
    RLSetup,
    check_reward_model,
    check_sampling_config,
    held_out_judges,
    prompt_sets,
    reward_rollout_rows,
)
from llmft.rl.stage import (
    add_trajectories,
    check_finite,
    check_logprob_gap,
    correction_weights,
    mean_of,
    no_eos_share,
    phase,
    rollout_seed,
    sample,
    sample_rows,
    score_rollout,
    token_weighted,
)
from llmft.rollout.experience import Experience, answer_logps, value_estimates
from llmft.run.loop import Recipe, Stage, plan_table, run_stage
from llmft.run.plan import chunks, plan_steps


@dataclass
class Setup(RLSetup):
    kl: KLController | None = None


# --------------------------------------------------------------------------------------------- setup
def setup(cfg: PPOConfig) -> Setup:
    check_config(cfg)
    source, chat, device, dtype = resolve_model(cfg.model, cfg.device)
    env, train, evals = prompt_sets(cfg, chat)
    judges = held_out_judges(cfg, evals)
    share = check_reward_model(cfg, source, chat, dtype)
    scorer = Scorer(cfg.reward, train.records + (evals.records if evals else []), env=env is not None)
    per_step = rollout_size(cfg) * distributed.world().size  # each process samples its own share of a step
    if len(train.ids) < per_step:
        raise ConfigError(f"data.train has {len(train.ids)} prompts, fewer than one rollout batch ({per_step} = "
                          f"train.batch_size × train.grad_accum × ppo.num_minibatches × processes)")
    # only whole rollout batches: every process then runs the same minibatches (and collectives) every step
    plan = plan_steps(len(train.ids), per_step, 1, cfg.train.epochs, cfg.train.max_steps, cfg.seed, per_step)
    kl = KLController(cfg.ppo.kl_coef, cfg.ppo.kl_target, cfg.ppo.kl_horizon)
    return Setup(cfg, source, chat, train, evals, plan, device, dtype, scorer=scorer, share_reward=share,
                 conversations=env, judges=judges, kl=kl)


def check_config(cfg: PPOConfig) -> None:
    check_sampling_config(cfg, "ppo")
    if cfg.ppo.kl_estimator != "k1":
        raise ConfigError("ppo.kl_estimator: k3 is refused. As a per-token reward only k1 = log π − log π_ref gives "
                          "the gradient of KL(π‖ref); k3 there gives ∇KL(π‖ref) − ∇KL(ref‖π) (Shah et al. 2025, "
                          "arXiv 2512.21852)")
    if cfg.ppo.kl_target is not None and cfg.ppo.kl_coef == 0:
        raise ConfigError("ppo.kl_target (adaptive β) scales β up and down from ppo.kl_coef, so a β that starts "
                          "at 0 stays 0: set ppo.kl_coef > 0 (e.g. 0.05)")


def rollout_size(cfg: PPOConfig) -> int:
    """Prompts one process answers per step (one answer each)."""
    return cfg.train.batch_size * cfg.train.grad_accum * cfg.ppo.num_minibatches


def show_plan(s: Setup) -> None:
    cfg, t = s.cfg, plan_table("ppo", s)
    for name, ps in (("train", s.train), ("eval", s.eval)):
        if ps:
            t.add_row(f"{name} prompts", f"{len(ps.ids)} (dropped, longer than {cfg.data.max_prompt_length} "
                                         f"tokens: {ps.too_long})")
    tr, pp, procs = cfg.train, cfg.ppo, distributed.world().size
    per_step = rollout_size(cfg) * procs
    on_each = f" on each of {procs} processes" if procs > 1 else ""
    left = len(s.train.ids) % per_step
    t.add_row("steps", f"{s.plan.num_steps} rollouts of {per_step} prompts ({rollout_size(cfg)} per process); each: "
                       f"{pp.epochs} epochs × {pp.num_minibatches} minibatches of {tr.batch_size} × {tr.grad_accum} "
                       f"accumulation{on_each}" + (f"; {left} prompts per epoch left out (not a whole rollout "
                                                   f"batch)" if left else ""))
    kl = f"adaptive, target {pp.kl_target}" if pp.kl_target else "fixed"
    t.add_row("KL", f"k1 in the reward, β={pp.kl_coef} ({kl})")
    reward_rollout_rows(t, s)
    held_out.plan_row(t, s, per_step)
    console.print(t)


# --------------------------------------------------------------------------------------------- train
def run(cfg: PPOConfig, dry_run: bool = False) -> dict | None:
    """The `llmft ppo` command: returns the final metrics (None for a dry run or a finished run)."""
    return run_stage(cfg, RECIPE, dry_run)


def build_model(s: Setup) -> ActorCritic:
    return rl_setup.build_model(s, critic=True)


def stage(s: Setup, model: ActorCritic) -> Stage:
    def load_kl(state: dict) -> None:
        s.kl.value = state["kl_coef"]

    return rl_stage.rl_stage("ppo", s, model, functools.partial(ppo_step, model, s),
                             shown=("reward", "objective/kl", "completions/mean_length", "loss", "lr"),
                             extra_state=lambda: {"kl_coef": s.kl.value}, load_extra=load_kl)


# each minibatch statistic of `micro_update` → its logged name (TRL PPOTrainer's)
PPO_STATS = {"loss/policy_avg": "policy_loss", "loss/value_avg": "value_loss", "val/clipfrac_avg": "value_clipfrac",
             "policy/approxkl_avg": "approx_kl", "ratio": "ratio",
             **{f"clip_ratio/{k}_mean": f"clip_ratio/{k}" for k in ("low", "high", "region")}}  # as GRPO logs them


def ppo_step(model: ActorCritic, s: Setup, prompt_idx: list[int], update, step: int) -> tuple[dict, list[dict]]:
    cfg, times = s.cfg, {}
    rows = [s.train.records[i].row for i in prompt_idx]
    with phase(times, "generation", s.device):
        exp, parts, score, trajectories = rollout(model, s, prompt_idx, step)
    with phase(times, "scoring", s.device):
        check_finite(step, "score", score)
        exp.put(scores=s.scorer.shape(score))
    with phase(times, "forwards", s.device):
        role_forwards(model, s, exp)
        gap, gap_mean = check_logprob_gap(s, exp, step, cfg.ppo.logprob_gap_tolerance, "ppo.logprob_gap_tolerance")
    with phase(times, "advantages", s.device):
        kl = kl_per_token(exp.old_logps, exp.ref_logps) * exp.mask  # k1 [B, R]
        rewards = shaped_rewards(placed_scores(s, exp, trajectories), kl, exp.mask, s.kl.value)
        advantages, returns = gae(rewards, exp.values, exp.mask, cfg.ppo.gamma, cfg.ppo.lam)
        if cfg.ppo.whiten_advantages:
            advantages = whiten(advantages, exp.mask, global_sum=distributed.global_sum_tensor)  # global batch moments
        exp.put(advantages=advantages * correction_weights(s, exp, exp.old_logps), returns=returns)
    with phase(times, "update", s.device):
        stats = update_epochs(model, s, exp, update, step)
    seq_kl = kl.sum(-1)  # [B] k1, summed per answer
    # TRL's names where TRL logs the same quantity (its PPOTrainer's, or its GRPOTrainer's): docs/metrics.md
    metrics = {
        "loss": mean_of(stats, "loss"), "reward": float(score.mean()),
        **{f"rewards/{name}/mean": float(v.mean()) for name, v in parts.items()}, **s.scorer.range_metrics(parts),
        "objective/rlhf_reward": float((exp.scores - s.kl.value * seq_kl).mean()), "objective/kl": float(seq_kl.mean()),
        "kl_coef": s.kl.value, "entropy": float((exp.entropy * exp.mask).sum() / exp.mask.sum()),
        "completions/mean_length": float(exp.lengths().mean()), "completions/clipped_ratio": no_eos_share(exp),
        **{name: mean_of(stats, key) for name, key in PPO_STATS.items()},
        "grad_norm": stats[-1]["grad_norm"],
        "val/explained_variance": explained_variance(exp.values, returns, exp.mask),
        "logprob_gap": gap, "logprob_gap_mean": gap_mean,
        **{f"time/{k}": v for k, v in times.items()},
        "episodes": exp.size, "tokens": int(exp.attention_mask.sum()),
    }
    n = distributed.global_sum(len(prompt_idx))
    s.kl.update(distributed.global_sum(float(seq_kl.sum())) / n, n)
    samples = sample_rows(exp, rows, parts, score)
    if trajectories:
        add_trajectories(metrics, samples, trajectories)
    return metrics, samples


# ------------------------------------------------------------------------------------------- rollout
def rollout(model: ActorCritic, s: Setup, prompt_idx: list[int], step: int):
    """One answer to each prompt (with an environment: one trajectory), scored: (Experience, each source's scores
    {name: [B]}, their combined score [B], the trajectories or None)."""
    seed = rollout_seed(s, step)
    if s.conversations:
        return sample_trajectories(s.conversations, model, s, [s.train.records[i] for i in prompt_idx], seed)
    exp = sample(model, s, [s.train.ids[i] for i in prompt_idx], seed)
    parts, score = score_rollout(model, s, exp, [s.train.records[i].row for i in prompt_idx])
    return exp, parts, score, None


def placed_scores(s: Setup, exp: Experience, trajectories) -> torch.Tensor:
    """The optimised scores as PPO's reward sees them: [B], at each answer's last token; multi-turn [B, R], each
    turn's reward at its last policy token (`maths.rl.turn_rewards`)."""
    if not trajectories:
        return exp.scores
    turn_scores, ends = turn_tensors(trajectories)
    return turn_rewards(turn_scores.to(exp.device), ends.to(exp.device), exp.scores, s.scorer.scale,
                        exp.mask.shape[1])


# ------------------------------------------------------------------------------------------ forwards
@torch.no_grad()
def role_forwards(model: ActorCritic, s: Setup, exp: Experience) -> None:
    """Old log-probs, entropy, reference log-probs and values of the experience, each [B, R] fp32."""
    out = {"old_logps": [], "entropy": [], "ref_logps": [], "values": []}
    for idx in chunks(range(exp.size), s.cfg.train.batch_size):
        with model.role(POLICY):
            logps, entropy = answer_logps(model.lm, model.hidden, exp, idx, s.cfg.rollout.temperature, s.dtype,
                                            with_entropy=True)
        with model.role(REFERENCE):
            ref, _ = answer_logps(model.lm, model.hidden, exp, idx, s.cfg.rollout.temperature, s.dtype)
        with model.role(VALUE):
            values = value_estimates(model.values, model.hidden, exp, idx, s.dtype)
        for key, t in zip(out, (logps, entropy, ref, values), strict=True):
            out[key].append(t)
    exp.put(**{key: torch.cat(ts) for key, ts in out.items()})


# -------------------------------------------------------------------------------------------- update
def update_epochs(model: ActorCritic, s: Setup, exp: Experience, update, step: int) -> list[dict]:
    """ppo.epochs passes over the experience in shuffled minibatches; one optimizer step per minibatch.
    Returns each minibatch's statistics, in order."""
    cfg, n = s.cfg, exp.size
    mb_size = n // cfg.ppo.num_minibatches  # whole rollout batches: the same on every process
    model.train()
    stats = []
    for epoch in range(cfg.ppo.epochs):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed + 7919 * step + epoch))
        for minibatch in chunks(order.tolist(), mb_size):
            num_tokens = distributed.global_sum(float(exp.mask[minibatch].sum()))  # the losses' token mean is global
            parts = [micro_update(model, s, exp, idx, num_tokens) for idx in chunks(minibatch, cfg.train.batch_size)]
            mb = token_weighted(parts)  # this process's statistics; the loop averages them over processes
            mb["loss"] = sum(p["loss"] for p in parts)  # this process's share of the global loss
            mb["grad_norm"] = update(mb["loss"])
            stats.append(mb)
    return stats


def micro_update(model: ActorCritic, s: Setup, exp: Experience, idx: list[int], num_tokens) -> dict:
    """Forward and backward of one micro-batch: the policy loss under the policy adapter, then vf_coef × the value
    loss under the value adapter (each backward inside its role), each its share of the minibatch's token mean."""
    mask, pp = exp.mask[idx], s.cfg.ppo
    with model.role(POLICY):
        logps, _ = answer_logps(model.lm, model.hidden, exp, idx, s.cfg.rollout.temperature, s.dtype)
        policy_loss, st = ppo_policy_loss(logps, exp.old_logps[idx], exp.advantages[idx], mask, num_tokens,
                                          pp.clip_range)
        policy_loss.backward()
    with model.role(VALUE):
        values = value_estimates(model.values, model.hidden, exp, idx, s.dtype)
        value_loss, value_clipfrac = ppo_value_loss(values, exp.values[idx], exp.returns[idx], mask, num_tokens,
                                                    pp.value_clip_range)
        (pp.vf_coef * value_loss).backward()
    policy_loss, value_loss = policy_loss.item(), value_loss.item()
    share = float(mask.sum()) / float(num_tokens)  # this micro-batch's losses are already divided by num_tokens
    return {"loss": policy_loss + pp.vf_coef * value_loss, "tokens": float(mask.sum()),
            "policy_loss": policy_loss / share if share else 0.0, "value_loss": value_loss / share if share else 0.0,
            **{k: st[k] for k in ("clip_ratio/low", "clip_ratio/high", "clip_ratio/region", "approx_kl")},
            "value_clipfrac": value_clipfrac,
            "ratio": st["ratio"]}


RECIPE = Recipe("ppo", setup, show_plan, build_model, stage)
