"""Supervised fine-tuning: maximise the likelihood of the completion (assistant) tokens.

    setup  → resolve model and data, plan the steps, prepare the output directory, build LoRA + AdamW
    train  → per step: micro-batches → token-mean cross entropy over the whole accumulated batch → clip → step
    save   → periodic resumable checkpoint-N/, then the final adapter, tokenizer and manifest
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.table import Table

from llmft import data as D
from llmft.checkpoint import save_final
from llmft.config import SFTConfig, to_yaml
from llmft.loop import Stage, fit, manifest, restore
from llmft.losses import sft_loss
from llmft.modeling import (
    add_lora,
    load_model,
    load_tokenizer,
    parameter_counts,
    resolve_device,
    resolve_dtype,
    resolve_source,
    supervised_logits,
)
from llmft.training import (
    StepPlan,
    autocast,
    check_output_dir,
    configure_backend,
    console,
    finished_already,
    make_optimizer,
    make_scheduler,
    plan_steps,
    prepare_output_dir,
    seed_everything,
)


@dataclass
class Setup:
    cfg: SFTConfig
    source: Any
    tokenizer: Any
    train: D.TokenizedSet
    eval: D.TokenizedSet | None
    plan: StepPlan
    device: torch.device
    dtype: torch.dtype


# --------------------------------------------------------------------------------------------- setup
def setup(cfg: SFTConfig) -> Setup:
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.model.dtype, device)
    source = resolve_source(cfg.model.name, cfg.model.revision)
    tok = load_tokenizer(source, cfg.model.trust_remote_code, cfg.model.revision)
    train_set, eval_set = load_data(cfg, tok)
    plan = plan_steps(len(train_set.examples), cfg.train.batch_size, cfg.train.grad_accum,
                      cfg.train.epochs, cfg.train.max_steps, cfg.seed)
    return Setup(cfg, source, tok, train_set, eval_set, plan, device, dtype)


def load_data(cfg: SFTConfig, tok) -> tuple[D.TokenizedSet, D.TokenizedSet | None]:
    d = cfg.data
    train_rows = D.read_records(d.train, d.split)
    eval_rows = D.read_records(d.eval, d.split) if d.eval else []
    if not d.eval:
        train_rows, eval_rows = D.split_eval(train_rows, d.eval_fraction, cfg.seed)
    fmt = D.detect_format(train_rows, d.format)
    train_set = D.tokenize_records(train_rows, tok, fmt, d.max_length, d.loss_on)
    eval_set = D.tokenize_records(eval_rows, tok, fmt, d.max_length, d.loss_on) if eval_rows else None
    return train_set, eval_set


def show_plan(s: Setup) -> None:
    t = Table(title=f"llmft sft → {s.cfg.output_dir}", show_header=False)
    t.add_row("model", f"{s.cfg.model.name} ({s.source.kind}: {s.source.path})")
    t.add_row("device / dtype", f"{s.device} / {str(s.dtype).removeprefix('torch.')}")
    for name, ts in (("train", s.train), ("eval", s.eval)):
        if ts:
            t.add_row(f"{name} data", f"{len(ts.examples)} examples, {ts.tokens} tokens "
                      f"({ts.supervised} supervised); {ts.truncated} truncated to {s.cfg.data.max_length}, "
                      f"{ts.dropped} dropped with nothing to train on")
    tr = s.cfg.train
    t.add_row("steps", f"{s.plan.total} optimizer steps ({s.plan.steps_per_epoch}/epoch) × "
              f"{tr.batch_size} examples × {tr.grad_accum} accumulation")
    t.add_row("LoRA", f"r={s.cfg.lora.r} alpha={s.cfg.lora.alpha} dropout={s.cfg.lora.dropout} "
              f"targets={s.cfg.lora.target_modules}")
    console.print(t)


# --------------------------------------------------------------------------------------------- train
def run(cfg: SFTConfig, dry_run: bool = False) -> dict | None:
    """The `llmft sft` command: returns the final metrics (None for a dry run or a finished run)."""
    run_dir = Path(cfg.output_dir)
    if finished_already(cfg):
        console.print(f"[green]{run_dir} already holds this run, finished; nothing to do")
        return None
    check_output_dir(cfg)  # refuse early, before the model and data are loaded
    s = setup(cfg)
    show_plan(s)
    if dry_run:
        console.print(to_yaml(cfg), markup=False, highlight=False)
        return None
    resume_from = prepare_output_dir(cfg)
    configure_backend(s.device)
    seed_everything(cfg.seed)
    model = load_model(s.source, s.dtype, s.device, cfg.model)
    model = add_lora(model, cfg.lora, cfg.train.gradient_checkpointing)
    trainable, total = parameter_counts(model)
    console.print(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%)")
    optimizer = make_optimizer(model, cfg.train)
    scheduler = make_scheduler(optimizer, cfg.train, s.plan.total)
    start = restore(resume_from, model, optimizer, scheduler, s.plan.total)
    metrics = fit(stage(s, model), model, optimizer, scheduler, start, resume_from)
    save_final(run_dir, model, s.tokenizer, manifest("sft", cfg, s.source, metrics))
    console.print(f"[green]done: adapter, tokenizer and manifest in {run_dir}")
    return metrics


def stage(s: Setup, model) -> Stage:
    """One SFT step: collate its micro-batches and accumulate the token-mean cross entropy."""
    pad = s.tokenizer.pad_token_id

    def step(micro_batches: list[list[int]]) -> tuple[dict, dict]:
        batches = [D.collate([s.train.examples[i] for i in mb], pad) for mb in micro_batches]
        loss, tokens = accumulate(model, batches, s.device, s.dtype)
        return {"loss": loss}, {"tokens": tokens}

    def run_eval() -> dict:
        return {"eval/loss": evaluate(model, s.eval, s.cfg.train.batch_size, pad, s.device, s.dtype)}

    return Stage("sft", s.cfg, s.plan, s.device, step, run_eval if s.eval else None,
                 shown=("loss", "lr", "tokens_per_s", "eval/loss"))


def accumulate(model, batches: list[dict], device, dtype) -> tuple[float, int]:
    """Forward/backward every micro-batch of one optimizer step; return (token-mean loss, tokens seen)."""
    num_tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    total, seen = torch.zeros((), device=device), 0
    for b in batches:
        b = {k: v.to(device) for k, v in b.items()}
        with autocast(device, dtype):
            logits, targets = supervised_logits(model, b["input_ids"], b["attention_mask"], b["labels"])
        loss = sft_loss(logits, targets, num_tokens)
        loss.backward()
        total += loss.detach()
        seen += int(b["attention_mask"].sum())
    return float(total), seen


@torch.no_grad()
def evaluate(model, data: D.TokenizedSet, batch_size: int, pad: int, device, dtype) -> float:
    """Token-mean cross entropy over the whole eval set (dropout off)."""
    model.eval()
    nll, count = 0.0, 0
    for i in range(0, len(data.examples), batch_size):
        b = {k: v.to(device) for k, v in D.collate(data.examples[i:i + batch_size], pad).items()}
        with autocast(device, dtype):
            logits, targets = supervised_logits(model, b["input_ids"], b["attention_mask"], b["labels"])
        nll += float(sft_loss(logits, targets, 1))
        count += targets.numel()
    model.train()
    return nll / count
