"""The weights the vLLM engine loads: the policy's base exactly as the trainer computes it, as a plain model folder.

A local, embedded or GGUF-converted model in full precision is its own folder. Anything the trainer builds in memory
— a stage output (its adapter merged into its base), a QLoRA base (quantised and de-quantised: the weights the 4-bit
trainer computes with, so no adapter is ever merged into 4-bit weights), a hub model — is written once into the
llmft cache (`engine/<key>`, keyed by what it was made from) and reused by later runs.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from llmft.checkpoint import atomic_dir, content_hash
from llmft.console import console
from llmft.models import quantization
from llmft.models.loading import load_weights
from llmft.models.sources import ModelSource, cache_dir


def engine_model_dir(source: ModelSource, model_cfg, dtype: torch.dtype, tokenizer) -> Path:
    """A folder vLLM can load that holds the weights the trainer's base has (before any fresh adapter)."""
    quantized = getattr(model_cfg, "quantization", None)
    if source.kind in ("local", "embedded", "gguf") and not quantized:
        return Path(source.path)
    key = {"model": source.resolved, "kind": source.kind, "quantization": quantization.record(quantized, dtype)}
    if source.kind == "stage":
        key["chain"] = stage_chain(source)
    target = cache_dir() / "engine" / hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    if not (target / "config.json").is_file():
        console.print(f"writing the engine's copy of {source.name} to {target} (once)")
        model = load_weights(source, torch.float32, model_cfg)
        if quantized:
            model = quantization.round_trip(model, quantized, dtype)
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_dir(target) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            (tmp / "llmft-engine.json").write_text(json.dumps(key, indent=1))
        del model
    return target


def stage_chain(source: ModelSource) -> list[str]:
    """The content hashes of a chain of stage outputs down to its root: the key changes when any adapter does."""
    chain = []
    while source.kind == "stage":
        chain.append(content_hash(Path(source.path)))
        source = source.base
    return [source.resolved, *chain]


def vllm_answers(source: ModelSource, model_cfg, chat, prompts: list[list[int]], sampling, dtype: torch.dtype,
                 device: torch.device) -> list:
    """`generate`'s answers from a vLLM engine started for them and stopped after (llmft generate / eval with
    engine: vllm); its log goes to the llmft cache (engine/logs/)."""
    from llmft.rollout.vllm_engine import VLLMEngine

    model_dir = engine_model_dir(source, model_cfg, dtype, chat.tokenizer)
    log = cache_dir() / "engine" / "logs" / f"{os.getpid()}.log"
    longest = max(len(p) for p in prompts) + sampling.max_new_tokens + 1
    engine = VLLMEngine.start(model_dir, chat, dtype, device, sampling.vllm, log, longest)
    try:
        return engine.generate(prompts, sampling)
    finally:
        engine.close()
