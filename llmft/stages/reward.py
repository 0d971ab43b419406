"""Reward modelling: learn a scalar r(x, y) that ranks the chosen answer of each pair above the rejected one.

    setup  → model source (usually the SFT output, its adapter merged), preference pairs, step plan
    model  → a fresh LoRA adapter + a scalar head on the last real token; dropout off
    train  → per step: chosen and rejected of every pair in one forward → r_c, r_r → pairwise loss
             (Bradley–Terry −log σ(r_c − r_r − m), or hinge), accumulated over micro-batches
    save   → checkpoint-N/ (adapter, head, optimizer, ...), then the final adapter, head, tokenizer, manifest
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import torch
from rich.table import Table

from llmft import data as D
from llmft import preferences as P
from llmft.config import RewardConfig
from llmft.loop import Stage, run_stage
from llmft.losses import pairwise_accuracy, reward_loss
from llmft.modeling import (
    add_lora,
    disable_dropout,
    load_model,
    resolve_model,
)
from llmft.reward_model import RewardModel
from llmft.training import (
    StepPlan,
    autocast,
    console,
    plan_steps,
    require_dropout_off,
)


@dataclass
class Setup:
    cfg: RewardConfig
    source: Any
    tokenizer: Any
    train: P.PairSet
    eval: P.PairSet | None
    plan: StepPlan
    device: torch.device
    dtype: torch.dtype


# --------------------------------------------------------------------------------------------- setup
def setup(cfg: RewardConfig) -> Setup:
    require_dropout_off(cfg, "reward", "r_c and r_r must come from the same network")
    source, tok, device, dtype = resolve_model(cfg.model, cfg.device)
    train_rows, eval_rows = D.read_splits(cfg.data, cfg.seed)
    fmt = P.detect_format(train_rows, cfg.data.format)
    train_set, eval_set = [P.tokenize_pairs(rows, tok, fmt, cfg.data.max_length) if rows else None
                           for rows in (train_rows, eval_rows)]
    for name, ps in (("train", train_set), ("eval", eval_set)):
        if ps and ps.identical:
            console.print(f"[yellow]warning: dropped {ps.identical} {name} pairs whose chosen and rejected "
                          f"answers are identical")
    plan = plan_steps(len(train_set.pairs), cfg.train.batch_size, cfg.train.grad_accum,
                      cfg.train.epochs, cfg.train.max_steps, cfg.seed)
    return Setup(cfg, source, tok, train_set, eval_set, plan, device, dtype)


def show_plan(s: Setup) -> None:
    t = Table(title=f"llmft reward → {s.cfg.output_dir}", show_header=False)
    t.add_row("model", f"{s.cfg.model.name} ({s.source.kind}: {s.source.path})")
    t.add_row("device / dtype", f"{s.device} / {str(s.dtype).removeprefix('torch.')}")
    for name, ps in (("train", s.train), ("eval", s.eval)):
        if ps:
            t.add_row(f"{name} pairs", f"{len(ps.pairs)} pairs from {ps.rows} rows, {ps.tokens} tokens; dropped "
                      f"{ps.identical} identical, {ps.too_long} longer than {s.cfg.data.max_length}"
                      + ("; per-pair margins" if ps.has_margin and s.cfg.loss.use_margin_column else ""))
    tr, loss = s.cfg.train, s.cfg.loss
    t.add_row("steps", f"{s.plan.total} optimizer steps ({s.plan.steps_per_epoch}/epoch) × "
              f"{tr.batch_size} pairs × {tr.grad_accum} accumulation")
    t.add_row("loss", f"{loss.type}, margin {loss.margin}, centering {loss.center_coef}")
    t.add_row("LoRA", f"r={s.cfg.lora.r} alpha={s.cfg.lora.alpha} targets={s.cfg.lora.target_modules}; "
              f"scalar head on the last token")
    console.print(t)


# --------------------------------------------------------------------------------------------- train
def run(cfg: RewardConfig, dry_run: bool = False) -> dict | None:
    """The `llmft reward` command: returns the final metrics (None for a dry run or a finished run)."""
    return run_stage("reward", cfg, sys.modules[__name__], dry_run)


def build_model(s: Setup) -> RewardModel:
    lm = load_model(s.source, s.dtype, s.device, s.cfg.model)
    model = RewardModel(add_lora(lm, s.cfg.lora, s.cfg.train.gradient_checkpointing))
    disable_dropout(model)
    return model


def stage(s: Setup, model: RewardModel) -> Stage:
    pad, loss_cfg = s.tokenizer.pad_token_id, s.cfg.loss

    def step(micro_batches: list[list[int]]) -> tuple[dict, dict]:
        num_pairs = sum(len(mb) for mb in micro_batches)
        total, chosen, rejected, tokens = 0.0, [], [], 0
        for mb in micro_batches:
            batch = P.collate_pairs([s.train.pairs[i] for i in mb], pad, default_margin=loss_cfg.margin)
            r_c, r_r = rewards(model, batch, s.device, s.dtype)
            loss = reward_loss(r_c, r_r, num_pairs, loss_cfg.type, margins(batch, loss_cfg, s.device),
                               loss_cfg.center_coef)
            loss.backward()
            total += float(loss.detach())
            chosen.append(r_c.detach())
            rejected.append(r_r.detach())
            tokens += int(batch["attention_mask"].sum())
        return {"loss": total, **pair_metrics(torch.cat(chosen), torch.cat(rejected))}, \
            {"tokens": tokens, "pairs": num_pairs}

    def run_eval() -> dict:
        return evaluate(model, s.eval, s.cfg, pad, s.device, s.dtype)

    return Stage("reward", s.cfg, s.plan, s.device, step, run_eval if s.eval else None,
                 shown=("loss", "accuracy", "lr", "pairs_per_s", "eval/accuracy"))


def rewards(model: RewardModel, batch: dict, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """r_c [B], r_r [B]: chosen and rejected of every pair scored in one forward pass."""
    with autocast(device, dtype):
        r = model(batch["input_ids"].to(device), batch["attention_mask"].to(device))  # [2B]
    return r.chunk(2)


def margins(batch: dict, loss_cfg, device) -> torch.Tensor | float:
    return batch["margin"].to(device) if loss_cfg.use_margin_column else loss_cfg.margin


def pair_metrics(r_c: torch.Tensor, r_r: torch.Tensor) -> dict[str, float]:
    both = torch.cat([r_c, r_r]).float()
    return {"accuracy": pairwise_accuracy(r_c, r_r), "margin": float((r_c - r_r).mean()),
            "reward_mean": float(both.mean()), "reward_std": float(both.std()) if both.numel() > 1 else 0.0}


@torch.no_grad()
def evaluate(model: RewardModel, data: P.PairSet, cfg: RewardConfig, pad: int, device, dtype) -> dict:
    """Loss, accuracy, margin and reward statistics over every held-out pair."""
    model.eval()
    chosen, rejected, loss = [], [], 0.0
    for i in range(0, len(data.pairs), cfg.train.batch_size):
        batch = P.collate_pairs(data.pairs[i:i + cfg.train.batch_size], pad, default_margin=cfg.loss.margin)
        r_c, r_r = rewards(model, batch, device, dtype)
        loss += float(reward_loss(r_c, r_r, len(data.pairs), cfg.loss.type, margins(batch, cfg.loss, device),
                                  cfg.loss.center_coef))
        chosen.append(r_c)
        rejected.append(r_r)
    model.train()
    return {"eval/loss": loss, **{f"eval/{k}": v for k, v in pair_metrics(torch.cat(chosen),
                                                                             torch.cat(rejected)).items()}}
