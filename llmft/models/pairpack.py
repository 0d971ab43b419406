"""Preference pairs packed with their prompt once: per pair [prompt | chosen | rejected] in one padding-free sequence.

    positions   prompt 0 … P−1, chosen P … P+C−1, rejected P … P+R−1: each answer continues its prompt
    attention   causal within a segment; both answers see their prompt; the rejected answer never sees the chosen
                one; nothing crosses pairs             → one [1, 1, N, N] mask given to the model as is

The states of the answers are those of the two padded rows prompt+chosen and prompt+rejected (tested to 1e-5 on every
model family), with the prompt computed once instead of twice and no padding computed at all. Used by dpo and reward
with `data.packing: true` where the attention takes such a mask (sdpa, eager) and no sliding window is shorter than
the sequence; elsewhere those stages pack each row on its own (`forward.packed_states`).
"""

from __future__ import annotations

import torch

from llmft.data.preferences import PROMPT, pack_pairs
from llmft.errors import ModelError
from llmft.models.adapters import unwrap
from llmft.models.forward import body_states, hidden_states, packed_states, probe_tolerance


def can_pack_pairs(model, batch: dict) -> bool:
    """Whether the model takes the packed pairs' mask: a packed batch, an attention that reads a given 4D mask
    (sdpa, eager), and no sliding window shorter than the packed sequence (one mask serves every layer)."""
    if "tree_ids" not in batch:
        return False
    config = unwrap(model).config.get_text_config()
    window = getattr(config, "sliding_window", None)
    return (getattr(config, "_attn_implementation", None) in ("sdpa", "eager")
            and not (window and batch["tree_ids"].shape[1] > window))


def pair_mask(pair: torch.Tensor, segment: torch.Tensor, dtype: torch.dtype, additive: bool) -> torch.Tensor:
    """[1, 1, N, N]: query q sees key j when j ≤ q, both belong to the same pair, and j is in q's segment or the
    prompt. Boolean (True = attend) for sdpa, additive (0 or the dtype's minimum) for eager attention."""
    n = len(pair)
    q, j = torch.arange(n, device=pair.device)[:, None], torch.arange(n, device=pair.device)[None, :]
    allowed = (j <= q) & (pair[:, None] == pair[None, :]) & (
        (segment[:, None] == segment[None, :]) | (segment[None, :] == PROMPT))
    if not additive:
        return allowed[None, None]
    return torch.zeros(n, n, dtype=dtype, device=pair.device).masked_fill(~allowed, torch.finfo(dtype).min)[None, None]


def pair_states(model, batch: dict) -> torch.Tensor:
    """Hidden states [N, d] of the packed pairs (`batch` on the model's device)."""
    base = unwrap(model)
    dtype = next(p for p in base.parameters() if p.is_floating_point()).dtype
    eager = base.config.get_text_config()._attn_implementation == "eager"
    mask = pair_mask(batch["tree_pair"], batch["tree_segment"], dtype, additive=eager)
    return body_states(model, batch["tree_ids"], mask, batch["tree_positions"])[0]


def pair_probe(model, ids: torch.Tensor) -> float:
    """The largest difference between a pair packed with its prompt once (as above) and its two rows, on the
    answers' states; 0 where the model does not take the packed pairs' mask."""
    from types import SimpleNamespace

    prompt, chosen, rejected = ids[1, :3].tolist(), ids[1, 3:5].tolist(), ids[0, :3].tolist()
    batch = {k: v.to(ids.device) for k, v in pack_pairs([SimpleNamespace(prompt_ids=prompt, chosen_ids=chosen,
                                                                         rejected_ids=rejected)]).items()}
    if not can_pack_pairs(model, batch):
        return 0.0
    tree = pair_states(model, batch)  # [8, d]: prompt 0-2, chosen 3-4, rejected 5-7
    rows = [torch.tensor([prompt + chosen], device=ids.device), torch.tensor([prompt + rejected], device=ids.device)]
    own = [hidden_states(model, r, torch.ones_like(r))[0, 3:] for r in rows]
    return max(float((tree[3:5] - own[0]).abs().max()), float((tree[5:8] - own[1]).abs().max()))


@torch.no_grad()
def check_packing(model) -> None:
    """Refuse data.packing for a model whose attention does not keep packed rows apart (a model with its own masks,
    remote code): on a probe of two rows, packed and padded states must agree."""
    base = unwrap(model)
    device, training = next(base.parameters()).device, base.training
    vocab = base.config.get_text_config().vocab_size
    ids = (torch.arange(10, device=device).view(2, 5) * 7 + 3) % vocab
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], device=device)
    base.eval()
    try:
        padded, packed = hidden_states(model, ids, mask), packed_states(model, ids, mask)
        pairs = pair_probe(model, ids)
    finally:
        base.train(training)
    gap, scale = float((padded - packed)[mask.bool()].abs().max()), float(padded.abs().max())
    if max(gap, pairs) > probe_tolerance(base) * (1 + scale):
        raise ModelError(f"data.packing: this model's attention crosses packed rows (largest difference "
                         f"{max(gap, pairs):.3g} on a probe); set data.packing: false")
