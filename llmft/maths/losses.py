"""Loss functions: pure tensor maths, one per objective, each with its equation.

They take fp32 tensors that the stages compute (log-probs and logits are always upcast to fp32 first)
and import nothing from llmft, so they can be tested against values worked out by hand.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llmft.maths.rl import kl_per_token


def sft_loss(logps: torch.Tensor, num_tokens: int | torch.Tensor) -> torch.Tensor:
    """One micro-batch's share of the token-mean cross entropy of a whole accumulated batch.

        L = (1 / N) Σ_{micro-batches m} Σ_{t ∈ m} −log p(y_t | y_<t)

    N (`num_tokens`) counts the supervised tokens of *all* micro-batches of the optimizer step, so summing
    this over the micro-batches gives the true token mean — not the mean of per-micro-batch means, which
    over-weights tokens in short micro-batches. `logps` [n]: log p(y_t | y_<t) of this micro-batch's
    supervised tokens (`logprobs.supervised_logps`).
    """
    return -logps.sum() / num_tokens


def token_logps(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Log-probability of each target token under temperature-scaled logits, in fp32.

        log π(y_t) = log softmax(z_t / T)[y_t]

    logits: [N, V]; targets: [N] → [N]. Use the sampling temperature when scoring sampled answers.
    """
    return torch.log_softmax(logits.float() / temperature, dim=-1).gather(-1, targets[:, None]).squeeze(-1)


def reward_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, num_pairs: int, kind: str = "bradley_terry",
                margin: torch.Tensor | float = 0.0, center_coef: float = 0.0) -> torch.Tensor:
    """One micro-batch's share of the pairwise reward-model loss of a whole accumulated batch.

        Bradley–Terry (with margin m):  ℓ = −log σ(r_c − r_r − m)
        hinge ranking:                   ℓ = max(0, m − (r_c − r_r))
        centering (Eisenstein et al.):   + c · (r_c + r_r)²
        L = (1 / P) Σ_pairs ℓ            P (`num_pairs`) counts the pairs of all micro-batches

    r_chosen, r_rejected: [B] scalar rewards (fp32); margin: [B] or a float.
    """
    r_chosen, r_rejected = r_chosen.float(), r_rejected.float()
    diff = r_chosen - r_rejected
    if kind == "bradley_terry":
        per_pair = -F.logsigmoid(diff - margin)
    elif kind == "hinge":
        per_pair = torch.relu(margin - diff)
    else:
        raise ValueError(f"unknown reward loss {kind!r}")
    if center_coef:
        per_pair = per_pair + center_coef * (r_chosen + r_rejected) ** 2
    return per_pair.sum() / num_pairs


def pairwise_accuracy(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> float:
    """Share of pairs ranked correctly, r_c > r_r (a tie counts as wrong)."""
    return float((r_chosen > r_rejected).float().mean())


# ------------------------------------------------------------------------------------ the DPO family
# Δ = (log π(y_c|x) − log π_ref(y_c|x)) − (log π(y_r|x) − log π_ref(y_r|x)), summed over answer tokens.
# Each function returns one loss per pair [B]; the stage averages over the pairs of the optimizer step.

def dpo_sigmoid(delta: torch.Tensor, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """DPO (Rafailov et al. 2023), and cDPO with label smoothing ε (the label is flipped with probability ε):

        ℓ = −(1 − ε) log σ(βΔ) − ε log σ(−βΔ)
    """
    return -(1 - label_smoothing) * F.logsigmoid(beta * delta) - label_smoothing * F.logsigmoid(-beta * delta)


def dpo_robust(delta: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    """Robust DPO (Chowdhury et al. 2024), unbiased under preference noise of rate ε < 1/2:

        ℓ = [−(1 − ε) log σ(βΔ) + ε log σ(−βΔ)] / (1 − 2ε)
    """
    return (-(1 - label_smoothing) * F.logsigmoid(beta * delta)
            + label_smoothing * F.logsigmoid(-beta * delta)) / (1 - 2 * label_smoothing)


def dpo_hinge(delta: torch.Tensor, beta: float) -> torch.Tensor:
    """Hinge (SLiC-style, Zhao et al. 2023):  ℓ = max(0, 1 − βΔ)"""
    return torch.relu(1 - beta * delta)


def ipo_loss(delta_mean: torch.Tensor, beta: float) -> torch.Tensor:
    """IPO (Azar et al. 2023) on per-token-averaged log-ratios Δ̄ (β plays the role of τ):

        ℓ = (Δ̄ − 1 / (2β))²
    """
    return (delta_mean - 1 / (2 * beta)) ** 2


def simpo_loss(avg_chosen: torch.Tensor, avg_rejected: torch.Tensor, beta: float, gamma: float) -> torch.Tensor:
    """SimPO (Meng et al. 2024), reference-free, on length-normalised log-probs (mean over answer tokens):

        ℓ = −log σ(β·avg log π(y_c|x) − β·avg log π(y_r|x) − γ)
    """
    return -F.logsigmoid(beta * (avg_chosen - avg_rejected) - gamma)


def orpo_loss(avg_chosen: torch.Tensor, avg_rejected: torch.Tensor, lam: float) -> torch.Tensor:
    """ORPO (Hong et al. 2024), reference-free: the chosen answer's NLL plus an odds-ratio term, with
    odds(y|x) = p / (1 − p) for p = exp(avg log π(y|x)) (mean-token probability):

        ℓ = −avg log π(y_c|x) − λ log σ(log odds(y_c|x) − log odds(y_r|x))
    """
    def log_odds(avg: torch.Tensor) -> torch.Tensor:
        return avg - log1mexp(avg)

    return -avg_chosen - lam * F.logsigmoid(log_odds(avg_chosen) - log_odds(avg_rejected))


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − eˣ) for x < 0, accurate everywhere (Mächler 2012): log(−expm1(x)) above −ln 2, where 1 − eˣ cancels,
    and log1p(−eˣ) below. x is capped at −1e-20 (p = 1 − 1e-20) so that a certain answer gives a large finite value,
    and each branch only ever sees arguments it is finite on (torch.where differentiates both)."""
    ln2 = 0.6931471805599453
    x = x.clamp(max=-1e-20)
    near_zero = x > -ln2
    above = torch.log(-torch.expm1(torch.where(near_zero, x, torch.full_like(x, -ln2))))
    below = torch.log1p(-torch.exp(torch.where(near_zero, torch.full_like(x, -ln2), x)))
    return torch.where(near_zero, above, below)


def with_chosen_nll(losses: torch.Tensor, chosen_logps: torch.Tensor, chosen_counts: torch.Tensor,
                    alpha: float) -> torch.Tensor:
    """RPO (Pang et al. 2024, "Iterative Reasoning Preference Optimization"): a preference loss plus the
    per-token negative log-likelihood of the chosen answer,

        L = L_pref − α · log π(y_c | x) / |y_c|

    which keeps DPO from lowering the likelihood of the very answers it prefers. losses, chosen_logps
    (summed), chosen_counts: [B]."""
    return losses - alpha * chosen_logps / chosen_counts


REFERENCE_FREE = ("simpo", "orpo")


def preference_loss(kind: str, logps: torch.Tensor, ref_logps: torch.Tensor | None, counts: torch.Tensor,
                    beta: float, label_smoothing: float = 0.0, gamma: float = 0.5,
                    lam: float = 0.1) -> torch.Tensor:
    """Per-pair loss [B] of the named DPO-family objective.

    logps, ref_logps: [2, B] summed answer log-probs (row 0 chosen, row 1 rejected) of the policy and the
    reference (None for the reference-free simpo and orpo); counts: [2, B] answer token counts.
    """
    if kind in REFERENCE_FREE:
        avg = logps / counts
        return simpo_loss(avg[0], avg[1], beta, gamma) if kind == "simpo" else orpo_loss(avg[0], avg[1], lam)
    ratio = logps - ref_logps  # [2, B]
    delta = ratio[0] - ratio[1]
    if kind == "sigmoid":
        return dpo_sigmoid(delta, beta, label_smoothing)
    if kind == "robust":
        return dpo_robust(delta, beta, label_smoothing)
    if kind == "hinge":
        return dpo_hinge(delta, beta)
    if kind == "ipo":
        avg_ratio = ratio / counts
        return ipo_loss(avg_ratio[0] - avg_ratio[1], beta)
    raise ValueError(f"unknown preference loss {kind!r}")


def kto_loss(logratios: torch.Tensor, reference_point: torch.Tensor | float, desirable: torch.Tensor, beta: float,
             desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> torch.Tensor:
    """Per-answer loss [B] of KTO (Ethayarajh et al. 2024, eq. 8), from unpaired answers labelled desirable or not:

        L = E_{x,y}[λ_y − v(x, y)],   r(x, y) = log π(y|x) − log π_ref(y|x),   z0 = KL(π ‖ π_ref) (no gradient)
        v(x, y) = λ_D σ(β (r − z0))  for a desirable y,   λ_U σ(β (z0 − r))  for an undesirable one

    logratios: [B] r of each answer; reference_point: z0, a scalar ≥ 0 (`kto_reference_point`); desirable: [B] bool.
    λ_D, λ_U weigh the two kinds, e.g. so that λ_D n_D / (λ_U n_U) lies in [1, 4/3] for imbalanced data."""
    shifted = torch.where(desirable, logratios - reference_point, reference_point - logratios)
    weight = torch.where(desirable, desirable_weight, undesirable_weight)
    return weight * (1 - torch.sigmoid(beta * shifted))


def kto_reference_point(kl_sum: torch.Tensor, count: int) -> torch.Tensor:
    """KTO's z0: the batch estimate of KL(π ‖ π_ref) from answers paired with prompts that are not theirs,

        z0 = max(0, (1 / n) Σ_i [log π(y_j | x_i) − log π_ref(y_j | x_i)]),  j ≠ i

    kl_sum: the sum of those n log-ratios (computed without gradient; over every process); the clamp keeps the
    estimate a KL's sign."""
    return (kl_sum / count).clamp(min=0)


# ---------------------------------------------------------------------------------------------------- PPO
def clipped_surrogate(ratio: torch.Tensor, advantages: torch.Tensor, eps_low: float,
                      eps_high: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The clipped surrogate of PPO (Schulman et al. 2017, eq. 7), per token, as a loss; DAPO's "clip-higher" (Yu et
    al. 2025) lets the upper bound differ:

        ℓ_t = max(−A_t ρ_t, −A_t clip(ρ_t, 1 − ε_low, 1 + ε_high))

    Returns (ℓ, clipped_low, clipped_high): the loss and where the clipped term is taken below (ρ < 1 − ε_low with
    A < 0) and above (ρ > 1 + ε_high with A > 0)."""
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
    low = (ratio < 1 - eps_low) & (advantages < 0)
    high = (ratio > 1 + eps_high) & (advantages > 0)
    return torch.max(unclipped, clipped), low, high


def ppo_policy_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                    num_tokens: int | torch.Tensor, clip_range: float = 0.2) -> tuple[torch.Tensor, dict]:
    """The clipped surrogate objective of PPO (Schulman et al. 2017, eq. 7), as a loss to minimise:

        ρ_t = exp(log π_θ(y_t) − log π_old(y_t))
        L   = (1/N) Σ_t max(−A_t ρ_t, −A_t clip(ρ_t, 1 − ε, 1 + ε))

    summed over the valid tokens (mask) of this micro-batch and divided by N (`num_tokens`), the valid tokens
    of the whole minibatch, so that summing over micro-batches gives the minibatch's token mean.
    Returns (loss, stats): clip_ratio/low, high, region (the share of tokens where the clipped term is taken below,
    above, either: as `grpo_policy_loss`), approx_kl (½ (log ρ)², mean over tokens) and the mean ratio, all over
    this micro-batch.
    """
    log_ratio = (logps - old_logps) * mask
    ratio = torch.exp(log_ratio)
    per_token, low, high = clipped_surrogate(ratio, advantages, clip_range, clip_range)
    loss = (per_token * mask).sum() / num_tokens
    n = mask.sum().clamp(min=1)
    with torch.no_grad():
        stats = {"clip_ratio/low": float((low.float() * mask).sum() / n),
                 "clip_ratio/high": float((high.float() * mask).sum() / n),
                 "clip_ratio/region": float(((low | high).float() * mask).sum() / n),
                 "approx_kl": float((0.5 * log_ratio ** 2).sum() / n),
                 "ratio": float((ratio * mask).sum() / n)}
    return loss, stats


def grpo_policy_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                     normaliser: float, eps_low: float = 0.2, eps_high: float = 0.2, level: str = "token",
                     aggregation: str = "token_mean", ref_logps: torch.Tensor | None = None,
                     beta: float = 0.0) -> tuple[torch.Tensor, dict]:
    """The policy loss of the GRPO family, one micro-batch's share: the clipped surrogate of each token (ε_low /
    ε_high: DAPO), with the importance ratio per token (GRPO) or per sequence (GSPO, Zheng et al. 2025:
    ρ_i = exp(mean_t log π_θ/π_old), the same for every token of answer i), plus β · k3 to the reference when β > 0
    (k3_t = π_ref/π − log(π_ref/π) − 1, in the loss with its gradient, as GRPO and TRL do: on answers drawn from π
    its value estimates KL(π‖π_ref), but its gradient is that of the reverse KL(π_ref‖π), E_π[(1 − π_ref/π) ∇log π]
    = −∇ Σ_y π_ref log π), aggregated as

        token_mean      Σ_i Σ_t ℓ_it / N_tokens                 (DAPO: every token weighs the same)
        sequence_mean   Σ_i (Σ_t ℓ_it / |y_i|) / N_sequences    (the original GRPO: every answer weighs the same)
        constant        Σ_i Σ_t ℓ_it / (N_sequences · L_max)    (Dr. GRPO: no length bias)

    `normaliser` is that denominator for the whole update (every micro-batch and process), so that summing the
    micro-batches' losses gives the update's loss. logps, old_logps, ref_logps, mask [b, R]; advantages [b, R]
    (each answer's advantage on its tokens). Returns (loss, stats: clip_ratio/low, high, region, and the mean
    ratio and k3 over this micro-batch's tokens)."""
    log_ratio = (logps - old_logps) * mask
    if level == "sequence":
        log_ratio = (log_ratio.sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1)) * mask
    ratio = torch.exp(log_ratio)
    per_token, low, high = clipped_surrogate(ratio, advantages, eps_low, eps_high)
    k3 = None
    if beta:
        k3 = kl_per_token(logps, ref_logps, "k3")
        per_token = per_token + beta * k3
    per_token = per_token * mask
    if aggregation == "sequence_mean":
        loss = (per_token.sum(-1) / mask.sum(-1).clamp(min=1)).sum() / normaliser
    elif aggregation in ("token_mean", "constant"):
        loss = per_token.sum() / normaliser
    else:
        raise ValueError(f"unknown loss aggregation {aggregation!r}")
    n = mask.sum().clamp(min=1)
    with torch.no_grad():
        stats = {"clip_ratio/low": float((low.float() * mask).sum() / n),
                 "clip_ratio/high": float((high.float() * mask).sum() / n),
                 "clip_ratio/region": float(((low | high).float() * mask).sum() / n),
                 "ratio": float((ratio * mask).sum() / n),
                 "kl": float((k3 * mask).sum() / n) if k3 is not None else 0.0}
    return loss, stats


def ppo_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                   num_tokens: int | torch.Tensor, clip_range: float = 0.2) -> tuple[torch.Tensor, float]:
    """The clipped value loss of PPO implementations for RLHF (Ziegler et al. 2019; "The N+ implementation
    details of RLHF with PPO"):

        V_clip = V_old + clip(V − V_old, −ε_v, ε_v)
        L      = (1/N) Σ_t ½ max((V_t − R_t)², (V_clip,t − R_t)²)

    with N as in `ppo_policy_loss`. Returns (loss, clipfrac: share of tokens where the clipped term is taken).
    """
    clipped = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    err, err_clipped = (values - returns) ** 2, (clipped - returns) ** 2
    loss = 0.5 * (torch.max(err, err_clipped) * mask).sum() / num_tokens
    clipfrac = float(((err_clipped > err).float() * mask).sum() / mask.sum().clamp(min=1))
    return loss, clipfrac
