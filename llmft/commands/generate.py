"""`llmft generate`: answers to every row of a prompts file, written back with the answer fields."""

from __future__ import annotations

import json
from pathlib import Path

from llmft.checkpoint import atomic_write_text
from llmft.config import GenerateConfig, ModelConfig
from llmft.data.records import prompt_messages, read_records
from llmft.models.loading import load_chat, load_model, resolve_device, resolve_dtype
from llmft.models.sources import resolve_source
from llmft.rollout.engine_model import vllm_answers
from llmft.rollout.generation import generate


def run_generate(cfg: GenerateConfig) -> list[dict]:
    """The `llmft generate` command: every prompt row comes back with its answer fields added."""
    records = read_records(cfg.prompts)[: cfg.limit]
    source = resolve_source(cfg.model)
    chat = load_chat(source)
    prompts = [chat.prompt_ids(prompt_messages(r), r.where) for r in records]
    device = resolve_device(cfg.device)
    dtype, model_cfg = resolve_dtype(cfg.dtype, device), ModelConfig(name=cfg.model, kernels=cfg.kernels)
    if cfg.sampling.engine == "vllm":
        gens = vllm_answers(source, model_cfg, chat, prompts, cfg.sampling, dtype, device)
    else:
        gens = generate(load_model(source, dtype, device, model_cfg), chat, prompts, cfg.sampling)
    rows = [{**r.row, "response": g.text, "finished": g.finished, "response_tokens": len(g.answer_ids)}
            for r, g in zip(records, gens, strict=True)]
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    if cfg.out:
        Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(cfg.out), text)
    else:
        print(text, end="")
    return rows
