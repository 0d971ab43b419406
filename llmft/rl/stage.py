"""The RL stages' plumbing around `run.loop.fit`: a stage from an RL step function, the sampler-vs-trainer
log-prob check, greedy evaluation on held-out prompts, decoded samples, and per-step statistics."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch

from llmft import distributed
from llmft.console import console
from llmft.data.records import Record, shown_prompt
from llmft.errors import TrainingAborted
from llmft.maths.rl import rollout_correction
from llmft.rl import held_out
from llmft.rl.actor_critic import ActorCritic
from llmft.rl.alarms import Alarm, Keys
from llmft.rl.engine import gap_tolerance
from llmft.rl.multi_turn import trajectory_metrics
from llmft.rl.scoring import no_eos_share, score_rollout  # noqa: F401 (the stages import them from here)
from llmft.rl.setup import RLSetup
from llmft.rollout.experience import Experience, pack
from llmft.run import loop
from llmft.run.held_out import keep_best, resumed_best, samples_log
from llmft.run.metrics import MetricsLog, stopwatch


def rl_stage(name: str, s: RLSetup, model: ActorCritic, rl_step, shown: tuple[str, ...],
             extra_state: Callable[[], dict] = dict, load_extra: Callable[[dict], None] = lambda state: None
             ) -> loop.Stage:
    """An RL stage for `loop.fit`: rl_step(prompt indices, update, step number) → (metrics with "episodes" and
    "tokens", samples rows); decoded samples go to samples.jsonl at step 1 and every cfg.samples_every steps. A
    checkpoint keeps the score normaliser's moments and whatever `extra_state` returns (`load_extra` restores
    it)."""
    samples: dict[str, MetricsLog] = {}
    current = {"step": 0}  # the step an evaluation follows
    best: dict = {"step": None, "value": None}  # eval.select_by's best evaluation so far
    alarm = alarm_of(name, s)

    def step(micro_batches: list[list[int]], ctx: loop.StepContext) -> tuple[dict, dict]:
        current["step"] = ctx.number
        metrics, rows = rl_step(micro_batches[0], ctx.update, ctx.number)
        metrics.update(s.engine.metrics())
        if ctx.number % s.cfg.samples_every == 0 or ctx.number == 1:
            for row in rows:
                samples["log"].log(ctx.number, row)
        return metrics, {"episodes": metrics.pop("episodes"), "tokens": metrics.pop("tokens")}

    def resume(state: dict | None) -> None:
        start = state["step"] if state else None
        samples["log"] = MetricsLog(Path(s.cfg.output_dir), start, name="samples.jsonl")
        samples["eval"] = samples_log(s, start)
        current["step"] = start or 0
        if state:
            s.scorer.moments = dataclasses.replace(s.scorer.moments, **state["score_moments"])
            best.update(distributed.on_main(lambda: resumed_best(s, state.get("best", {}), state["step"])))
            if alarm and "alarm" in state:
                alarm.history, alarm.fired = state["alarm"]["history"], state["alarm"]["fired"]
            load_extra(state)

    def state() -> dict:
        watched = {"alarm": {"history": alarm.history, "fired": alarm.fired}} if alarm else {}
        return {"score_moments": dataclasses.asdict(s.scorer.moments), "best": dict(best), **watched, **extra_state()}

    def evaluate() -> dict[str, float]:
        metrics = held_out.evaluate(model, s, s.judges, samples.get("eval"), current["step"])
        return {**metrics, **keep_best(name, s, model, current["step"], metrics, best)}

    return loop.Stage(name, s.cfg, s.plan, s.device, step, evaluate if s.eval else None,
                      shown=shown, state=state, resume=resume, alarm=alarm)


def alarm_of(name: str, s: RLSetup) -> Alarm | None:
    """The run's reward-hacking alarm, reading this stage's metric names (the KL per answer: ppo's objective/kl of
    its samples, grpo's eval/kl of the held-out answers)."""
    if s.cfg.alarm.on_alarm == "off":
        return None
    limit = s.cfg.env.max_tokens if s.cfg.env.name else s.cfg.rollout.max_new_tokens  # an answer's longest
    return Alarm(s.cfg.alarm, Keys(kl="objective/kl" if name == "ppo" else "eval/kl"), limit)


def check_logprob_gap(s: RLSetup, exp: Experience, step: int, tolerance: float | None, key: str) -> tuple[float, float]:
    """The sampler's log-probs against the trainer's recomputation (largest and mean gap per token, over every
    process's answers); at step 1 a mean gap above the tolerance stops the run before any update: the trainer is
    not computing the distribution the answers were drawn from (soft-capping, a sampling processor,
    temperature, padding...). `key` names the tolerance's config key."""
    largest, summed, tokens = exp.logprob_gap()
    gap = distributed.global_max(largest)
    gap_mean = distributed.global_sum(summed) / max(distributed.global_sum(tokens), 1.0)
    tolerance = gap_tolerance(s, tolerance)
    if step == 1 and gap_mean > tolerance and s.cfg.rollout.correction != "none":
        console.print(f"[yellow]step 1: the trainer's log-probs differ from the sampler's by {gap_mean:.3g} per token "
                      f"on average (largest {gap:.3g}; tolerance {tolerance:g}); rollout.correction "
                      f"{s.cfg.rollout.correction} reweighs the tokens")
    elif step == 1 and gap_mean > tolerance:
        raise TrainingAborted(f"step 1: the trainer's log-probs differ from the sampler's by {gap_mean:.3g} per token "
                              f"on average (largest {gap:.3g}; tolerance {tolerance:g}): the run would optimise "
                              f"another distribution than the one it samples. Report it with `llmft env`; {key} "
                              f"raises the limit")
    return gap, gap_mean


def correction_weights(s: RLSetup, exp: Experience, old_logps: torch.Tensor, idx: list[int] | None = None
                       ) -> torch.Tensor:
    """rollout.correction's per-token weights [b, R] of the rows `idx` (all by default): 1 on answer tokens when
    it is none (`maths.rl.rollout_correction`)."""
    rows = slice(None) if idx is None else idx
    r = s.cfg.rollout
    return rollout_correction(old_logps[rows], exp.sampler_logps[rows], exp.mask[rows], r.correction,
                              r.correction_cap)


def sample_rows(exp: Experience, rows: list[dict], parts: dict, score: torch.Tensor, n: int = 4) -> list[dict]:
    return [{"prompt": shown_prompt(Record(row, "sample")), "response": g.text,
             "finished": g.finished, "score": float(score[i]), **{k: float(v[i]) for k, v in parts.items()}}
            for i, (row, g) in enumerate(zip(rows[:n], exp.answers[:n], strict=False))]


def add_trajectories(metrics: dict, samples: list[dict], trajectories) -> None:
    """Multi-turn: the env/… counts into the step's metrics, each sample row's whole trajectory into it."""
    metrics.update(trajectory_metrics(trajectories))
    for row, t in zip(samples, trajectories, strict=False):
        row.update(t.sample_row())


def token_weighted(parts: list[dict]) -> dict:
    """Micro-batch statistics → the minibatch's, each weighted by its micro-batch's "tokens" (all 0 when none)."""
    tokens = sum(p["tokens"] for p in parts)
    return {k: sum(p[k] * p["tokens"] for p in parts) / tokens if tokens else 0.0 for k in parts[0] if k != "tokens"}


def mean_of(stats: list[dict], key: str) -> float:
    return sum(st[key] for st in stats) / len(stats)


def check_finite(step: int, what: str, values: torch.Tensor) -> None:
    if distributed.any_rank(not bool(torch.isfinite(values).all())):  # every process stops together
        raise TrainingAborted(f"non-finite {what} at step {step} ({values.tolist()[:4]}...); stopped before "
                              f"updating the weights with it; the last checkpoint in the output_dir is kept")


@contextmanager
def phase(times: dict, name: str, device: torch.device):
    """times[name] = the seconds the block takes (a step's generation, scoring, update ...)."""
    with stopwatch(device) as watch:
        yield
    times[name] = watch.seconds


def rollout_seed(s: RLSetup, step: int, round_: int = 0) -> int:
    """The sampling seed of a step (and of a refill round in it) on this process: a pure function of them, so a
    resumed run samples what the uninterrupted one did."""
    cfg = s.cfg
    return (cfg.seed * 1_000_003 + cfg.rollout.seed * 1009 + step + 7_919 * round_
            + 100_000_007 * distributed.world().rank)


def sample(model: ActorCritic, s: RLSetup, prompts: list[list[int]], seed: int) -> Experience:
    """One answer to each prompt from the policy, with the sampler's own log-probs, packed on the device."""
    sampling = dataclasses.replace(s.cfg.rollout, seed=seed)
    return pack(s.engine.sample(model, prompts, sampling, logprobs=True), s.chat.pad_id, s.device)
