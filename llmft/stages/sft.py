"""Supervised fine-tuning: maximise the likelihood of the completion (assistant) tokens.

    setup  → resolve model and data, plan the steps, prepare the output directory, build LoRA + AdamW
    train  → per step: micro-batches → token-mean cross entropy over the whole accumulated batch → clip → step
    save   → periodic resumable checkpoint-N/, then the final adapter, tokenizer and manifest
"""

from __future__ import annotations

import torch

from llmft import distributed
from llmft.config import SFTConfig
from llmft.console import console
from llmft.data.examples import TokenizedSet, collate, collate_blocks, pack_blocks, tokenize_records
from llmft.data.records import detect_format, read_splits
from llmft.maths.losses import sft_loss
from llmft.models.adapters import add_lora
from llmft.models.forward import autocast
from llmft.models.loading import load_model, resolve_model
from llmft.models.logprobs import supervised_logps
from llmft.models.pairpack import check_packing
from llmft.run.held_out import held_out_prompts, with_held_out
from llmft.run.loop import Recipe, Setup, Stage, StepContext, plan_table, run_stage, steps_row
from llmft.run.plan import plan_for


# --------------------------------------------------------------------------------------------- setup
def setup(cfg: SFTConfig) -> Setup:
    source, chat, device, dtype = resolve_model(cfg.model, cfg.device)
    train_rows, eval_rows = read_splits(cfg.data, cfg.seed)
    fmt = detect_format(train_rows, cfg.data.format)
    d = cfg.data
    train_set = tokenize_records(train_rows, chat, fmt, d.max_length, d.loss_on)
    eval_set = tokenize_records(eval_rows, chat, fmt, d.max_length, d.loss_on) if eval_rows else None
    if d.packing == "blocks":
        train_set.blocks = pack_blocks([len(e.input_ids) for e in train_set.examples], d.max_length)
    plan = plan_for(cfg, len(train_set.blocks or train_set.examples))
    return Setup(cfg, source, chat, train_set, eval_set, plan, device, dtype,
                 held_out=held_out_prompts(cfg, chat, eval_set is not None))


def show_plan(s: Setup) -> None:
    t = plan_table("sft", s)
    for name, ts in (("train", s.train), ("eval", s.eval)):
        if ts:
            t.add_row(f"{name} data", f"{len(ts.examples)} examples, {ts.tokens} tokens "
                      f"({ts.supervised} supervised); {ts.truncated} truncated to {s.cfg.data.max_length}, "
                      f"{ts.dropped} dropped with nothing to train on")
    if blocks := s.train.blocks:
        t.add_row("packing", f"{len(blocks)} blocks of up to {s.cfg.data.max_length} tokens, "
                  f"{s.train.tokens / (len(blocks) * s.cfg.data.max_length):.0%} full")
    steps_row(t, s, "blocks" if s.train.blocks else "examples")
    if s.held_out:
        s.held_out.plan_row(t, s.plan.num_steps)
    t.add_row("LoRA", f"r={s.cfg.lora.r} alpha={s.cfg.lora.alpha} dropout={s.cfg.lora.dropout} "
              f"targets={s.cfg.lora.target_modules}")
    console.print(t)


# --------------------------------------------------------------------------------------------- train
def run(cfg: SFTConfig, dry_run: bool = False) -> dict | None:
    """The `llmft sft` command: returns the final metrics (None for a dry run or a finished run)."""
    return run_stage(cfg, RECIPE, dry_run)


def build_model(s: Setup):
    model = load_model(s.source, s.dtype, s.device, s.cfg.model)
    if s.cfg.data.packing:
        check_packing(model)
    return add_lora(model, s.cfg.lora, s.cfg.train.gradient_checkpointing, s.chat.added_ids)


def stage(s: Setup, model) -> Stage:
    """One SFT step: collate its micro-batches and accumulate the token-mean cross entropy."""
    pad = s.chat.pad_id

    def step(micro_batches: list[list[int]], ctx: StepContext) -> tuple[dict, dict]:
        batches = [micro_batch(s.train, mb, pad) for mb in micro_batches]
        loss, tokens = accumulate(model, batches, s.device, s.dtype, bool(s.cfg.data.packing))
        examples = sum(len(s.train.blocks[b]) if s.train.blocks else 1 for mb in micro_batches for b in mb)
        return {"loss": loss, "grad_norm": ctx.update(loss)}, {"tokens": tokens, "examples": examples}

    def run_eval() -> dict:
        return {"eval/loss": evaluate(model, s.eval, s.cfg.train.batch_size, pad, s.device, s.dtype,
                                      bool(s.cfg.data.packing))}

    return with_held_out(Stage("sft", s.cfg, s.plan, s.device, step, run_eval if s.eval else None,
                               shown=("loss", "lr", "tokens_per_s", "eval/loss")), s, model)


def micro_batch(data: TokenizedSet, indices: list[int], pad: int) -> dict[str, torch.Tensor]:
    """The plan's indices are examples, or blocks of examples (data.packing: blocks)."""
    if data.blocks:
        return collate_blocks([[data.examples[i] for i in data.blocks[b]] for b in indices], pad)
    return collate([data.examples[i] for i in indices], pad)


def accumulate(model, batches: list[dict], device, dtype, packed: bool = False) -> tuple[float, int]:
    """Forward/backward every micro-batch of one optimizer step; return (this process's share of the step's
    token-mean loss, tokens seen). The mean is over the step's tokens on every data-parallel process."""
    num_tokens = distributed.global_sum(sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches))  # all ranks
    loss_sum, seen = torch.zeros((), device=device), 0
    for b in batches:
        b = {k: v.to(device) for k, v in b.items()}
        with autocast(device, dtype):
            logps = supervised_logps(model, b["input_ids"], b["attention_mask"], b["labels"], packed=packed,
                                     positions=b.get("position_ids"))
        loss = sft_loss(logps, num_tokens)
        loss.backward()
        loss_sum += loss.detach()
        seen += int(b["attention_mask"].sum())
    return float(loss_sum), seen


@torch.no_grad()
def evaluate(model, data: TokenizedSet, batch_size: int, pad: int, device, dtype, packed: bool = False) -> float:
    """Token-mean cross entropy over the whole eval set (dropout off)."""
    model.eval()
    nll, count = 0.0, 0
    for i in range(0, len(data.examples), batch_size):
        b = {k: v.to(device) for k, v in collate(data.examples[i:i + batch_size], pad).items()}
        with autocast(device, dtype):
            logps = supervised_logps(model, b["input_ids"], b["attention_mask"], b["labels"], packed=packed)
        nll += float(sft_loss(logps, 1))
        count += logps.numel()
    model.train()
    return nll / count


RECIPE = Recipe("sft", setup, show_plan, build_model, stage)
