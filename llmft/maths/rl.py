"""The maths of RL for language models (PPO, GRPO and its family), pure tensor functions (no models, nothing from
llmft).

Every per-token tensor is [B, R]: B answers, R = the longest answer of the batch; `mask` [B, R] is 1 on a
answer's real tokens (up to and including its first EOS) and 0 on the padding after it. Position t holds
the t-th answer token y_t, its log-probs, the value V_t of the state before it, its reward r_t.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def local_sum(t: torch.Tensor) -> torch.Tensor:
    """The default `global_sum`: this process's sum is the whole sum (one process)."""
    return t


def masked_mean(x: torch.Tensor, mask: torch.Tensor, global_sum=local_sum) -> torch.Tensor:
    """Mean of x over the positions where mask is 1. `global_sum` sums a tensor over data-parallel processes
    (distributed.global_sum_tensor), so that the mean is the global batch's."""
    return global_sum((x * mask).sum()) / global_sum(mask.sum()).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, global_sum=local_sum) -> torch.Tensor:
    """Unbiased variance of x over the positions where mask is 1 (global with `global_sum`, as masked_mean)."""
    mean = masked_mean(x, mask, global_sum)
    n = global_sum(mask.sum())
    return global_sum(((x - mean) ** 2 * mask).sum()) / (n - 1).clamp(min=1)


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8,
           global_sum=local_sum) -> torch.Tensor:
    """(x − mean) / std over the valid positions; with shift_mean=False the mean is kept (x / std only).
    Padding positions come back as 0. With `global_sum`, mean and variance are those of the global batch."""
    mean, var = masked_mean(x, mask, global_sum), masked_var(x, mask, global_sum)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


def kl_per_token(logps: torch.Tensor, ref_logps: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(π ‖ π_ref) from tokens sampled from π:

        k1 = log π(y_t) − log π_ref(y_t)                  (unbiased; can be negative per token)
        k3 = (r − 1) − log r,  r = π_ref(y_t) / π(y_t)    (unbiased and ≥ 0, lower variance)
    """
    log_ratio = logps - ref_logps
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r} (k1, k3)")


def shaped_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-token rewards [B, R] of RLHF (Ziegler et al. 2019, Stiennon et al. 2020):

        r_t = −β · KL_t                 for every answer token
        r_T += score                    at the last real token T of each answer only

    scores [B], or [B, R] already placed on their tokens (multi-turn: `turn_rewards`); kl, mask [B, R]. Padding
    positions get 0.
    """
    rewards = -beta * kl * mask
    if scores.dim() == 2:
        return rewards + scores * mask
    last = mask.shape[1] - 1 - mask.flip(-1).argmax(-1)  # [B]: index of each answer's last token with mask 1
    return rewards.index_put((torch.arange(len(scores), device=scores.device), last), scores, accumulate=True)


def turn_rewards(turn_scores: torch.Tensor, ends: torch.Tensor, scores: torch.Tensor, scale: float,
                 width: int) -> torch.Tensor:
    """A multi-turn trajectory's rewards on its tokens [B, R]: each policy turn's reward where that turn ends,

        r_{e_k} = c · s_k                   at the last policy token e_k of turn k
        r_{e_K} += S − c · Σ_k s_k          at the last turn's: the rest of the score optimised, S

    so that Σ_t r_t = S (with γ = 1 the return of the first token is the trajectory's score). c is the scale of
    the reward normalisation (1 without), and the rest is its shift, the penalty for a missing stop id and any
    clipping. turn_scores [B, K] (0-padded), ends [B, K] long (padded with the last turn's end), scores [B].
    """
    placed = torch.zeros(len(scores), width, dtype=torch.float32, device=scores.device)
    rows = torch.arange(len(scores), device=scores.device)[:, None].expand_as(ends)
    placed = placed.index_put((rows, ends), scale * turn_scores, accumulate=True)
    rest = scores - scale * turn_scores.sum(-1)
    return placed.index_put((rows[:, 0], ends[:, -1]), rest, accumulate=True)


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) over each answer, right to left:

        δ_t = r_t + γ V_{t+1} − V_t          (V after the last real token is 0: the episode ends)
        A_t = δ_t + γ λ A_{t+1}
        R_t = A_t + V_t                       (the value targets, before any whitening)

    over the positions where mask is 1 only: t + 1 is the next such position, so in a multi-turn trajectory the
    environment's tokens between two policy turns (mask 0) are skipped, not an episode's end.
    rewards, values, mask [B, R] → (advantages, returns), both [B, R] and 0 where mask is 0.
    """
    values, rewards = values * mask, rewards * mask
    advantages = torch.zeros_like(rewards)
    next_adv = torch.zeros_like(rewards[:, 0])
    next_value = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        policy = mask[:, t] > 0
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv = delta + gamma * lam * next_adv
        advantages[:, t] = adv * mask[:, t]
        next_adv = torch.where(policy, adv, next_adv)
        next_value = torch.where(policy, values[:, t], next_value)
    return advantages, (advantages + values) * mask


def group_advantages(scores: torch.Tensor, num_generations: int, scale: str = "group", eps: float = 1e-4,
                     global_sum=local_sum) -> torch.Tensor:
    """GRPO's group-relative advantage (Shao et al. 2024): each answer's score against the other answers to its
    prompt,

        A_i = (r_i − mean_g r) / s          s = std_g r + ε  (scale "group"), std of the whole batch + ε ("batch"),
                                            or 1 ("none": Dr. GRPO, Liu et al. 2025, which drops the division)

    scores [B] hold consecutive groups of `num_generations` answers to one prompt; returns [B]. The std is unbiased
    (n − 1); "batch" uses the global batch's (`global_sum` sums over processes)."""
    r = scores.view(-1, num_generations)
    centred = r - r.mean(-1, keepdim=True)
    if scale == "none":
        return centred.reshape(-1)
    if scale == "group":
        return (centred / (r.std(-1, keepdim=True) + eps)).reshape(-1)
    if scale == "batch":
        return (centred / (masked_var(scores, torch.ones_like(scores), global_sum).sqrt() + eps)).reshape(-1)
    raise ValueError(f"unknown advantage scale {scale!r} (group, batch, none)")


def rloo_advantages(scores: torch.Tensor, num_generations: int) -> torch.Tensor:
    """REINFORCE leave-one-out (Ahmadian et al. 2024): each answer's baseline is the mean score of the *other*
    answers to its prompt,

        b_i = (Σ_j r_j − r_i) / (G − 1)        A_i = r_i − b_i = G / (G − 1) · (r_i − mean_g r)

    With G = 2 it is the pairwise difference: A_1 = r_1 − r_2, A_2 = r_2 − r_1. scores [B] in groups; → [B]."""
    r = scores.view(-1, num_generations)
    baseline = (r.sum(-1, keepdim=True) - r) / (num_generations - 1)
    return (r - baseline).reshape(-1)


def zero_std_groups(scores: torch.Tensor, num_generations: int) -> torch.Tensor:
    """[B / G] bool: groups whose answers all scored the same (standard deviation 0 up to float noise, as TRL
    counts them); their advantages are 0, they carry no signal."""
    std = scores.double().view(-1, num_generations).std(-1)
    return torch.isclose(std, torch.zeros_like(std))


def rollout_correction(old_logps: torch.Tensor, sampler_logps: torch.Tensor, mask: torch.Tensor, mode: str,
                       cap: float) -> torch.Tensor:
    """Per-token importance weights [B, R] for answers drawn by a sampler whose distribution π_s differs slightly
    from the trainer's π_old (another engine, other kernels), detached, 0 on padding:

        w_t = π_old(y_t) / π_s(y_t) = exp(log π_old(y_t) − log π_s(y_t))
        tis: min(w_t, C)     (truncated importance sampling; Yao et al. 2025, "Your efficient RL framework
                              secretly brings you off-policy RL training")
        mis: 1[w_t ≤ C]      (masked: a token the sampler drew far more often than the trainer would is dropped)
        none: 1

    The policy-gradient term of each token is multiplied by it (the KL term is not)."""
    if mode == "none":
        return mask
    w = torch.exp((old_logps - sampler_logps) * mask).detach()
    return (w.clamp(max=cap) if mode == "tis" else (w <= cap).to(mask.dtype)) * mask


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 − Var(R − V) / Var(R) over valid tokens: 1 = the critic predicts the returns, ≤ 0 = no better than
    their mean."""
    var_returns = masked_var(returns, mask)
    return float(1 - masked_var(returns - values, mask) / var_returns) if var_returns > 0 else float("nan")


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """H = −Σ_v p_v log p_v per position, fp32: logits [..., V] → [...]."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


@dataclass
class KLController:
    """The KL coefficient β: fixed, or adaptive (Ziegler et al. 2019, eq. 2):

        e = clip(KL / KL_target − 1, −0.2, 0.2)
        β ← β · (1 + e · n / horizon)           n = episodes in the batch just used
    """

    value: float
    target: float | None = None  # None: fixed β
    horizon: int = 10_000

    def update(self, kl: float, n: int) -> None:
        if self.target is None:
            return
        error = min(max(kl / self.target - 1, -0.2), 0.2)
        self.value *= 1 + error * n / self.horizon


@dataclass
class RunningMoments:
    """Running mean and standard deviation of every score seen so far (Chan et al.'s parallel update), to
    normalise scores across batches."""

    mean: float = 0.0
    var: float = 1.0
    count: int = 0

    def update(self, x: torch.Tensor) -> None:
        n, mean, var = x.numel(), float(x.mean()), float(x.var(unbiased=False)) if x.numel() > 1 else 0.0
        merged = self.count + n
        delta = mean - self.mean
        m2 = self.var * self.count + var * n + delta ** 2 * self.count * n / merged
        self.mean, self.var, self.count = self.mean + delta * n / merged, m2 / merged, merged

    @property
    def std(self) -> float:
        return max(self.var, 1e-8) ** 0.5
