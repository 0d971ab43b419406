"""The RL algorithms' own config sections (ppo:, grpo:). Import-light: the configs import them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from llmft.schema import opt


@dataclass
class PPOAlgoConfig:
    epochs: int = opt(2, "PPO epochs over each rollout batch.", ge=1)
    num_minibatches: int = opt(1, "Minibatches (optimizer steps) per PPO epoch; the rollout batch is "
                                  "train.batch_size × train.grad_accum × num_minibatches episodes.", ge=1)
    clip_range: float = opt(0.2, "ε of the clipped policy objective.", gt=0)
    value_clip_range: float = opt(0.2, "ε_v of the clipped value loss.", gt=0)
    vf_coef: float = opt(0.1, "Weight of the value loss.", ge=0)
    gamma: float = opt(1.0, "Discount γ of GAE.", ge=0, le=1)
    lam: float = opt(0.95, "λ of GAE.", ge=0, le=1)
    whiten_advantages: bool = opt(True, "Whiten advantages over the valid tokens of the rollout batch.")
    kl_coef: float = opt(0.05, "β of the per-token KL penalty (the starting value when kl_target is set).", ge=0)
    kl_estimator: Literal["k1", "k3"] = opt(
        "k1", "The KL estimate in the per-token reward: k1 = log π − log π_ref, the one estimator whose use as a "
              "reward gives the gradient of KL(π‖ref); k3 is refused (as a reward its gradient is biased).")
    kl_target: float | None = opt(None, "Adaptive β: the KL (summed per answer) to steer towards; null = "
                                        "fixed β.", gt=0)
    kl_horizon: int = opt(10_000, "Adaptive β: horizon in episodes.", ge=1)
    logprob_gap_tolerance: float | None = opt(
        None, "Largest mean |log π_sampler − log π_trainer| per token allowed at step 1 (the run stops above it: the "
              "trainer would not be computing the distribution it samples from); null = 1e-3 for fp32 on the CPU, "
              "0.05 on CUDA or in 16-bit.", gt=0)


@dataclass
class GRPOAlgoConfig:
    num_generations: int = opt(8, "G: answers sampled per prompt (one batched generation); a group never spans "
                                  "processes.", ge=2)
    advantage: Literal["group", "rloo"] = opt(
        "group", "group: r − the mean score of the prompt's answers, scaled by scale_rewards (GRPO); rloo: r − the "
                 "mean of the *other* answers (REINFORCE leave-one-out), not scaled.")
    scale_rewards: Literal["group", "batch", "none"] = opt(
        "group", "advantage group: divide by the std of the prompt's answers (GRPO), of the whole batch, or not at "
                 "all (Dr. GRPO).")
    epsilon_low: float = opt(0.2, "ε_low: the ratio's lower clip, 1 − ε_low.", gt=0, lt=1)
    epsilon_high: float = opt(0.2, "ε_high: the upper clip, 1 + ε_high (DAPO's clip-higher: 0.28).", gt=0)
    importance_sampling: Literal["token", "sequence"] = opt(
        "token", "The importance ratio per token (GRPO), or per answer, exp(mean token log-ratio) (GSPO: use "
                 "ε_low 3e-4, ε_high 4e-4).")
    loss_aggregation: Literal["token_mean", "sequence_mean", "constant"] = opt(
        "token_mean", "token_mean: every token of the batch weighs the same (DAPO); sequence_mean: each answer's mean "
                      "then the mean over answers (the original GRPO: favours short answers); constant: the sum over "
                      "tokens / (answers × rollout.max_new_tokens) (Dr. GRPO).")
    iterations: int = opt(1, "μ: passes over each rollout batch (μ = 1 with one minibatch needs no separate "
                             "old-policy forward: the ratio is exactly 1).", ge=1)
    num_minibatches: int = opt(1, "Optimizer steps per pass; the rollout batch is train.batch_size × "
                                  "train.grad_accum × num_minibatches answers per process.", ge=1)
    beta: float = opt(0.0, "β of the KL to the reference, as k3 in the loss (with its gradient); 0 = no KL and no "
                           "reference forward.", ge=0)
    dynamic_sampling: Literal["off", "skip", "refill"] = opt(
        "off", "Groups whose answers all scored the same carry no signal: keep them (off), leave them out of the "
               "update (skip), or replace them by groups of fresh prompts (refill, DAPO), max_refills rounds at most.")
    max_refills: int = opt(2, "dynamic_sampling refill: refill rounds per step at most, after the first sampling "
                              "(0 = as skip).", ge=0)
    logprob_gap_tolerance: float | None = opt(
        None, "Largest mean |log π_sampler − log π_trainer| per token allowed at step 1; null = 1e-3 for fp32 on the "
              "CPU, 0.05 on CUDA or in 16-bit.", gt=0)
