"""Reward modelling: learn a scalar r(x, y) that ranks the chosen answer of each pair above the rejected one.

    setup  → model source (usually the SFT output, its adapter merged), preference pairs, step plan
    model  → a fresh LoRA adapter + a scalar head on the last real token; dropout off
    train  → per step: chosen and rejected of every pair in one forward → r_c, r_r → pairwise loss
             (Bradley–Terry −log σ(r_c − r_r − m), or hinge), accumulated over micro-batches
    save   → checkpoint-N/ (adapter, head, optimizer, ...), then the final adapter, head, tokenizer, manifest
"""

from __future__ import annotations

import torch

from llmft import distributed
from llmft.config import RewardConfig
from llmft.console import console
from llmft.data import preferences as P
from llmft.errors import ConfigError
from llmft.maths.losses import pairwise_accuracy, reward_loss
from llmft.models.adapters import add_lora, disable_dropout, require_dropout_off
from llmft.models.forward import autocast
from llmft.models.loading import load_model, resolve_model
from llmft.models.pairpack import can_pack_pairs, check_packing
from llmft.models.reward_model import RewardModel
from llmft.run.loop import Recipe, Setup, Stage, StepContext, plan_table, run_stage, steps_row
from llmft.run.plan import plan_for


# --------------------------------------------------------------------------------------------- setup
def setup(cfg: RewardConfig) -> Setup:
    require_dropout_off(cfg, "reward", "r_c and r_r must come from the same network")
    if cfg.loss.type == "hinge" and cfg.loss.margin == 0:
        raise ConfigError("loss.margin: the hinge max(0, m − (r_c − r_r)) at m = 0 is met by a model that gives every "
                          "answer the same score (zero loss, nothing learned); use m > 0 (1.0 is usual)")
    source, chat, device, dtype = resolve_model(cfg.model, cfg.device)
    train_set, eval_set = P.load_pair_sets(cfg, chat)
    plan = plan_for(cfg, len(train_set.pairs))
    return Setup(cfg, source, chat, train_set, eval_set, plan, device, dtype)


def show_plan(s: Setup) -> None:
    t = plan_table("reward", s)
    for name, ps in (("train", s.train), ("eval", s.eval)):
        if ps:
            t.add_row(f"{name} pairs", P.describe(ps, s.cfg.data.max_length)
                      + ("; per-pair margins" if ps.has_margin and s.cfg.loss.use_margin_column else ""))
    steps_row(t, s, "pairs")
    loss = s.cfg.loss
    t.add_row("loss", f"{loss.type}, margin {default_margin(loss)}, centering {loss.center_coef}")
    t.add_row("LoRA", f"r={s.cfg.lora.r} alpha={s.cfg.lora.alpha} targets={s.cfg.lora.target_modules}; "
              f"scalar head on the last token")
    console.print(t)


# --------------------------------------------------------------------------------------------- train
def run(cfg: RewardConfig, dry_run: bool = False) -> dict | None:
    """The `llmft reward` command: returns the final metrics (None for a dry run or a finished run)."""
    return run_stage(cfg, RECIPE, dry_run)


def build_model(s: Setup) -> RewardModel:
    lm = load_model(s.source, s.dtype, s.device, s.cfg.model)
    if s.cfg.data.packing:
        check_packing(lm)
    model = RewardModel(add_lora(lm, s.cfg.lora, s.cfg.train.gradient_checkpointing, s.chat.added_ids),
                        packed=s.cfg.data.packing)
    disable_dropout(model)
    return model


def stage(s: Setup, model: RewardModel) -> Stage:
    pad, loss_cfg = s.chat.pad_id, s.cfg.loss

    def step(micro_batches: list[list[int]], ctx: StepContext) -> tuple[dict, dict]:
        pairs = sum(len(mb) for mb in micro_batches)
        num_pairs = distributed.global_sum(pairs)  # over every process: each loss is its share of the global mean
        loss_sum, chosen, rejected, tokens = 0.0, [], [], 0
        for mb in micro_batches:
            batch = P.collate_pairs([s.train.pairs[i] for i in mb], pad, default_margin=default_margin(loss_cfg),
                                    packed=s.cfg.data.packing)
            r_c, r_r = rewards(model, batch, s.device, s.dtype)
            loss = reward_loss(r_c, r_r, num_pairs, loss_cfg.type, margins(batch, loss_cfg, s.device),
                               loss_cfg.center_coef)
            loss.backward()
            loss_sum += float(loss.detach())
            chosen.append(r_c.detach())
            rejected.append(r_r.detach())
            tokens += int(batch["attention_mask"].sum())
        metrics = pair_metrics(torch.cat(chosen), torch.cat(rejected))
        return {"loss": loss_sum, "grad_norm": ctx.update(loss_sum), **metrics}, {"tokens": tokens, "pairs": pairs}

    def run_eval() -> dict:
        return evaluate(model, s.eval, s.cfg, pad, s.device, s.dtype)

    return Stage("reward", s.cfg, s.plan, s.device, step, run_eval if s.eval else None,
                 shown=("loss", "accuracy", "lr", "pairs_per_s", "eval/accuracy"),
                 finish=lambda: score_range(model, s.train, s.cfg, pad, s.device, s.dtype))


def rewards(model: RewardModel, batch: dict, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """r_c [B], r_r [B]: chosen and rejected of every pair scored in one forward pass (packed with each prompt once
    where the model allows: `llmft.models.pairpack`)."""
    with autocast(device, dtype):
        if model.packed and can_pack_pairs(model.lm, batch):
            r = model.pair_scores({k: v.to(device) for k, v in batch.items()})  # [2B]
        else:
            r = model(batch["input_ids"].to(device), batch["attention_mask"].to(device))  # [2B]
    return r.chunk(2)


def default_margin(loss_cfg) -> float:
    """m for pairs without a margin column: loss.margin, or by default 0 (Bradley–Terry) and 1 (hinge)."""
    if loss_cfg.margin is not None:
        return loss_cfg.margin
    return 1.0 if loss_cfg.type == "hinge" else 0.0


def margins(batch: dict, loss_cfg, device) -> torch.Tensor | float:
    return batch["margin"].to(device) if loss_cfg.use_margin_column else default_margin(loss_cfg)


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
        batch = P.collate_pairs(data.pairs[i:i + cfg.train.batch_size], pad, default_margin=default_margin(cfg.loss),
                                packed=cfg.data.packing)
        r_c, r_r = rewards(model, batch, device, dtype)
        loss += float(reward_loss(r_c, r_r, len(data.pairs), cfg.loss.type, margins(batch, cfg.loss, device),
                                  cfg.loss.center_coef))
        chosen.append(r_c)
        rejected.append(r_r)
    model.train()
    return {"eval/loss": loss, **{f"eval/{k}": v for k, v in pair_metrics(torch.cat(chosen),
                                                                             torch.cat(rejected)).items()}}


@torch.no_grad()
def score_range(model: RewardModel, data: P.PairSet, cfg: RewardConfig, pad: int, device, dtype) -> dict:
    """The range of the final model's scores on its own training answers, chosen and rejected: its 1st and 99th
    percentiles (reward_range/low, /high). An RL stage's alarm watches for policy answers scored outside it, where
    the reward model extrapolates (`rl.alarms.reward_model_range`)."""
    model.eval()
    scores = []
    for i in range(0, len(data.pairs), cfg.train.batch_size):
        batch = P.collate_pairs(data.pairs[i:i + cfg.train.batch_size], pad, packed=cfg.data.packing)
        scores.extend(r.float().cpu() for r in rewards(model, batch, device, dtype))
    model.train()
    low, high = torch.quantile(torch.cat(scores), torch.tensor([0.01, 0.99])).tolist()
    return {"reward_range/low": low, "reward_range/high": high}


RECIPE = Recipe("reward", setup, show_plan, build_model, stage)
