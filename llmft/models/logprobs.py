"""Token log-probs from hidden states, in chunks: the [N × V] fp32 logits of a batch never exist at once.

    log π(y_t) = log softmax(lm_logits(h_t) / T)[y_t]          (`forward.lm_logits`: the model's own final transform)

Every stage's log-probs (sft's loss, dpo, ppo, grpo, eval's KL) come through `head_logps`. The N positions are cut
into chunks of rows whose fp32 logits take at most `CHUNK_BYTES`; per chunk the logits are made, used and freed.

Backward without the logits. Each log π(y_t) depends on its own h_t only, so its gradient is one row
g_t = ∂ log π(y_t) / ∂h_t [d]. With a frozen LM head (LoRA: the usual case) the forward computes g_t chunk by
chunk, alongside the values, and keeps only g [N, d]; backward is then ∂L/∂h_t = (∂L/∂ log π(y_t)) · g_t, exact and
with no second pass over the vocabulary. When the LM head itself trains (rows of tokens a chat template added), each
chunk is checkpointed instead: backward recomputes its logits, one chunk at a time.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from llmft.maths.losses import token_logps
from llmft.maths.rl import entropy_from_logits
from llmft.models.adapters import unwrap
from llmft.models.forward import hidden_states, lm_logits

CHUNK_BYTES = 64 << 20  # fp32 logits per chunk: 64 MiB (341 positions of a 49,152-token vocabulary); a chunk's
# peak is a few times that (logits, log-softmax, their gradient), whatever the number of positions ...
MIN_CHUNK_ROWS = 256  # ... but at least 256 positions (148 MiB for Qwen's 151,936 tokens): fewer make the LM head's
# product too thin to run at speed


def head_logps(model, hidden: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
               with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log π(y_t) [N] (fp32) of targets [N] from hidden states [N, d], and the entropy of each position [N] when asked
    (a statistic: never differentiated)."""
    rows = chunk_rows(model)
    if not (torch.is_grad_enabled() and (hidden.requires_grad or head_trains(model))):
        return chunked(model, hidden.detach(), targets, temperature, with_entropy, rows)
    if head_trains(model):
        parts = [checkpoint(chunk_logps, model, h, y, temperature, with_entropy, use_reentrant=False)
                 for h, y in zip(hidden.split(rows), targets.split(rows), strict=True)]
        logps, entropy = zip(*parts, strict=True)
        return torch.cat(logps), torch.cat(entropy) if with_entropy else None
    logps, entropy = RowGradLogps.apply(hidden, targets, model, temperature, with_entropy, rows)
    return logps, entropy if with_entropy else None


def supervised_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                     temperature: float = 1.0, packed: bool = False,
                     positions: torch.Tensor | None = None) -> torch.Tensor:
    """log π of each supervised token [N] (fp32), N = the positions where `labels[:, 1:] != -100`, in row order.

    Runs the transformer body once and the LM head only where a label is (`hidden[:, :-1]` predicts `ids[:, 1:]`):
    prompt and padding positions never pay for the vocabulary projection; with `packed`, padding positions
    never pay for the body either (`forward.packed_states`); `positions`: rows that are blocks of examples."""
    hidden = hidden_states(model, input_ids, attention_mask, packed=packed, positions=positions)  # [B, T, d]
    keep = labels[:, 1:] != -100  # [B, T-1]
    return head_logps(model, hidden[:, :-1][keep], labels[:, 1:][keep], temperature)[0]


def sequence_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                   temperature: float = 1.0, packed: bool = False) -> torch.Tensor:
    """Summed log-probability of each row's supervised tokens, fp32: [B].

        log π(y | x) = Σ_t log π(y_t | x, y_<t)   over the positions where labels != -100
    """
    logps = supervised_logps(model, input_ids, attention_mask, labels, temperature, packed)  # [N]
    rows = (labels[:, 1:] != -100).nonzero()[:, 0]  # [N]: the row of each supervised position
    return torch.zeros(labels.shape[0], dtype=torch.float32, device=logps.device).index_add_(0, rows, logps)


def pair_logps(model, batch: dict) -> torch.Tensor:
    """Summed answer log-probs [2B] (chosen rows first) of pairs packed with each prompt once (`models.pairpack`)."""
    from llmft.models.pairpack import pair_states

    hidden = pair_states(model, batch)  # [N, d]
    logps = head_logps(model, hidden[batch["tree_predictors"]], batch["tree_targets"])[0]  # [M]
    rows = len(batch["tree_last"])  # 2B answers
    return torch.zeros(rows, dtype=torch.float32, device=logps.device).index_add_(0, batch["tree_rows"], logps)


def chunk_rows(model) -> int:
    vocab = unwrap(model).get_output_embeddings().weight.shape[0]
    return max(MIN_CHUNK_ROWS, CHUNK_BYTES // (4 * vocab))


def head_trains(model) -> bool:
    """Whether any LM-head weight takes gradients (peft's trainable token rows on an untied head)."""
    head = unwrap(model).get_output_embeddings()
    return any(p.requires_grad for p in head.parameters())


def chunk_logps(model, hidden: torch.Tensor, targets: torch.Tensor, temperature: float,
                with_entropy: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One checkpointed chunk: log-probs, and the entropy (detached) from the same logits when asked."""
    logits = lm_logits(model, hidden) / temperature
    return token_logps(logits, targets), entropy_from_logits(logits.detach()) if with_entropy else None


@torch.no_grad()
def chunked(model, hidden: torch.Tensor, targets: torch.Tensor, temperature: float, with_entropy: bool,
            rows: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    logps, entropy = [], []
    for h, y in zip(hidden.split(rows), targets.split(rows), strict=True):
        logits = lm_logits(model, h) / temperature
        logps.append(token_logps(logits, y))
        if with_entropy:
            entropy.append(entropy_from_logits(logits))
    return torch.cat(logps), torch.cat(entropy) if with_entropy else None


class RowGradLogps(torch.autograd.Function):
    """log π(y_t) [N] with each row's gradient g_t = ∂ log π(y_t)/∂h_t computed in the forward (frozen LM head)."""

    @staticmethod
    def forward(ctx, hidden, targets, model, temperature, with_entropy, rows):
        logps, grads, entropy = [], [], []
        for h, y in zip(hidden.split(rows), targets.split(rows), strict=True):
            with torch.enable_grad():
                h = h.detach().requires_grad_()
                logits = lm_logits(model, h) / temperature
                lp = token_logps(logits, y)
                (g,) = torch.autograd.grad(lp.sum(), h)  # row t of the sum's gradient is ∂ log π(y_t)/∂h_t
            logps.append(lp.detach())
            grads.append(g.float())
            if with_entropy:
                entropy.append(entropy_from_logits(logits.detach()))
        ctx.save_for_backward(torch.cat(grads))
        ctx.dtype = hidden.dtype
        out = torch.cat(logps)
        entropy = torch.cat(entropy) if with_entropy else torch.zeros_like(out)
        ctx.mark_non_differentiable(entropy)  # a statistic: a loss on it would get no gradient, so it may not have one
        return out, entropy

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logps, _grad_entropy):
        (grads,) = ctx.saved_tensors
        return (grad_logps[:, None] * grads).to(ctx.dtype), None, None, None, None, None
