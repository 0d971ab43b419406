"""The forward machinery every stage's log-probs go through: hidden states under left or right padding, a
prompt shared by its answers (its KV cache computed once), padding-free packed rows, and the LM head in fp32
(`lm_logits`, with the model's own final transform)."""

from __future__ import annotations

import functools

import torch

from llmft import distributed
from llmft.errors import ModelError
from llmft.models.adapters import unwrap


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only, so left- and right-padded rows see the same positions."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def hidden_states(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, start: int = 0,
                  owners: torch.Tensor | None = None, packed: bool = False,
                  positions: torch.Tensor | None = None) -> torch.Tensor:
    """Last-layer hidden states [B, T − start, d] of columns `start`… of the transformer body, without the LM head;
    positions are counted over real tokens, so left and right padding give the same states. Under FSDP the call goes
    through the whole model (which gathers its sharded weights first), asking for the logits of one position only.

    `owners` [B] (optional) names, for each row, the first row whose columns before `start` are the same (G answers
    to one prompt): those columns then run once per owner, and their keys and values are shared by its rows
    (`shared_prefix_states`). With `packed` the rows' real tokens run as one padding-free sequence
    (`packed_states`; padding positions come back as 0). Either way the states and gradients are the same up to
    float rounding. With `positions` (blocks of several examples: `examples.collate_blocks`) each row runs as it is, the
    model keeping attention within each example from where the positions restart."""
    if positions is not None:  # flash kernels find packed examples only in a batch of one row: flatten for them
        if "flash" in str(getattr(unwrap(model).config, "_attn_implementation", "")):
            return packed_states(model, input_ids, attention_mask, positions)[:, start:]
        return body_states(model, input_ids, None, positions)[:, start:]
    if owners is not None and start > 0 and can_share_prefix(model):
        return shared_prefix_states(model, input_ids, attention_mask, start, owners)
    if packed and not bool(attention_mask.all()):
        return packed_states(model, input_ids, attention_mask)[:, start:]
    return body_states(model, input_ids, attention_mask, position_ids(attention_mask))[:, start:]


def body_states(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                positions: torch.Tensor) -> torch.Tensor:
    if distributed.fsdp():
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=False,
                    output_hidden_states=True, logits_to_keep=1)
        return out.hidden_states[-1]
    return model_body(model)(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                             use_cache=False).last_hidden_state


def packed_states(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  positions: torch.Tensor | None = None) -> torch.Tensor:
    """Hidden states [B, T, d] computed without padding: the real tokens of all rows run as one sequence [1, N] whose
    positions restart at each row (or wherever `positions` restart), with no attention mask; transformers then finds
    the rows from the positions and keeps attention within each (its packed-sequence mask). Padding positions are
    0."""
    keep = attention_mask.bool()
    positions = position_ids(attention_mask) if positions is None else positions
    flat = body_states(model, input_ids[keep][None], None, positions[keep][None])[0]  # [N, d]
    return flat.new_zeros(*input_ids.shape, flat.shape[-1]).masked_scatter(keep[..., None], flat)


def probe_tolerance(base) -> float:
    """How far two ways of computing the same outputs may differ: fp32 rounding, or 16-bit's."""
    return 1e-3 if next(base.parameters()).dtype == torch.float32 else 2e-2


def shared_prefix_states(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, start: int,
                         owners: torch.Tensor) -> torch.Tensor:
    """Hidden states of columns `start`… [B, T − start, d], with columns …start − 1 run once per distinct owner
    (`prefix_cache`) and the suffix forward attending to their keys and values. For G answers to one prompt the
    prompt is encoded once instead of G times, in training and in the old/reference log-prob passes alike."""
    body, key = model_body(model), cache_kwarg(model_body(model))
    cache = prefix_cache(model, input_ids, attention_mask, start, owners)
    positions = position_ids(attention_mask)[:, start:]
    return body(input_ids=input_ids[:, start:], attention_mask=attention_mask, position_ids=positions,
                use_cache=True, **{key: cache}).last_hidden_state


def prefix_cache(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, start: int, owners: torch.Tensor):
    """The KV cache of columns …start − 1 for every row, computed on the owners' rows only: each row then takes
    its owner's keys and values (an index, so under autograd their gradients are summed back)."""
    from transformers import DynamicCache

    body, heads = model_body(model), torch.unique(owners)  # heads: the owner rows, sorted
    mask = attention_mask[heads, :start]
    try:
        cache = DynamicCache(config=body.config)  # given, not left to the model: some make none in train mode
    except TypeError:  # an older transformers
        cache = DynamicCache()
    body(input_ids=input_ids[heads, :start], attention_mask=mask, position_ids=position_ids(mask), use_cache=True,
         **{cache_kwarg(body): cache})
    if cache.get_seq_length() != start:
        raise ModelError(f"{type(body).__name__} did not fill the KV cache it was given ({cache.get_seq_length()} of "
                         f"{start} positions): the prompt cannot be shared. Please report it with `llmft env`")
    select_rows(cache, torch.searchsorted(heads, owners))  # row i ← its owner's keys and values
    return cache


def select_rows(cache, rows: torch.Tensor) -> None:
    """Row i of every layer's keys and values ← row rows[i], by `index_select`: its gradient sums the rows of each
    owner in a fixed order. (The cache's own `batch_select_indices` indexes, and the gradient of indexing with
    repeated rows accumulates in parallel on a CPU, in an order that changes from run to run: GRPO was not bitwise
    reproducible.) Layers of another kind select their own way."""
    try:
        from transformers.cache_utils import DynamicLayer
    except ImportError:  # an older transformers: no layer objects
        cache.batch_select_indices(rows)
        return
    for layer in cache.layers:
        if type(layer).batch_select_indices is DynamicLayer.batch_select_indices:
            layer.keys, layer.values = layer.keys.index_select(0, rows), layer.values.index_select(0, rows)
        else:
            layer.batch_select_indices(rows)


def prompt_owners(prompts: torch.Tensor, attention: torch.Tensor) -> torch.Tensor | None:
    """[B] for each row, the first row with the same (left-padded) prompt, or None when no two rows share one."""
    _, which = torch.unique(torch.cat([prompts, attention], 1), dim=0, return_inverse=True)  # [B] class ids
    if int(which.max()) + 1 == len(which):
        return None
    rows = torch.arange(len(which), device=which.device)
    first = torch.full_like(which, len(which)).scatter_reduce(0, which, rows, "amin")  # class → its first row
    return first[which]


def model_body(model):
    """The transformer body (embeddings and decoder layers, no LM head) under a PEFT wrapper or not."""
    base = unwrap(model)
    return getattr(base, base.base_model_prefix)


def cache_kwarg(body) -> str:
    """The name transformers gives the KV cache in forward and generate: `cache` from 5.x, `past_key_values`
    before."""
    return forward_cache_name(type(body))


@functools.cache
def forward_cache_name(cls) -> str:
    import inspect

    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


def can_share_prefix(model) -> bool:
    """Whether a prefix's KV cache can be shared: not under FSDP (the call goes through the wrapped model), and not
    while gradient checkpointing recomputes layers (transformers drops the cache of a checkpointed layer)."""
    if distributed.fsdp():
        return False
    body = model_body(model)
    checkpointed = any(getattr(m, "gradient_checkpointing", False) for m in body.modules())
    return not (checkpointed and (torch.is_grad_enabled() or body.training))


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last real token [B], under left or right padding."""
    width = attention_mask.shape[1]
    return (attention_mask * torch.arange(width, device=attention_mask.device)).argmax(-1)


def lm_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """The LM head on hidden states, in fp32, as the model's own forward computes it: [..., d] → [..., V].
    Every stage's log-probs come through here, so that a model's final transform (Gemma-2's soft-capping
    c·tanh(z/c)) is never forgotten in one of them."""
    base = unwrap(model)
    logits = base.get_output_embeddings()(hidden).float()
    config = base.config.get_text_config()
    if scale := getattr(config, "logit_scale", None):  # Cohere
        logits = logits * scale
    if scaling := getattr(config, "logits_scaling", None):  # Granite
        logits = logits / scaling
    softcap = getattr(config, "final_logit_softcapping", None)  # Gemma-2
    return torch.tanh(logits / softcap) * softcap if softcap else logits


@torch.no_grad()
def check_lm_head(model) -> None:
    """Refuse an architecture whose forward transforms its logits in a way `lm_logits` does not: on a few tokens,
    the model's own logits and lm_logits(hidden states) must agree, or every stage would train (and PPO sample and
    score) different distributions."""
    base = unwrap(model)
    device, training = next(base.parameters()).device, base.training
    ids = torch.arange(4, device=device)[None] % base.config.get_text_config().vocab_size
    mask = torch.ones_like(ids)
    base.eval()  # no dropout: the check must not draw from the random stream training uses
    try:
        own = base(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=False).logits.float()
        ours = lm_logits(model, hidden_states(model, ids, mask))
    finally:
        base.train(training)
    gap, scale = float((own - ours).abs().max()), float(own.abs().max())
    if gap > probe_tolerance(base) * (1 + scale):
        raise ModelError(f"this model's forward transforms its logits in a way llmft does not apply (largest "
                         f"difference {gap:.3g} on a probe): its log-probs would not be the model's. Please report it "
                         f"with `llmft env` and the model's config.json")


def autocast(device: torch.device, dtype: torch.dtype):
    """bf16/fp16 autocast on CUDA; a no-op context on CPU (fp32)."""
    enabled = device.type == "cuda" and dtype in (torch.bfloat16, torch.float16)
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=enabled)
