"""Kahneman–Tversky optimisation (Ethayarajh et al. 2024): train the policy on answers labelled desirable or
undesirable one by one — people's thumbs up and down, ratings over a threshold — with no pairs and no reward model.

    setup     → model source (usually the SFT output, its adapter merged), labelled answers, step plan
    model     → a fresh LoRA adapter; the reference is the same weights with the adapter disabled; dropout off, so
                at step 0 policy == reference, z0 = 0 and every answer's loss is λ_y / 2
    train     → per step: z0 from its prompts paired with other rows' answers (no gradient), then per micro-batch:
                reference and policy log-probs of each answer (fp32) → r = log π − log π_ref →
                λ_y (1 − σ(β (±(r − z0))))
    save      → checkpoint-N/, then the final adapter, tokenizer and manifest: a policy the next stage names
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from llmft import distributed
from llmft.config import KTOConfig
from llmft.console import console
from llmft.data import labelled as L
from llmft.errors import ConfigError
from llmft.maths.losses import kto_loss, kto_reference_point
from llmft.models.adapters import require_dropout_off
from llmft.models.forward import autocast
from llmft.models.loading import policy_with_reference, resolve_model
from llmft.models.logprobs import sequence_logps
from llmft.run.held_out import held_out_prompts, with_held_out
from llmft.run.loop import Recipe, Setup, Stage, StepContext, plan_table, run_stage, steps_row
from llmft.run.plan import plan_for


# --------------------------------------------------------------------------------------------- setup
def setup(cfg: KTOConfig) -> Setup:
    require_dropout_off(cfg, "kto", "at step 0 the policy must equal the reference")
    if cfg.train.batch_size < 2:
        raise ConfigError("train.batch_size: KTO estimates its KL reference point from each step's prompts paired "
                          "with other rows' answers, so a micro-batch needs at least 2 rows")
    source, chat, device, dtype = resolve_model(cfg.model, cfg.device)
    train_set, eval_set = L.load_labelled_sets(cfg, chat)
    plan = plan_for(cfg, len(train_set.answers), min_rows=2)  # z0 needs another row's answer on each process
    return Setup(cfg, source, chat, train_set, eval_set, plan, device, dtype,
                 held_out=held_out_prompts(cfg, chat, eval_set is not None))


def show_plan(s: Setup) -> None:
    t = plan_table("kto", s)
    for name, ls in (("train", s.train), ("eval", s.eval)):
        if ls:
            t.add_row(f"{name} answers", L.describe(ls, s.cfg.data.max_length))
    steps_row(t, s, "answers")
    if s.held_out:
        s.held_out.plan_row(t, s.plan.num_steps)
    loss = s.cfg.loss
    t.add_row("loss", f"KTO, β={loss.beta}, λ_D={loss.desirable_weight}, λ_U={loss.undesirable_weight}; reference: "
              f"the policy with its adapter disabled; z0 from each step's prompts with other rows' answers")
    t.add_row("LoRA", f"r={s.cfg.lora.r} alpha={s.cfg.lora.alpha} targets={s.cfg.lora.target_modules}")
    console.print(t)
    if not 0 < s.train.desirable < len(s.train.answers):
        console.print("[yellow]warning: every training answer has the same label; KTO then only pushes their "
                      "log-probs one way")


# --------------------------------------------------------------------------------------------- train
def run(cfg: KTOConfig, dry_run: bool = False) -> dict | None:
    """The `llmft kto` command: returns the final metrics (None for a dry run or a finished run)."""
    return run_stage(cfg, RECIPE, dry_run)


def build_model(s: Setup):
    return policy_with_reference(s)


def stage(s: Setup, model) -> Stage:
    """One KTO step: z0 over the step's answers, then each micro-batch's share of the mean loss over them (on every
    process)."""

    def step(micro_batches: list[list[int]], ctx: StepContext) -> tuple[dict, dict]:
        answers = [[s.train.answers[i] for i in mb] for mb in micro_batches]
        local = sum(len(a) for a in answers)
        count = distributed.global_sum(local)  # over every process: each loss is its share of the global mean
        z0 = reference_point(model, [a for mb in answers for a in mb], s, across_processes=True)
        loss_sum, parts, tokens = 0.0, [], 0
        for mb in answers:
            losses, part = answer_losses(model, mb, z0, s)
            loss = losses.sum() / count
            loss.backward()
            loss_sum += float(loss.detach())
            parts.append(part)
            tokens += part["tokens"]
        stats = answer_metrics(parts, z0, across_processes=True)
        return {"loss": loss_sum, "grad_norm": ctx.update(loss_sum), **stats}, {"tokens": tokens, "answers": local}

    def run_eval() -> dict:
        return evaluate(model, s)

    return with_held_out(Stage("kto", s.cfg, s.plan, s.device, step, run_eval if s.eval else None,
                               shown=("loss", "kl_reference_point", "rewards/margins", "lr", "answers_per_s",
                                      "eval/loss")), s, model)


def answer_losses(model, answers: list[L.LabelledAnswer], z0: torch.Tensor, s: Setup) -> tuple[torch.Tensor, dict]:
    """Per-answer KTO losses [B] of one micro-batch against the reference point `z0`, and what its metrics need."""
    loss_cfg = s.cfg.loss
    batch = {k: v.to(s.device) for k, v in L.collate_answers(answers, s.chat.pad_id).items()}
    ref = summed_answer_logps(model, batch, s, reference=True)
    logps = summed_answer_logps(model, batch, s)
    losses = kto_loss(logps - ref, z0, batch["desirable"], loss_cfg.beta, loss_cfg.desirable_weight,
                      loss_cfg.undesirable_weight)
    part = {"rewards": (loss_cfg.beta * (logps - ref)).detach(), "logps": logps.detach(),
            "desirable": batch["desirable"], "tokens": int(batch["attention_mask"].sum())}
    return losses, part


@torch.no_grad()
def reference_point(model, answers: list[L.LabelledAnswer], s: Setup, across_processes: bool) -> torch.Tensor:
    """z0 of a step (or of the eval set): its prompts with other rows' answers (`labelled.mismatched`), the mean
    policy-to-reference log-ratio (over every process's answers in training), without gradient. (Training steps hold
    at least 2 answers on each process; an eval set of one answer pairs it with its own prompt, as TRL would.)"""
    kl_answers, size = L.mismatched(answers, s.cfg.data.max_length), s.cfg.train.batch_size
    ratio = torch.zeros((), dtype=torch.float32, device=s.device)
    for i in range(0, len(kl_answers), size):
        batch = {k: v.to(s.device) for k, v in L.collate_answers(kl_answers[i:i + size], s.chat.pad_id).items()}
        ratio += (summed_answer_logps(model, batch, s) - summed_answer_logps(model, batch, s, reference=True)).sum()
    if not across_processes:
        return kto_reference_point(ratio, len(answers))
    return kto_reference_point(distributed.global_sum_tensor(ratio), distributed.global_sum(len(answers)))


def summed_answer_logps(model, batch: dict, s: Setup, reference: bool = False) -> torch.Tensor:
    """Summed answer log-probs [B], fp32; the reference is the same model with its adapter disabled, run without
    gradients."""
    off = model.disable_adapter() if reference else nullcontext()
    with off, torch.no_grad() if reference else nullcontext(), autocast(s.device, s.dtype):
        return sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"],
                              packed=s.cfg.data.packing)


def answer_metrics(parts: list[dict], z0: torch.Tensor, across_processes: bool) -> dict[str, float]:
    """TRL-style figures: z0 (`kl_reference_point`; TRL logs it as `kl`), and the mean implicit reward β·r and
    log-prob of each kind of answer, over every process's answers (the same keys and values on each, whichever kinds
    each process drew)."""
    rewards, logps = torch.cat([p["rewards"] for p in parts]), torch.cat([p["logps"] for p in parts])
    desirable = torch.cat([p["desirable"] for p in parts])
    sums = torch.stack([torch.stack([rewards[rows].sum(), logps[rows].sum(), rows.sum().to(rewards.dtype)])
                        for rows in (desirable, ~desirable)])  # [2 kinds, (reward, log-prob, count)]
    sums = distributed.global_sum_tensor(sums) if across_processes else sums
    out = {"kl_reference_point": float(z0)}
    for (reward, logp, n), name in zip(sums.tolist(), ("desirable", "undesirable"), strict=True):
        if n:
            out[f"rewards/{name}"], out[f"logps/{name}"] = reward / n, logp / n
    if "rewards/desirable" in out and "rewards/undesirable" in out:
        out["rewards/margins"] = out["rewards/desirable"] - out["rewards/undesirable"]
    return out


@torch.no_grad()
def evaluate(model, s: Setup) -> dict[str, float]:
    """Loss and metrics over the eval answers, with one z0 for the whole set (main process only)."""
    model.eval()
    z0 = reference_point(model, s.eval.answers, s, across_processes=False)
    losses, parts = [], []
    for i in range(0, len(s.eval.answers), s.cfg.train.batch_size):
        loss, part = answer_losses(model, s.eval.answers[i:i + s.cfg.train.batch_size], z0, s)
        losses.append(loss)
        parts.append(part)
    model.train()
    metrics = {"loss": float(torch.cat(losses).mean()), **answer_metrics(parts, z0, across_processes=False)}
    return {f"eval/{k}": v for k, v in metrics.items()}


RECIPE = Recipe("kto", setup, show_plan, build_model, stage)
