"""Experience: one batch of sampled answers and what an RL stage computes from it, and the forwards that compute it.

Where tensors live is decided here, once: `pack` builds an Experience on the training device, and every tensor the
stage adds to it (scores, log-probs, values, advantages) is made on that device or moved there by `Experience.put`.
The RL maths (`llmft.maths.rl`) then never meets a host tensor.

    B answers; P = the longest prompt, R = the longest answer of the batch; position t of a per-token tensor
    [B, R] is the t-th answer token y_t (its log-probs, the value of the state before it, its reward).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmft.models.forward import autocast, prompt_owners
from llmft.models.logprobs import head_logps
from llmft.rollout.generation import Answer


@dataclass
class Experience:
    input_ids: torch.Tensor  # [B, P + R] long: prompts left-padded to P, answers right-padded to R
    attention_mask: torch.Tensor  # [B, P + R] long
    mask: torch.Tensor  # [B, R] fp32: 1 on each answer's tokens through its first stop id, 0 after (multi-turn: 1
    #                     on the policy's tokens only, 0 on what the environment added between its turns)
    prompt_width: int  # P
    answers: list[Answer]  # the answers as generated (host lists, decoded text)
    sampler_logps: torch.Tensor  # [B, R] fp32: the sampler's own log-prob of each drawn token (0 on padding)
    scores: torch.Tensor | None = None  # [B] the score optimised (after normalising and clipping)
    old_logps: torch.Tensor | None = None  # [B, R] log π_old(y_t), recomputed by the trainer
    ref_logps: torch.Tensor | None = None  # [B, R] log π_ref(y_t)
    values: torch.Tensor | None = None  # [B, R] V(s_t) of the critic
    entropy: torch.Tensor | None = None  # [B, R] entropy of π_old at each position
    advantages: torch.Tensor | None = None  # [B, R]
    returns: torch.Tensor | None = None  # [B, R] the critic's targets

    @property
    def device(self) -> torch.device:
        return self.mask.device

    @property
    def size(self) -> int:
        return len(self.answers)

    def put(self, **tensors: torch.Tensor) -> None:
        """Set fields, each moved onto the experience's device (the one way in for tensors made elsewhere)."""
        for name, t in tensors.items():
            setattr(self, name, t.to(self.device))

    def lengths(self) -> torch.Tensor:
        return self.mask.sum(-1)  # [B]

    def logprob_gap(self) -> tuple[float, float, float]:
        """|log π_sampler − log π_old| over the answer tokens: (largest, sum, number of tokens); 0 up to float
        noise when the trainer recomputes exactly the distribution the sampler drew from."""
        gap = (self.sampler_logps - self.old_logps).abs() * self.mask
        return float(gap.max()), float(gap.sum()), float(self.mask.sum())


def pack(gens: list[Answer], pad: int, device: torch.device) -> Experience:
    """Prompts left-padded to the longest prompt P, answers right-padded to the longest answer R, on `device`."""
    p_width = max(len(g.prompt_ids) for g in gens)
    r_width = max(len(g.answer_ids) for g in gens)
    ids = torch.full((len(gens), p_width + r_width), pad, dtype=torch.long)
    attention = torch.zeros_like(ids)
    mask = torch.zeros(len(gens), r_width)
    sampled = torch.zeros(len(gens), r_width)
    for i, g in enumerate(gens):
        p, r = g.prompt_ids, g.answer_ids
        ids[i, p_width - len(p):p_width], ids[i, p_width:p_width + len(r)] = torch.tensor(p), torch.tensor(r)
        attention[i, p_width - len(p):p_width + len(r)] = 1
        mask[i, :len(r)] = torch.tensor(g.mask, dtype=mask.dtype) if g.mask is not None else 1
        if g.logprobs is not None:
            sampled[i, :len(r)] = torch.tensor(g.logprobs)
    return Experience(ids.to(device), attention.to(device), mask.to(device), p_width, gens, sampled.to(device))


# ------------------------------------------------------------------------------------------- forwards
@dataclass
class MicroBatch:
    """Rows of an experience, cut to their own width: columns that are padding in every row are dropped."""

    input_ids: torch.Tensor  # [b, p + r]
    attention_mask: torch.Tensor  # [b, p + r]
    mask: torch.Tensor  # [b, r] answer mask
    prompt_width: int  # p
    full_width: int  # R of the experience: per-token outputs are padded back to [b, R]
    owners: torch.Tensor | None  # [b] the first row with the same prompt; None when every prompt differs

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.pad(x, (0, self.full_width - x.shape[1]))


def micro_batch(exp: Experience, idx: list[int]) -> MicroBatch:
    attention, mask = exp.attention_mask[idx], exp.mask[idx]
    first = int(attention.argmax(-1).min())  # the earliest real prompt token of these rows
    r = int(attention[:, exp.prompt_width:].sum(-1).max())  # their longest answer (with what an environment added)
    cols = slice(first, exp.prompt_width + r)
    ids, attention, p = exp.input_ids[idx, cols], attention[:, cols], exp.prompt_width - first
    return MicroBatch(ids, attention, mask[:, :r], p, mask.shape[1], prompt_owners(ids[:, :p], attention[:, :p]))


def answer_states(hidden_fn, mb: MicroBatch) -> torch.Tensor:
    """Hidden states [b, r, d] of the positions that predict each answer token (p − 1 … p + r − 2);
    `hidden_fn(input_ids, attention_mask, start, owners)` (`forward.hidden_states`) runs the body under the
    active adapter role, each distinct prompt once up to its last token."""
    return hidden_fn(mb.input_ids, mb.attention_mask, mb.prompt_width - 1, mb.owners)[:, :-1]


def answer_logps(model, hidden_fn, exp: Experience, idx: list[int], temperature: float, dtype: torch.dtype,
                   with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log π(y_t) at the sampling temperature [b, R] (0 on padding), and the entropy [b, R] when asked, fp32.
    The LM head (`logprobs.head_logps`: soft-capping included, in chunks) runs on the valid positions only."""
    mb = micro_batch(exp, idx)
    valid = mb.mask.bool()
    targets = mb.input_ids[:, mb.prompt_width:][valid]  # [N]
    with autocast(exp.device, dtype):
        hidden = answer_states(hidden_fn, mb)
        logps, entropy = head_logps(model, hidden[valid], targets, temperature, with_entropy)  # [N], [N] | None
    logps = torch.zeros_like(mb.mask).masked_scatter(valid, logps)
    if entropy is not None:  # a statistic, never differentiated
        entropy = torch.zeros_like(mb.mask).masked_scatter(valid, entropy)
    return mb.pad(logps), mb.pad(entropy) if entropy is not None else None


def value_estimates(value_fn, hidden_fn, exp: Experience, idx: list[int], dtype: torch.dtype) -> torch.Tensor:
    """V(s_t) [b, R] (0 on padding): `value_fn` (the value head) on the state before each answer token."""
    mb = micro_batch(exp, idx)
    with autocast(exp.device, dtype):
        hidden = answer_states(hidden_fn, mb)
    return mb.pad(value_fn(hidden) * mb.mask)
