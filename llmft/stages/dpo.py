"""Direct preference optimisation and its family: train the policy on preference pairs, no reward model.

    setup     → model source (usually the SFT output, its adapter merged), preference pairs, step plan
    model     → a fresh LoRA adapter; the reference is the same weights with the adapter disabled (one copy
                of the base in memory); dropout off, so at step 0 policy == reference and the loss is ln 2
    reference → log π_ref(y|x) per pair, in the step (or precomputed once over the dataset)
    train     → per step: chosen and rejected in one batch → summed answer log-probs (fp32) →
                Δ = ρ_c − ρ_r → loss (sigmoid/cDPO, robust, hinge, IPO; SimPO and ORPO reference-free)
    save      → checkpoint-N/, then the final adapter, tokenizer and manifest: a policy the next stage names
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from llmft import distributed
from llmft.config import DPOConfig
from llmft.console import console
from llmft.data import preferences as P
from llmft.maths.losses import REFERENCE_FREE, preference_loss, with_chosen_nll
from llmft.models.adapters import require_dropout_off
from llmft.models.forward import autocast
from llmft.models.loading import policy_with_reference, resolve_model
from llmft.models.logprobs import pair_logps, sequence_logps
from llmft.models.pairpack import can_pack_pairs
from llmft.run import loop
from llmft.run.held_out import held_out_prompts, with_held_out
from llmft.run.loop import Recipe, Stage, StepContext, plan_table, run_stage, steps_row
from llmft.run.plan import plan_for


@dataclass
class Setup(loop.Setup):
    reference: dict[str, torch.Tensor | None] = field(default_factory=lambda: {"train": None, "eval": None})
    # precomputed reference log-probs [2, N] per split (None: computed in each step)


# --------------------------------------------------------------------------------------------- setup
def setup(cfg: DPOConfig) -> Setup:
    require_dropout_off(cfg, "dpo", "at step 0 the policy must equal the reference")
    source, chat, device, dtype = resolve_model(cfg.model, cfg.device)
    train_set, eval_set = P.load_pair_sets(cfg, chat)
    plan = plan_for(cfg, len(train_set.pairs))
    return Setup(cfg, source, chat, train_set, eval_set, plan, device, dtype,
                 held_out=held_out_prompts(cfg, chat, eval_set is not None))


def show_plan(s: Setup) -> None:
    t = plan_table("dpo", s)
    for name, ps in (("train", s.train), ("eval", s.eval)):
        if ps:
            t.add_row(f"{name} pairs", P.describe(ps, s.cfg.data.max_length))
    steps_row(t, s, "pairs")
    if s.held_out:
        s.held_out.plan_row(t, s.plan.num_steps)
    loss = s.cfg.loss
    ref = "none (reference-free)" if loss.type in REFERENCE_FREE else (
        "the policy with its adapter disabled" + (", precomputed once" if loss.precompute_reference else ""))
    t.add_row("loss", f"{loss.type}, β={loss.beta}; reference: {ref}")
    t.add_row("LoRA", f"r={s.cfg.lora.r} alpha={s.cfg.lora.alpha} targets={s.cfg.lora.target_modules}")
    console.print(t)


# --------------------------------------------------------------------------------------------- train
def run(cfg: DPOConfig, dry_run: bool = False) -> dict | None:
    """The `llmft dpo` command: returns the final metrics (None for a dry run or a finished run)."""
    return run_stage(cfg, RECIPE, dry_run)


def build_model(s: Setup):
    return policy_with_reference(s)


def stage(s: Setup, model) -> Stage:
    """One DPO step; the reference log-probs, when precomputed, are computed here: after the model is on its device
    (under FSDP, after it is sharded), never in build_model."""
    if s.cfg.loss.precompute_reference and s.cfg.loss.type not in REFERENCE_FREE:
        console.print("computing the reference log-probs once")
        for split, ps in (("train", s.train), ("eval", s.eval)):
            if ps:
                s.reference[split] = reference_logps(model, ps.pairs, s)

    def step(micro_batches: list[list[int]], ctx: StepContext) -> tuple[dict, dict]:
        pairs = sum(len(mb) for mb in micro_batches)
        num_pairs = distributed.global_sum(pairs)  # over every process: each loss is its share of the global mean
        loss_sum, rewards, logps, tokens = 0.0, [], [], 0
        for mb in micro_batches:
            batch = P.collate_pairs([s.train.pairs[i] for i in mb], s.chat.pad_id, packed=s.cfg.data.packing)
            ref = s.reference["train"][:, mb] if s.reference["train"] is not None else None
            losses, r, lp = pair_losses(model, batch, ref, s)
            loss = losses.sum() / num_pairs
            loss.backward()
            loss_sum += float(loss.detach())
            rewards.append(r)
            logps.append(lp)
            tokens += int(batch["attention_mask"].sum())
        metrics = pair_metrics(torch.cat(rewards, dim=1), torch.cat(logps, dim=1))
        return {"loss": loss_sum, "grad_norm": ctx.update(loss_sum), **metrics}, {"tokens": tokens, "pairs": pairs}

    def run_eval() -> dict:
        return evaluate(model, s)

    return with_held_out(Stage("dpo", s.cfg, s.plan, s.device, step, run_eval if s.eval else None,
                               shown=("loss", "rewards/accuracies", "rewards/margins", "lr", "pairs_per_s",
                                      "eval/rewards/accuracies")), s, model)


def pair_losses(model, batch: dict, ref: torch.Tensor | None, s: Setup):
    """Per-pair losses [B], and the implicit rewards [2, B] and policy log-probs [2, B] of chosen and rejected."""
    loss_cfg = s.cfg.loss
    batch = {k: v.to(s.device) for k, v in batch.items()}
    counts = (batch["labels"][:, 1:] != -100).sum(-1).view(2, -1).float()  # [2, B] answer tokens
    if ref is None and loss_cfg.type not in REFERENCE_FREE:
        ref = batch_logps(model, batch, s, reference=True)
    logps = batch_logps(model, batch, s)
    ref = ref.to(s.device) if ref is not None else None
    losses = preference_loss(loss_cfg.type, logps, ref, counts, loss_cfg.beta, loss_cfg.label_smoothing,
                             loss_cfg.gamma, loss_cfg.orpo_lambda)
    if loss_cfg.sft_weight:
        losses = with_chosen_nll(losses, logps[0], counts[0], loss_cfg.sft_weight)
    # implicit rewards: β·ρ, or β·(mean-token log π) for the reference-free losses (what they rank by)
    rewards = loss_cfg.beta * (logps - ref if ref is not None else logps / counts)
    return losses, rewards.detach(), logps.detach()


def batch_logps(model, batch: dict, s: Setup, reference: bool = False) -> torch.Tensor:
    """Summed answer log-probs [2, B] (row 0 chosen, row 1 rejected), fp32; the reference is the same
    model with its adapter disabled, run without gradients."""
    off = model.disable_adapter() if reference else nullcontext()
    with off, torch.no_grad() if reference else nullcontext(), autocast(s.device, s.dtype):
        if can_pack_pairs(model, batch):  # each prompt once for both answers
            logps = pair_logps(model, batch)
        else:
            logps = sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"],
                                   packed=s.cfg.data.packing)
    return logps.view(2, -1)


@torch.no_grad()
def reference_logps(model, pairs: list[P.TokenizedPair], s: Setup) -> torch.Tensor:
    """Reference log-probs [2, N] of every pair, with the truncation and dtype of training."""
    out = []
    for i in range(0, len(pairs), s.cfg.train.batch_size):
        batch = P.collate_pairs(pairs[i:i + s.cfg.train.batch_size], s.chat.pad_id, packed=s.cfg.data.packing)
        out.append(batch_logps(model, {k: v.to(s.device) for k, v in batch.items()}, s, reference=True).cpu())
    return torch.cat(out, dim=1)


def pair_metrics(rewards: torch.Tensor, logps: torch.Tensor) -> dict[str, float]:
    """The figures users know from TRL, from implicit rewards [2, N] and summed log-probs [2, N]."""
    return {"rewards/chosen": float(rewards[0].mean()), "rewards/rejected": float(rewards[1].mean()),
            "rewards/accuracies": float((rewards[0] > rewards[1]).float().mean()),
            "rewards/margins": float((rewards[0] - rewards[1]).mean()),
            "logps/chosen": float(logps[0].mean()), "logps/rejected": float(logps[1].mean())}


@torch.no_grad()
def evaluate(model, s: Setup) -> dict[str, float]:
    model.eval()
    losses, rewards, logps = [], [], []
    for i in range(0, len(s.eval.pairs), s.cfg.train.batch_size):
        idx = list(range(i, min(i + s.cfg.train.batch_size, len(s.eval.pairs))))
        batch = P.collate_pairs([s.eval.pairs[j] for j in idx], s.chat.pad_id, packed=s.cfg.data.packing)
        ref = s.reference["eval"][:, idx] if s.reference["eval"] is not None else None
        loss, r, lp = pair_losses(model, batch, ref, s)
        losses.append(loss)
        rewards.append(r)
        logps.append(lp)
    model.train()
    metrics = {"loss": float(torch.cat(losses).mean()),
               **pair_metrics(torch.cat(rewards, dim=1), torch.cat(logps, dim=1))}
    return {f"eval/{k}": v for k, v in metrics.items()}


RECIPE = Recipe("dpo", setup, show_plan, build_model, stage)
