"""Loss functions: pure tensor maths, one per objective, each with its equation.

They take fp32 tensors that the stages compute (log-probs and logits are always upcast to fp32 first)
and import nothing from llmft, so they can be tested against values worked out by hand.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def token_nll_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed negative log-likelihood of the supervised tokens.

        S = Σ_t −log softmax(z_t)[y_t]

    logits: [N, V] at the N positions that predict a supervised token; targets: [N] token ids.
    """
    return F.cross_entropy(logits.float(), targets, reduction="sum")


def sft_loss(logits: torch.Tensor, targets: torch.Tensor, num_tokens: int | torch.Tensor) -> torch.Tensor:
    """One micro-batch's share of the token-mean cross entropy of a whole accumulated batch.

        L = (1 / N) Σ_{micro-batches m} Σ_{t ∈ m} −log p(y_t | y_<t)

    N (`num_tokens`) counts the supervised tokens of *all* micro-batches of the optimizer step, so summing
    this over the micro-batches gives the true token mean — not the mean of per-micro-batch means, which
    over-weights tokens in short micro-batches.
    """
    return token_nll_sum(logits, targets) / num_tokens


def token_logps(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Log-probability of each target token under temperature-scaled logits, in fp32.

        log π(y_t) = log softmax(z_t / T)[y_t]

    logits: [N, V]; targets: [N] → [N]. Use the sampling temperature when scoring sampled responses.
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
