"""LoRA adapters on a loaded model: a fresh adapter (with the rows of tokens a chat template added), the
stages' policy-with-reference, dropout off, parameter counts."""

from __future__ import annotations

from typing import Any

import torch

from llmft.errors import ConfigError, ModelError
from llmft.models import quantization


def unwrap(model):
    """The transformers model under a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def add_lora(model, lora, gradient_checkpointing: bool = False, new_tokens: list[int] | tuple = ()):
    """A fresh LoRA adapter on `model`; with `new_tokens` (ids a chat template added), their embedding and LM-head
    rows are trained too (peft's trainable tokens), starting from the mean of the existing rows."""
    from peft import LoraConfig, get_peft_model

    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=lora.target_modules, task_type="CAUSAL_LM",
                        trainable_token_indices=grow_embeddings(model, list(new_tokens)) if new_tokens else None)
    try:
        return get_peft_model(model, config)
    except ValueError as e:
        raise ModelError(f"lora.target_modules: {e}") from None


def grow_embeddings(model, new_tokens: list[int]) -> dict[str, list[int]]:
    """Make room for `new_tokens` (their rows start at the mean of the existing ones) and name the modules whose
    rows peft should train: the input embedding, and the LM head when it is not tied to it."""
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    old = emb.num_embeddings
    if max(new_tokens) >= old:
        model.resize_token_embeddings(max(new_tokens) + 1, mean_resizing=False)
        emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    with torch.no_grad():
        for weight in {id(w): w for w in (emb.weight, head.weight)}.values():
            weight[new_tokens] = weight[:min(old, weight.shape[0])].mean(0)
    names = {m: n.rsplit(".", 1)[-1] for n, m in model.named_modules()}
    tied = head.weight is emb.weight
    return {names[emb]: new_tokens, **({} if tied else {names[head]: new_tokens})}




def disable_dropout(model) -> None:
    """Dropout off everywhere: reward and RL stages compare outputs of the same network, so no randomness.
    Covers nn.Dropout modules (LoRA's included) and the float rates attention layers read at run time."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        for name in ("attention_dropout", "attn_dropout", "dropout"):
            if isinstance(getattr(m, name, None), float):
                setattr(m, name, 0.0)


def parameter_counts(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(quantization.numel(p) for p in model.parameters())


def require_dropout_off(cfg: Any, stage: str, why: str) -> None:
    if cfg.lora.dropout:
        raise ConfigError(f"lora.dropout: the {stage} stage trains with dropout off ({why}); set it to 0")
