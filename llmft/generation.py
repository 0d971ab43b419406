"""Batched generation: prompts → left-padded batches → sampling with the KV cache → responses cut at EOS.

This is the rollout primitive that `llmft generate`, `llmft eval` and (later) PPO share. It sits
behind `generate(model, tokenizer, prompts, sampling)` (sampling: a `config.SamplingConfig`)
so that another engine can be plugged in later.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from llmft.checkpoint import atomic_write_text
from llmft.config import GenerateConfig, ModelConfig, SamplingConfig
from llmft.data import Example, Record, collate, read_records, render
from llmft.errors import DataError
from llmft.modeling import load_model, load_tokenizer, resolve_device, resolve_dtype, resolve_source


@dataclass
class Generation:
    prompt_ids: list[int]
    response_ids: list[int]  # cut after the first EOS (EOS included when there is one)
    text: str  # the response decoded without special tokens
    finished: bool  # ended with EOS rather than running into max_new_tokens


def prompt_messages(rec: Record) -> list[dict] | str:
    """A prompt row: {prompt: str | [messages]} or {messages: [...]} (a trailing assistant turn is dropped)."""
    row, where = rec.row, rec.where
    if "prompt" in row:
        value = row["prompt"]
    elif "messages" in row:
        value = row["messages"]
        if isinstance(value, list) and value and isinstance(value[-1], dict) and value[-1].get("role") == "assistant":
            value = value[:-1]
    else:
        raise DataError(f"{where}: a prompt row needs a 'prompt' (or 'messages') field; it has {sorted(row)}")
    if isinstance(value, str) and value.strip():
        return [{"role": "user", "content": value}]
    if isinstance(value, list) and value and all(isinstance(m, dict) and "role" in m for m in value):
        return value
    raise DataError(f"{where}: the prompt must be a non-empty string or a list of chat messages")


def encode_prompt(tok, messages: list[dict], where: str) -> list[int]:
    """Token ids of a prompt, ready for the model to answer (chat template with the generation prompt)."""
    if tok.chat_template:
        return tok(render(tok, messages, True, where), add_special_tokens=False)["input_ids"]
    return tok("\n".join(m["content"] for m in messages), add_special_tokens=True)["input_ids"]


@torch.no_grad()
def generate(model, tok, prompts: list[list[int]], sampling: SamplingConfig) -> list[Generation]:
    """Generate one response per prompt, in batches of similar length, returned in the prompts' order."""
    model.eval()
    device = next(model.parameters()).device
    torch.manual_seed(sampling.seed)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # less padding per batch
    results: dict[int, Generation] = {}
    for start in range(0, len(order), sampling.batch_size):
        idx = order[start:start + sampling.batch_size]
        batch = collate([Example(prompts[i], prompts[i]) for i in idx], tok.pad_token_id, side="left")
        out = model.generate(input_ids=batch["input_ids"].to(device),
                             attention_mask=batch["attention_mask"].to(device), **generate_kwargs(tok, sampling))
        width = batch["input_ids"].shape[1]
        for row, i in enumerate(idx):
            results[i] = cut_at_eos(tok, prompts[i], out[row, width:].tolist())
    return [results[i] for i in range(len(prompts))]


def generate_kwargs(tok, s: SamplingConfig) -> dict:
    kwargs = {"max_new_tokens": s.max_new_tokens, "pad_token_id": tok.pad_token_id,
              "eos_token_id": tok.eos_token_id, "use_cache": True}
    if s.temperature <= 0:
        return {**kwargs, "do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    return {**kwargs, "do_sample": True, "temperature": s.temperature, "top_p": s.top_p, "top_k": s.top_k}


def cut_at_eos(tok, prompt_ids: list[int], ids: list[int]) -> Generation:
    """Keep the response up to and including its first EOS; what follows is padding."""
    eos = tok.eos_token_id
    finished = eos in ids
    ids = ids[: ids.index(eos) + 1] if finished else ids
    return Generation(prompt_ids, ids, tok.decode(ids, skip_special_tokens=True).strip(), finished)


def run_generate(cfg: GenerateConfig) -> list[dict]:
    """The `llmft generate` command: every prompt row comes back with its response fields added."""
    records = read_records(cfg.prompts)[: cfg.limit]
    source = resolve_source(cfg.model)
    tok = load_tokenizer(source)
    prompts = [encode_prompt(tok, prompt_messages(r), r.where) for r in records]
    device = resolve_device(cfg.device)
    model = load_model(source, resolve_dtype(cfg.dtype, device), device, ModelConfig(name=cfg.model))
    gens = generate(model, tok, prompts, cfg.sampling)
    rows = [{**r.row, "response": g.text, "finished": g.finished, "response_tokens": len(g.response_ids)}
            for r, g in zip(records, gens, strict=True)]
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    if cfg.out:
        Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(cfg.out), text)
    else:
        print(text, end="")
    return rows
