"""Critic-free RL: GRPO and its family (Dr. GRPO, DAPO, GSPO, RLOO), on the rollout core PPO uses.

    setup     → policy source (the SFT output, its adapter merged), prompts, reward sources, plan (a step = the prompts
                whose G answers each make train.batch_size × train.grad_accum × grpo.num_minibatches answers per
                process; groups never span processes)
    model     → one base: the policy adapter (new), the reward model's adapter and head when it shares the base
                (frozen), the reference = every adapter off; no critic; dropout off
    step      → rollout     G answers to each prompt in one batched generation, cut at the first stop id, with the
                            sampler's own log-probs                                         → Experience [B = P·G]
                score       judges and/or reward model, − penalty without a stop id [, normalise, clip]      [B]
                            dynamic sampling: groups that all scored the same are skipped, or refilled with
                            groups of fresh prompts
                advantage   group-relative (r − mean_g) / scale, or leave-one-out (RLOO); the same A_i on every
                            token of answer i                                                               [B, R]
                forwards    old log-probs (only when μ > 1 or several minibatches), reference log-probs (only
                            when β > 0)
                update      μ passes × shuffled minibatches: the clipped surrogate (ε_low, ε_high), per token or
                            per sequence, + β·k3, aggregated per token / per answer / by a constant
    save      → the policy adapter at the top level (a policy for `llmft eval` or a later stage); samples.jsonl
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from llmft import distributed
from llmft.config import GRPOConfig
from llmft.console import console
from llmft.errors import ConfigError
from llmft.maths.losses import grpo_policy_loss
from llmft.maths.rl import group_advantages, masked_var, rloo_advantages, zero_std_groups
from llmft.models.loading import resolve_model
from llmft.rl import held_out
from llmft.rl import setup as rl_setup
from llmft.rl import stage as rl_stage
from llmft.rl.actor_critic import POLICY, REFERENCE, ActorCritic
from llmft.rl.multi_turn import sample_trajectories
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
    phase,
    rollout_seed,
    sample,
    sample_rows,
    score_rollout,
    token_weighted,
)
from llmft.rollout.experience import Experience, answer_logps, pack
from llmft.rollout.generation import Answer
from llmft.run.loop import Recipe, Stage, plan_table, run_stage
from llmft.run.plan import chunks, plan_steps


@dataclass
class Group:
    """The answers to one prompt, scored."""

    prompt: int  # index into the training prompts
    answers: list[Answer]  # G
    parts: dict[str, torch.Tensor]  # each source's scores [G]
    scores: torch.Tensor  # [G] their combined score (before normalising)
    trajectories: list | None = None  # multi-turn: the G conversations (`rl.multi_turn.Trajectory`)


# --------------------------------------------------------------------------------------------- setup
def setup(cfg: GRPOConfig) -> RLSetup:
    check_config(cfg)
    source, chat, device, dtype = resolve_model(cfg.model, cfg.device)
    env, train, evals = prompt_sets(cfg, chat)
    judges = held_out_judges(cfg, evals)
    share = check_reward_model(cfg, source, chat, dtype)
    scorer = Scorer(cfg.reward, train.records + (evals.records if evals else []), env=env is not None)
    per_step = prompts_per_process(cfg) * distributed.world().size
    if len(train.ids) < per_step:
        raise ConfigError(f"data.train has {len(train.ids)} prompts, fewer than one step's {per_step} (answers per "
                          f"process / grpo.num_generations × processes)")
    plan = plan_steps(len(train.ids), per_step, 1, cfg.train.epochs, cfg.train.max_steps, cfg.seed, per_step)
    return RLSetup(cfg, source, chat, train, evals, plan, device, dtype, scorer=scorer, share_reward=share,
                   conversations=env, judges=judges)


def check_config(cfg: GRPOConfig) -> None:
    check_sampling_config(cfg, "grpo")
    G, answers = cfg.grpo.num_generations, answers_per_process(cfg)
    if answers % G:
        raise ConfigError(f"train.batch_size × train.grad_accum × grpo.num_minibatches = {answers} answers per "
                          f"process per step is not a whole number of groups of grpo.num_generations = {G}: make "
                          f"it a multiple of {G}")
    if cfg.grpo.advantage == "rloo" and cfg.grpo.scale_rewards != "group":
        raise ConfigError("grpo.scale_rewards applies to advantage: group; rloo's advantages are not scaled")
    if cfg.grpo.importance_sampling == "sequence" and cfg.grpo.loss_aggregation != "sequence_mean":
        console.print(f"[yellow]grpo.importance_sampling: sequence with loss_aggregation: "
                      f"{cfg.grpo.loss_aggregation} weighs each answer's one ratio by its length; GSPO averages "
                      f"per answer (loss_aggregation: sequence_mean)")


def answers_per_process(cfg: GRPOConfig) -> int:
    return cfg.train.batch_size * cfg.train.grad_accum * cfg.grpo.num_minibatches


def prompts_per_process(cfg: GRPOConfig) -> int:
    return answers_per_process(cfg) // cfg.grpo.num_generations


def show_plan(s: RLSetup) -> None:
    cfg, algo, t = s.cfg, s.cfg.grpo, plan_table("grpo", s)
    for name, ps in (("train", s.train), ("eval", s.eval)):
        if ps:
            t.add_row(f"{name} prompts", f"{len(ps.ids)} (dropped, longer than {cfg.data.max_prompt_length} "
                                         f"tokens: {ps.too_long})")
    procs = distributed.world().size
    per_step = prompts_per_process(cfg) * procs
    left = len(s.train.ids) % per_step
    t.add_row("steps", f"{s.plan.num_steps} rollouts of {per_step} prompts × {algo.num_generations} answers "
                       f"({answers_per_process(cfg)} answers per process); each: {algo.iterations} passes × "
                       f"{algo.num_minibatches} minibatches" + (f"; {left} prompts per epoch left out" if left else ""))
    scale = f"scaled by {algo.scale_rewards} std" if algo.advantage == "group" else "leave-one-out"
    t.add_row("update", f"{algo.advantage} advantage ({scale}); clip [1 − {algo.epsilon_low}, "
                        f"1 + {algo.epsilon_high}] per {algo.importance_sampling}; {algo.loss_aggregation}; "
                        f"β {algo.beta}; dynamic sampling {algo.dynamic_sampling}")
    reward_rollout_rows(t, s)
    held_out.plan_row(t, s, answers_per_process(cfg) * procs)
    console.print(t)


# --------------------------------------------------------------------------------------------- train
def run(cfg: GRPOConfig, dry_run: bool = False) -> dict | None:
    """The `llmft grpo` command: returns the final metrics (None for a dry run or a finished run)."""
    return run_stage(cfg, RECIPE, dry_run)


def build_model(s: RLSetup) -> ActorCritic:
    return rl_setup.build_model(s, critic=False)


def stage(s: RLSetup, model: ActorCritic) -> Stage:
    return rl_stage.rl_stage("grpo", s, model, functools.partial(grpo_step, model, s),
                             shown=("reward", "frac_reward_zero_std", "completions/mean_length", "loss", "lr"))


def grpo_step(model: ActorCritic, s: RLSetup, prompt_idx: list[int], update, step: int) -> tuple[dict, list[dict]]:
    cfg, algo, times = s.cfg, s.cfg.grpo, {}
    with phase(times, "generation", s.device):
        groups, refilled = rollout(model, s, prompt_idx, step)
        exp = pack([a for grp in groups for a in grp.answers], s.chat.pad_id, s.device)
    with phase(times, "scoring", s.device):
        score = torch.cat([grp.scores for grp in groups])  # [B]
        check_finite(step, "score", score)
        exp.put(scores=s.scorer.shape(score))
        zero = zero_std_groups(exp.scores.cpu(), algo.num_generations)  # [B / G]
    with phase(times, "advantages", s.device):
        exp.put(advantages=advantages(exp.scores, cfg)[:, None] * exp.mask)  # [B, R]
    kept = kept_answers(zero, s)  # [B]
    with phase(times, "forwards", s.device):
        role_forwards(model, s, exp)
    with phase(times, "update", s.device):
        stats, gap = update_passes(model, s, exp, kept, update, step)
    metrics = step_metrics(s, exp, groups, score, zero, kept, stats, times)
    metrics.update(logprob_gap=gap[0], logprob_gap_mean=gap[1])
    rows = [s.train.records[grp.prompt].row for grp in groups for _ in grp.answers]
    samples = sample_rows(exp, rows, {k: torch.cat([grp.parts[k] for grp in groups]) for k in groups[0].parts}, score)
    if s.conversations:
        add_trajectories(metrics, samples, [t for grp in groups for t in grp.trajectories])
    return {**metrics, "refilled_groups": distributed.global_sum(refilled)}, samples


def kept_answers(zero: torch.Tensor, s: RLSetup) -> torch.Tensor:
    """[B] bool: the answers the loss sees. With dynamic sampling, the groups that all scored the same (after any
    refills) are masked out; their answers still run every forward, so that all processes run the same ones."""
    keep = ~zero if s.cfg.grpo.dynamic_sampling != "off" else torch.ones_like(zero)
    return keep.repeat_interleave(s.cfg.grpo.num_generations)


# ------------------------------------------------------------------------------------------- rollout
def rollout(model: ActorCritic, s: RLSetup, prompt_idx: list[int], step: int) -> tuple[list[Group], int]:
    """G scored answers to each prompt; with dynamic sampling "refill", the groups that all scored the same are
    replaced by groups of fresh prompts, for up to grpo.max_refills rounds (every process runs as many rounds and
    samples as many prompts as the one that needs most: sampling is collective under FSDP). Returns the groups and
    how many were replaced (fresh prompts are drawn at random from the training set, with replacement). Groups
    still flat after the last round are masked out of the loss (`kept_answers`)."""
    algo = s.cfg.grpo
    groups = sample_groups(model, s, prompt_idx, rollout_seed(s, step))
    refilled = 0
    for round_ in range(1, algo.max_refills + 1 if algo.dynamic_sampling == "refill" else 1):
        flat = [i for i, grp in enumerate(groups) if bool(zero_std_groups(grp.scores, len(grp.scores))[0])]
        need = int(distributed.global_max(len(flat)))
        if need == 0:
            break
        draw = torch.Generator().manual_seed(rollout_seed(s, step, round_))
        fresh = sample_groups(model, s, torch.randint(len(s.train.ids), (need,), generator=draw).tolist(),
                              rollout_seed(s, step, round_))
        for i, new in zip(flat, fresh, strict=False):
            groups[i] = new
            refilled += 1
    return groups, refilled


def sample_groups(model: ActorCritic, s: RLSetup, prompt_idx: list[int], seed_: int) -> list[Group]:
    G, trajectories = s.cfg.grpo.num_generations, None
    if s.conversations:  # multi-turn: each answer is a whole conversation with the environment
        exp, parts, scores, trajectories = sample_trajectories(
            s.conversations, model, s, [s.train.records[i] for i in prompt_idx for _ in range(G)], seed_)
    else:
        exp = sample(model, s, [s.train.ids[i] for i in prompt_idx for _ in range(G)], seed_)
        parts, scores = score_rollout(model, s, exp, [s.train.records[i].row for i in prompt_idx for _ in range(G)])
    return [Group(p, exp.answers[k * G:(k + 1) * G], {n: v[k * G:(k + 1) * G] for n, v in parts.items()},
                  scores[k * G:(k + 1) * G], trajectories[k * G:(k + 1) * G] if trajectories else None)
            for k, p in enumerate(prompt_idx)]


def advantages(scores: torch.Tensor, cfg: GRPOConfig) -> torch.Tensor:
    """Each answer's advantage [B] from the scores [B] of consecutive groups."""
    algo = cfg.grpo
    if algo.advantage == "rloo":
        return rloo_advantages(scores, algo.num_generations)
    return group_advantages(scores, algo.num_generations, algo.scale_rewards, global_sum=distributed.global_sum_tensor)


# ------------------------------------------------------------------------------------------ forwards
@torch.no_grad()
def role_forwards(model: ActorCritic, s: RLSetup, exp: Experience) -> None:
    """The old log-probs, when the update needs them (μ > 1 or several minibatches: else the ratio is exactly 1
    and the update's own forward gives them), and the reference log-probs when β > 0."""
    algo = s.cfg.grpo
    need_old, need_ref = algo.iterations > 1 or algo.num_minibatches > 1, algo.beta > 0
    for role, key, needed in ((POLICY, "old_logps", need_old), (REFERENCE, "ref_logps", need_ref)):
        if needed:
            with model.role(role):
                exp.put(**{key: torch.cat([
                    answer_logps(model.lm, model.hidden, exp, idx, s.cfg.rollout.temperature, s.dtype)[0]
                    for idx in chunks(range(exp.size), s.cfg.train.batch_size)])})


# -------------------------------------------------------------------------------------------- update
def update_passes(model: ActorCritic, s: RLSetup, exp: Experience, kept: torch.Tensor, update,
                  step: int) -> tuple[list[dict], tuple[float, float]]:
    """grpo.iterations passes over the answers in shuffled minibatches, one optimizer step each; the answers not
    kept weigh 0 in the loss. Every process takes the same steps; a minibatch whose loss has no term on any
    process takes none. The sampler-vs-trainer check runs before the first step. Returns each minibatch's stats
    and the log-prob gap (largest, mean)."""
    algo, n = s.cfg.grpo, exp.size
    loss_mask = exp.mask * kept.to(exp.device, exp.mask.dtype)[:, None]  # [B, R]
    own_old = exp.old_logps is None  # μ = 1, one minibatch: the update's own forward is π_old (ratio exactly 1)
    if own_old:
        exp.old_logps = torch.zeros_like(exp.mask)
    else:
        gap = gap_check(s, exp, step)
    model.train()
    stats = []
    for it in range(algo.iterations):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(s.cfg.seed + 7919 * step + it)).tolist()
        for minibatch in chunks(order, n // algo.num_minibatches):
            normaliser = distributed.global_sum(loss_normaliser(s, loss_mask, minibatch))
            parts = [micro_update(model, s, exp, loss_mask, idx, normaliser, it == 0, own_old)
                     for idx in chunks(minibatch, s.cfg.train.batch_size)]
            if own_old and it == 0:  # every answer's π_old is in (one minibatch); no weight has moved yet
                gap = gap_check(s, exp, step)
            stat = token_weighted(parts)
            stat["loss"] = sum(p["loss"] for p in parts)
            stat["grad_norm"] = update(stat["loss"]) if normaliser else 0.0  # no term anywhere: no step
            stats.append(stat)
    return stats, gap


def gap_check(s: RLSetup, exp: Experience, step: int) -> tuple[float, float]:
    return check_logprob_gap(s, exp, step, s.cfg.grpo.logprob_gap_tolerance, "grpo.logprob_gap_tolerance")


def loss_normaliser(s: RLSetup, loss_mask: torch.Tensor, idx: list[int]) -> float:
    """This process's part of the minibatch's denominator for grpo.loss_aggregation: its kept tokens (token_mean),
    its kept answers (sequence_mean), or all its answers × rollout.max_new_tokens (constant: the same whatever
    the answers)."""
    agg = s.cfg.grpo.loss_aggregation
    if agg == "token_mean":
        return float(loss_mask[idx].sum())
    if agg == "sequence_mean":
        return float((loss_mask[idx].sum(-1) > 0).sum())
    return float(len(idx) * (s.cfg.env.max_tokens if s.conversations else s.cfg.rollout.max_new_tokens))


def micro_update(model: ActorCritic, s: RLSetup, exp: Experience, loss_mask: torch.Tensor, idx: list[int],
                 normaliser: float, first_pass: bool, own_old: bool) -> dict:
    """Forward and backward of one micro-batch under the policy adapter: its share of the minibatch's loss (0 and
    no backward when no process has a term in it); statistics over its kept tokens, the entropy in the first
    pass only."""
    algo, mask = s.cfg.grpo, loss_mask[idx]
    with model.role(POLICY):
        logps, entropy = answer_logps(model.lm, model.hidden, exp, idx, s.cfg.rollout.temperature, s.dtype,
                                        with_entropy=first_pass)
        if own_old:  # π_old = π_θ before this update: the ratio is exactly 1
            exp.old_logps[idx] = logps.detach()
        advantages = exp.advantages[idx] * correction_weights(s, exp, exp.old_logps, idx)  # [b, R]
        loss, st = grpo_policy_loss(logps, exp.old_logps[idx], advantages, mask, max(normaliser, 1.0),
                                    algo.epsilon_low, algo.epsilon_high, algo.importance_sampling,
                                    algo.loss_aggregation, exp.ref_logps[idx] if algo.beta else None, algo.beta)
        if normaliser:
            loss.backward()
    tokens = float(mask.sum())
    if first_pass:
        st["entropy"] = float((entropy * mask).sum() / max(tokens, 1.0))
    return {"loss": loss.item() if normaliser else 0.0, "tokens": tokens, **st}


# ------------------------------------------------------------------------------------------- metrics
def step_metrics(s: RLSetup, exp: Experience, groups: list[Group], score: torch.Tensor, zero: torch.Tensor,
                 kept: torch.Tensor, stats: list[dict], times: dict) -> dict:
    """The step's figures under the names TRL's GRPOTrainer logs; the same keys at every step and on every
    process (0 where a step had nothing to measure)."""
    lengths = exp.lengths().cpu()
    finished = torch.tensor([a.finished for a in exp.answers])
    terminated = lengths[finished]
    first = [st for st in stats if "entropy" in st]  # the first pass's minibatches
    metrics = {
        "loss": mean_of(stats, "loss"), "grad_norm": stats[-1]["grad_norm"],
        "reward": float(score.mean()), "reward_std": global_std(score),
        "frac_reward_zero_std": float(zero.float().mean()), "kept_answers": float(kept.float().mean()),
        **{f"rewards/{name}/mean": float(torch.cat([grp.parts[name] for grp in groups]).mean())
           for name in groups[0].parts},
        **s.scorer.range_metrics({name: torch.cat([grp.parts[name] for grp in groups]) for name in groups[0].parts}),
        "completions/mean_length": float(lengths.mean()), "completions/min_length": float(lengths.min()),
        "completions/max_length": float(lengths.max()), "completions/clipped_ratio": float((~finished).float().mean()),
        "completions/mean_terminated_length": float(terminated.mean()) if len(terminated) else 0.0,
        **{f"time/{k}": v for k, v in times.items()},
        **{f"clip_ratio/{k}_mean": mean_of(stats, f"clip_ratio/{k}") for k in ("low", "high", "region")},
        "ratio": mean_of(stats, "ratio"), "entropy": mean_of(first, "entropy"),
        "episodes": exp.size, "tokens": int(exp.attention_mask.sum()),
    }
    if s.cfg.grpo.beta:
        metrics["kl"] = mean_of(stats, "kl")
    return metrics


def global_std(x: torch.Tensor) -> float:
    """The standard deviation of every process's values together (unbiased), as TRL logs reward_std."""
    return float(masked_var(x.double(), torch.ones_like(x, dtype=torch.float64), distributed.global_sum_tensor).sqrt())


RECIPE = Recipe("grpo", setup, show_plan, build_model, stage)
