"""Proximal policy optimisation (RLHF): optimise the policy against a reward, held near its start by a KL penalty.

    setup     → policy source (the SFT output, its adapter merged), prompts, reward sources, plan (a step = one
                rollout batch of train.batch_size × train.grad_accum × ppo.num_minibatches prompts)
    model     → ActorCritic on one base: policy adapter (new), value adapter + head (from the reward model),
                reward adapter + head (frozen), reference = every adapter off; dropout off
    step      → rollout    sample responses to left-padded prompts with the KV cache, cut at the first EOS
                score      reward model + judges, − penalty without EOS, [normalise, clip]          [B]
                evaluate   old log-probs, reference log-probs, values, entropy                    [B, R]
                advantage  r_t = −β·KL_t, + score at the last real token → GAE(γ, λ) → whiten      [B, R]
                update     ppo.epochs × shuffled minibatches: clipped policy loss + vf_coef · clipped value loss
    save      → the policy adapter at the top level (a policy for `llmft eval` or a later stage), value/ and
                value_head.safetensors for resuming; samples.jsonl holds decoded samples with their scores
"""

from __future__ import annotations

import dataclasses
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from llmft import distributed, loop
from llmft.actor_critic import POLICY, VALUE, ActorCritic
from llmft.checkpoint import content_hash
from llmft.config import PPOConfig
from llmft.data import Record, read_all
from llmft.errors import ConfigError, DataError, ModelError, TrainingAborted
from llmft.generation import Generation, encode_prompt, generate, prompt_messages
from llmft.loop import Stage, plan_table, resolved_name, run_stage
from llmft.losses import ppo_policy_loss, ppo_value_loss, token_logps
from llmft.modeling import add_lora, disable_dropout, load_model, load_tokenizer, resolve_model, resolve_source
from llmft.reward_model import RewardScorer
from llmft.rewards import Scorer
from llmft.rl import KLController, entropy_from_logits, explained_variance, gae, kl_per_token, shaped_rewards, whiten
from llmft.training import MetricsLog, autocast, console, plan_steps, require_dropout_off


@dataclass
class PromptSet:
    records: list[Record]
    ids: list[list[int]]  # chat-templated prompt token ids, ready to be answered
    too_long: int  # prompts dropped for exceeding data.max_prompt_length


@dataclass
class Setup(loop.Setup):
    scorer: Scorer | None = None
    share_reward: bool = False  # the reward checkpoint was trained on the policy's own base weights
    external_reward: RewardScorer | None = None  # the reward model when it cannot share the base
    kl: KLController | None = None


@dataclass
class Rollout:
    input_ids: torch.Tensor  # [B, P + R]: prompts left-padded to P, responses right-padded to R
    attention_mask: torch.Tensor  # [B, P + R]
    mask: torch.Tensor  # [B, R] fp32: 1 on each response's tokens up to and including its first EOS
    prompt_width: int  # P
    generations: list[Generation]


# --------------------------------------------------------------------------------------------- setup
def setup(cfg: PPOConfig) -> Setup:
    require_dropout_off(cfg, "ppo", "ratios and KL compare outputs of the same network")
    if cfg.rollout.temperature <= 0:
        raise ConfigError("rollout.temperature must be > 0: PPO samples its responses (0.7 is usual)")
    source, tok, device, dtype = resolve_model(cfg.model, cfg.device)
    train = load_prompts(cfg.data.train, cfg, tok)
    evals = load_prompts(cfg.data.eval, cfg, tok) if cfg.data.eval else None
    share = check_reward_model(cfg, source, tok)
    scorer = Scorer(cfg.reward, train.records + (evals.records if evals else []))
    procs = distributed.world().size  # each process samples its own share of a step's prompts
    per_step = cfg.train.batch_size * cfg.train.grad_accum * cfg.ppo.num_minibatches * procs
    plan = plan_steps(len(train.ids), per_step, 1, cfg.train.epochs, cfg.train.max_steps, cfg.seed, procs)
    kl = KLController(cfg.ppo.kl_coef, cfg.ppo.kl_target, cfg.ppo.kl_horizon)
    return Setup(cfg, source, tok, train, evals, plan, device, dtype, scorer, share, None, kl)


def load_prompts(path: str | list[str], cfg: PPOConfig, tok) -> PromptSet:
    records, ids, too_long = [], [], 0
    for r in read_all(path, cfg.data.split):
        p = encode_prompt(tok, prompt_messages(r), r.where)
        if len(p) > cfg.data.max_prompt_length:
            too_long += 1
            continue
        records.append(r)
        ids.append(p)
    if not ids:
        raise DataError(f"{path}: no prompt fits data.max_prompt_length={cfg.data.max_prompt_length} "
                        f"({too_long} longer)")
    return PromptSet(records, ids, too_long)


def check_reward_model(cfg: PPOConfig, source, tok) -> bool:
    """Refuse a reward model that tokenizes or templates differently (it scores the policy's own token ids);
    return whether it was trained on the policy's own base weights (then all roles share one base)."""
    if not cfg.reward.model:
        return False
    rm = resolve_source(cfg.reward.model)
    if rm.kind != "stage" or rm.manifest.get("stage") != "reward":
        raise ModelError(f"reward.model {cfg.reward.model} is not a reward model (an llmft reward output)")
    rm_tok = load_tokenizer(rm)
    if rm_tok.get_vocab() != tok.get_vocab() or rm_tok.chat_template != tok.chat_template:
        what = "tokenizer" if rm_tok.get_vocab() != tok.get_vocab() else "chat template"
        raise ModelError(f"reward model {cfg.reward.model} has another {what} than policy {cfg.model.name}: it "
                         f"must score the policy's own tokens, so both need the same tokenizer and chat template")
    parent = rm.manifest.get("parent") or {}
    same_base = rm.manifest["model"]["resolved"] == resolved_name(source) and (
        source.kind != "stage" or parent.get("sha256") == content_hash(source.path))
    return same_base


def show_plan(s: Setup) -> None:
    cfg, t = s.cfg, plan_table("ppo", s)
    for name, ps in (("train", s.train), ("eval", s.eval)):
        if ps:
            t.add_row(f"{name} prompts", f"{len(ps.ids)} (dropped, longer than {cfg.data.max_prompt_length} "
                                         f"tokens: {ps.too_long})")
    tr, pp, procs = cfg.train, cfg.ppo, distributed.world().size
    on_each = f" on each of {procs} processes" if procs > 1 else ""
    t.add_row("steps", f"{s.plan.total} rollouts of {tr.batch_size * tr.grad_accum * pp.num_minibatches * procs} "
                       f"prompts; each: {pp.epochs} epochs × {pp.num_minibatches} minibatches of "
                       f"{tr.batch_size} × {tr.grad_accum} accumulation{on_each}")
    rm = cfg.reward.model
    roles = f"reward model {rm} ({'shares the base' if s.share_reward else 'own base'})" if rm else "no reward model"
    t.add_row("reward", f"{roles}; judges {dict(cfg.reward.judges) or 'none'}; "
                        f"no-EOS penalty {cfg.reward.missing_eos_penalty}")
    kl = f"adaptive, target {pp.kl_target}" if pp.kl_target else "fixed"
    t.add_row("KL", f"{pp.kl_estimator}, β={pp.kl_coef} ({kl})")
    t.add_row("rollout", f"temperature {cfg.rollout.temperature}, top_p {cfg.rollout.top_p}, "
                         f"top_k {cfg.rollout.top_k}, max_new_tokens {cfg.rollout.max_new_tokens}")
    console.print(t)


# --------------------------------------------------------------------------------------------- train
def run(cfg: PPOConfig, dry_run: bool = False) -> dict | None:
    """The `llmft ppo` command: returns the final metrics (None for a dry run or a finished run)."""
    return run_stage("ppo", cfg, sys.modules[__name__], dry_run)


def build_model(s: Setup) -> ActorCritic:
    cfg = s.cfg
    lm = add_lora(load_model(s.source, s.dtype, s.device, cfg.model), cfg.lora, cfg.train.gradient_checkpointing)
    model = ActorCritic(lm, cfg.reward.model, s.share_reward)
    disable_dropout(model)
    if cfg.reward.model and not s.share_reward:
        console.print(f"[yellow]reward model {cfg.reward.model} was trained on other base weights: loading it "
                      f"separately (a second copy of the base in memory)")
        s.external_reward = RewardScorer.load(cfg.reward.model, cfg.device, cfg.model.dtype, cfg.train.batch_size)
    return model


def stage(s: Setup, model: ActorCritic) -> Stage:
    run_dir = s.cfg.output_dir
    samples: dict[str, MetricsLog] = {}

    def step(micro_batches: list[list[int]], update, step_no: int) -> tuple[dict, dict]:
        metrics, samples_rows = ppo_step(model, s, micro_batches[0], update, step_no)
        if step_no % s.cfg.samples_every == 0 or step_no == 1:
            for row in samples_rows:
                samples["log"].log(step_no, row)
        counts = {"episodes": len(micro_batches[0]), "tokens": metrics.pop("tokens")}
        return metrics, counts

    def resume(state: dict | None) -> None:
        samples["log"] = MetricsLog(Path(run_dir), state["step"] if state else None, False, name="samples.jsonl")
        if state:
            s.kl.value = state["kl_coef"]
            s.scorer.moments = dataclasses.replace(s.scorer.moments, **state["score_moments"])

    def state() -> dict:
        return {"kl_coef": s.kl.value, "score_moments": dataclasses.asdict(s.scorer.moments)}

    return Stage("ppo", s.cfg, s.plan, s.device, step, (lambda: evaluate(model, s)) if s.eval else None,
                 shown=("score", "kl", "length", "loss", "lr"), inner_steps=True, state=state, resume=resume)


def ppo_step(model: ActorCritic, s: Setup, prompt_idx: list[int], update, step: int) -> tuple[dict, list[dict]]:
    cfg, times = s.cfg, {}
    with phase(times, "generation", s.device):
        seed = cfg.seed * 1_000_003 + cfg.rollout.seed * 1009 + step + 100_000_007 * distributed.world().rank
        rb = rollout(model, s, prompt_idx, seed=seed)
    with phase(times, "scoring", s.device):
        rows = [s.train.records[i].row for i in prompt_idx]
        parts, score = score_rollout(model, s, rb, rows)
        check_finite(step, "score", score)
        used = s.scorer.shape(score)
    with phase(times, "update", s.device):
        old_logps, ref_logps, values, entropy = evaluate_roles(model, s, rb)  # [B, R] each
        kl = kl_per_token(old_logps, ref_logps, cfg.ppo.kl_estimator) * rb.mask
        rewards = shaped_rewards(used, kl, rb.mask, s.kl.value)
        advantages, returns = gae(rewards, values, rb.mask, cfg.ppo.gamma, cfg.ppo.lam)
        if cfg.ppo.whiten_advantages:
            advantages = whiten(advantages, rb.mask, total=distributed.sum_tensor)  # global batch moments
        stats = update_epochs(model, s, rb, (old_logps, values, advantages, returns), update, step)
    seq_kl = ((old_logps - ref_logps) * rb.mask).sum(-1)  # [B] k1, summed per response
    metrics = {
        "loss": mean_of(stats, "loss"), "score": float(score.mean()),
        **{f"score/{name}": float(v.mean()) for name, v in parts.items()},
        "rlhf_reward": float((used - s.kl.value * kl.sum(-1)).mean()), "kl": float(seq_kl.mean()),
        "kl_coef": s.kl.value, "entropy": float((entropy * rb.mask).sum() / rb.mask.sum()),
        "length": float(rb.mask.sum(-1).mean()), "no_eos": no_eos_share(rb),
        **{k: mean_of(stats, k) for k in ("policy_loss", "value_loss", "clipfrac", "value_clipfrac", "approx_kl")},
        "grad_norm": stats[-1]["grad_norm"], "explained_variance": explained_variance(values, returns, rb.mask),
        **{f"time/{k}": v for k, v in times.items()},
        "tokens": int(rb.attention_mask.sum()),
    }
    n = distributed.total(len(prompt_idx))
    s.kl.update(distributed.total(float(seq_kl.sum())) / n, n)
    return metrics, sample_rows(s, rb, rows, parts, score)


# ------------------------------------------------------------------------------------------- rollout
def rollout(model: ActorCritic, s: Setup, prompt_idx: list[int], seed: int) -> Rollout:
    """Sample one response per prompt with the policy (the engine is `generation.generate`)."""
    model.use(POLICY)
    sampling = dataclasses.replace(s.cfg.rollout, seed=seed)
    gens = generate(model.lm, s.tokenizer, [s.train.ids[i] for i in prompt_idx], sampling)
    return pack(gens, s.tokenizer.pad_token_id)


def pack(gens: list[Generation], pad: int) -> Rollout:
    """Prompts left-padded to the longest prompt P, responses right-padded to the longest response R."""
    p_width = max(len(g.prompt_ids) for g in gens)
    r_width = max(len(g.response_ids) for g in gens)
    ids = torch.full((len(gens), p_width + r_width), pad, dtype=torch.long)
    attention = torch.zeros_like(ids)
    mask = torch.zeros(len(gens), r_width)
    for i, g in enumerate(gens):
        p, r = g.prompt_ids, g.response_ids
        ids[i, p_width - len(p):p_width], ids[i, p_width:p_width + len(r)] = torch.tensor(p), torch.tensor(r)
        attention[i, p_width - len(p):p_width + len(r)] = 1
        mask[i, :len(r)] = 1
    return Rollout(ids, attention, mask, p_width, gens)


def score_rollout(model: ActorCritic, s: Setup, rb: Rollout, rows: list[dict]):
    """Every source's scores and their total [B] (before normalisation)."""
    tok = s.tokenizer
    model_scores = None
    if s.share_reward:
        groups = chunks(range(len(rb.generations)), s.cfg.train.batch_size)
        model_scores = torch.cat([model.rewards(mb.input_ids, mb.attention_mask)
                                  for mb in (micro_batch(rb, rows, s.device) for rows in groups)])
    elif s.external_reward:
        model_scores = s.external_reward.score_ids([g.prompt_ids + g.response_ids for g in rb.generations])
    prompts = [tok.decode(g.prompt_ids, skip_special_tokens=True) for g in rb.generations]
    parts = s.scorer.parts(prompts, [g.text for g in rb.generations], rows, model_scores)
    finished = torch.tensor([g.finished for g in rb.generations])
    return parts, s.scorer.total(parts, finished)


# ------------------------------------------------------------------------------------------ forwards
@dataclass
class MicroBatch:
    """Rows of a rollout, cut to their own width: columns that are padding in every row are dropped."""

    input_ids: torch.Tensor  # [b, p + r]
    attention_mask: torch.Tensor  # [b, p + r]
    mask: torch.Tensor  # [b, r] response mask
    prompt_width: int  # p
    full_width: int  # R of the rollout: per-token outputs are padded back to [b, R]

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.pad(x, (0, self.full_width - x.shape[1]))


def micro_batch(rb: Rollout, rows, device) -> MicroBatch:
    rows = torch.as_tensor(list(rows))
    attention, mask = rb.attention_mask[rows], rb.mask[rows]
    first = int(attention.argmax(-1).min())  # the earliest real prompt token of these rows
    r = int(mask.sum(-1).max())  # their longest response
    cols = slice(first, rb.prompt_width + r)
    return MicroBatch(rb.input_ids[rows, cols].to(device), attention[:, cols].to(device), mask[:, :r].to(device),
                      rb.prompt_width - first, mask.shape[1])


def response_states(model: ActorCritic, role: str, mb: MicroBatch) -> torch.Tensor:
    """Hidden states [b, r, d] of the positions that predict each response token (p − 1 … p + r − 2)."""
    return model.hidden(role, mb.input_ids, mb.attention_mask)[:, mb.prompt_width - 1:-1]


def policy_logps(model: ActorCritic, s: Setup, rb: Rollout, rows, role: str = POLICY, with_entropy: bool = False):
    """log π(y_t) at the sampling temperature [b, R] (0 on padding), and the entropy [b, R] when asked; the LM
    head runs on the valid positions only."""
    mb = micro_batch(rb, rows, s.device)
    with autocast(s.device, s.dtype):
        hidden = response_states(model, role, mb)
        valid = mb.mask.bool()
        logits = model.logits(hidden[valid]) / s.cfg.rollout.temperature  # [N, V] fp32
    targets = mb.input_ids[:, mb.prompt_width:][valid]
    logps = torch.zeros_like(mb.mask).masked_scatter(valid, token_logps(logits, targets))
    entropy = torch.zeros_like(mb.mask).masked_scatter(valid, entropy_from_logits(logits)) if with_entropy else None
    return mb.pad(logps), mb.pad(entropy) if with_entropy else None


def value_estimates(model: ActorCritic, s: Setup, rb: Rollout, rows) -> torch.Tensor:
    """V(s_t) [b, R] (0 on padding): the value head on the state before each response token."""
    mb = micro_batch(rb, rows, s.device)
    with autocast(s.device, s.dtype):
        hidden = response_states(model, VALUE, mb)
    return mb.pad(model.values(hidden) * mb.mask)


@torch.no_grad()
def evaluate_roles(model: ActorCritic, s: Setup, rb: Rollout):
    """Old log-probs, reference log-probs, values and entropy, each [B, R] fp32 on the device."""
    out = {"old": [], "ref": [], "values": [], "entropy": []}
    for rows in chunks(range(len(rb.generations)), s.cfg.train.batch_size):
        logps, entropy = policy_logps(model, s, rb, rows, with_entropy=True)
        out["old"].append(logps)
        out["entropy"].append(entropy)
        out["ref"].append(policy_logps(model, s, rb, rows, role="reference")[0])
        out["values"].append(value_estimates(model, s, rb, rows))
    return tuple(torch.cat(out[k]) for k in ("old", "ref", "values", "entropy"))


# -------------------------------------------------------------------------------------------- update
def update_epochs(model: ActorCritic, s: Setup, rb: Rollout, targets, update, step: int) -> list[dict]:
    """ppo.epochs passes over the rollout batch in shuffled minibatches; one optimizer step per minibatch.
    Returns each minibatch's statistics, in order."""
    old_logps, old_values, advantages, returns = targets
    cfg, n = s.cfg, len(rb.generations)
    mb_size = -(-n // cfg.ppo.num_minibatches)
    model.train()
    stats = []
    for epoch in range(cfg.ppo.epochs):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed + 7919 * step + epoch))
        for minibatch in chunks(order.tolist(), mb_size):
            num_tokens = distributed.total(float(rb.mask[minibatch].sum()))  # the losses' token mean is global
            parts = [micro_update(model, s, rb, rows, targets, num_tokens)
                     for rows in chunks(minibatch, cfg.train.batch_size)]
            mb = token_weighted(parts)  # this process's statistics; the loop averages them over processes
            mb["loss"] = sum(p["loss"] for p in parts)  # this process's share of the global loss
            check_finite(step, "loss", torch.tensor(mb["loss"]))
            mb["grad_norm"] = update()
            stats.append(mb)
    return stats


def token_weighted(parts: list[dict]) -> dict:
    """Micro-batch statistics → the minibatch's, each weighted by its micro-batch's "tokens"."""
    tokens = sum(p["tokens"] for p in parts)
    return {k: sum(p[k] * p["tokens"] for p in parts) / tokens for k in parts[0] if k != "tokens"}


def micro_update(model: ActorCritic, s: Setup, rb: Rollout, rows: list[int], targets, num_tokens) -> dict:
    """Forward and backward of one micro-batch: policy loss and vf_coef × value loss, each its share of the
    minibatch's token mean."""
    old_logps, old_values, advantages, returns = (t[rows] for t in targets)
    mask = rb.mask[rows].to(s.device)
    pp = s.cfg.ppo
    logps, _ = policy_logps(model, s, rb, rows)
    policy_loss, st = ppo_policy_loss(logps, old_logps, advantages, mask, num_tokens, pp.clip_range)
    policy_loss.backward()
    values = value_estimates(model, s, rb, rows)
    value_loss, value_clipfrac = ppo_value_loss(values, old_values, returns, mask, num_tokens, pp.value_clip_range)
    (pp.vf_coef * value_loss).backward()
    policy_loss, value_loss = policy_loss.item(), value_loss.item()
    share = float(mask.sum()) / float(num_tokens)  # this micro-batch's losses are already divided by num_tokens
    return {"loss": policy_loss + pp.vf_coef * value_loss, "tokens": float(mask.sum()),
            "policy_loss": policy_loss / share if share else 0.0, "value_loss": value_loss / share if share else 0.0,
            "clipfrac": st["clipfrac"], "value_clipfrac": value_clipfrac, "approx_kl": st["approx_kl"],
            "ratio": st["ratio"]}


# ----------------------------------------------------------------------------------------------- eval
@torch.no_grad()
def evaluate(model: ActorCritic, s: Setup) -> dict[str, float]:
    """Greedy answers to the held-out prompts, scored by the same sources (no penalty shaping, no KL)."""
    model.use(POLICY)
    sampling = dataclasses.replace(s.cfg.rollout, temperature=0.0)
    rb = pack(generate(model.lm, s.tokenizer, s.eval.ids, sampling), s.tokenizer.pad_token_id)
    parts, score = score_rollout(model, s, rb, [r.row for r in s.eval.records])
    out = {"eval/score": float(score.mean()), **{f"eval/score/{k}": float(v.mean()) for k, v in parts.items()},
           "eval/length": float(rb.mask.sum(-1).mean()),
           "eval/no_eos": no_eos_share(rb)}
    if "constraints" in parts:
        out["eval/constraints/pass_rate"] = float((parts["constraints"] == 1.0).float().mean())
    model.train()
    return out


# ---------------------------------------------------------------------------------------------- utils
def sample_rows(s: Setup, rb: Rollout, rows: list[dict], parts: dict, score: torch.Tensor, n: int = 4) -> list[dict]:
    return [{"prompt": prompt_messages(Record(row, "sample"))[-1]["content"], "response": g.text,
             "finished": g.finished, "score": float(score[i]), **{k: float(v[i]) for k, v in parts.items()}}
            for i, (row, g) in enumerate(zip(rows[:n], rb.generations[:n], strict=False))]


def no_eos_share(rb: Rollout) -> float:
    return 1 - sum(g.finished for g in rb.generations) / len(rb.generations)


def chunks(seq, size: int) -> list[list[int]]:
    seq = list(seq)
    return [seq[i:i + size] for i in range(0, len(seq), size)]


def mean_of(stats: list[dict], key: str) -> float:
    return sum(st[key] for st in stats) / len(stats)


def check_finite(step: int, what: str, values: torch.Tensor) -> None:
    if distributed.any_rank(not bool(torch.isfinite(values).all())):  # every process stops together
        raise TrainingAborted(f"non-finite {what} at step {step} ({values.tolist()[:4]}...); stopped before "
                              f"updating the weights with it; the last checkpoint in the output_dir is kept")


@contextmanager
def phase(times: dict, name: str, device: torch.device):
    start = time.perf_counter()
    yield
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    times[name] = time.perf_counter() - start

