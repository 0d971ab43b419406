"""What the vLLM engine's tests share: whether vLLM is here, and tiny models whose attention vLLM's CPU kernels run
(head_dim 32: its CPU attention has no kernel for the head_dim 8 of the other tiny models)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def require_vllm() -> str:
    """The engine's interpreter; skipped where vLLM is not set up, failed where it must be (scripts/test.sh sets
    LLMFT_REQUIRE_VLLM=1 after scripts/setup_vllm.sh)."""
    from llmft.errors import ConfigError
    from llmft.rollout.vllm_engine import vllm_python

    try:
        return vllm_python(None)
    except ConfigError as e:
        if os.environ.get("LLMFT_REQUIRE_VLLM") == "1":
            raise
        pytest.skip(f"vLLM is not set up here ({e}); scripts/setup_vllm.sh")


def build_llama(path: Path, seed: int = 0) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.helpers.tiny import build_tokenizer

    tok = build_tokenizer()
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, initializer_range=0.2)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


VLLM_SHAPE = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2, "num_key_value_heads": 1}


def build_family(f, path: Path, seed: int = 0) -> Path:
    """A family's tiny model (tests/helpers/families) with heads of 32."""
    import json

    import torch
    from transformers import AutoModelForCausalLM

    from tests.helpers.families import build_config, build_tokenizer, generation_config

    tok = build_tokenizer(f)
    config = build_config(f, tok)
    for key, value in VLLM_SHAPE.items():
        setattr(config, key, value)
    if getattr(config, "head_dim", None):
        config.head_dim = 32
    if getattr(config, "query_pre_attn_scalar", None):
        config.query_pre_attn_scalar = 32
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tok.save_pretrained(path)
    (path / "generation_config.json").write_text(json.dumps(generation_config(f, tok), indent=1))
    return path
