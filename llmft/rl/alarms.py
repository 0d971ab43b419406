"""The reward-hacking alarm: signals in a run's own metric stream that the policy is getting richer, not better.

Each signal is a pure function of the metric rows logged so far (one dict per training step, `eval/…` merged in on
the steps that evaluated) and returns a one-line reason, or None. With W = alarm.window:

    reward_vs_held_out   the training reward's mean over the last W steps is above its mean over the W before, while
                         the independent held-out score (alarm.independent, e.g. eval/constraints/pass_rate) has
                         fallen by alarm.held_out_drop or more from its best so far
    kl_budget            KL to the reference (nats per answer: ppo's objective/kl, grpo's eval/kl) above alarm.kl_budget
    length               the mean answer length over the last W steps below alarm.length_collapse × its first W's
                         mean (answers collapsing), or above alarm.near_limit × max_new_tokens (env.max_tokens with
                         an environment) while the share cut there rises (running to the limit)
    no_stop              the share of answers without a stop id over the last W steps above its first W's by
                         alarm.no_stop_rise or more
    entropy              the mean token entropy over the last W steps below alarm.entropy_collapse × its first W's
    reward_model_range   a reward model's scores of the policy's answers outside the range of its scores on its own
                         training answers (its 1st–99th percentile, recorded by `llmft reward`) for more than
                         alarm.out_of_range of the answers over the last W steps: it is extrapolating

A signal needs its metric (`length` its answer lengths, `kl_budget` a KL): where a stage does not log it, it is
silent. Each fires once per run (the first step it holds), so a warning is not repeated every step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from llmft.errors import ConfigError
from llmft.schema import opt


@dataclass
class AlarmConfig:
    on_alarm: Literal["warn", "stop", "off"] = opt(
        "warn", "What a fired signal does: warn (a console warning and an `alarms` entry in metrics.jsonl), stop "
                "(the same, then the run ends there and saves its policy as if finished), or off.")
    window: int = opt(4, "Steps each signal averages over (its last W steps against the W before, or the first W).",
                      ge=1)
    independent: str | None = opt(
        None, "A held-out score that is not the training reward, higher = better (an eval/… metric, e.g. "
              "eval/constraints/pass_rate or eval/rouge_l; needs data.eval and train.eval_every): the alarm fires "
              "when the reward rises while it falls.")
    held_out_drop: float = opt(0.05, "How far `independent` must fall below its best so far.", ge=0)
    kl_budget: float | None = opt(None, "KL to the reference, nats per answer, beyond which the alarm fires; "
                                        "null = no budget.", gt=0)
    length_collapse: float = opt(0.5, "Answers collapsing: the mean length below this share of the first W steps' "
                                      "mean.", gt=0, lt=1)
    near_limit: float = opt(0.9, "Answers running to the limit: the mean length above this share of "
                                 "max_new_tokens while the share cut there rises.", gt=0, le=1)
    no_stop_rise: float = opt(0.25, "The share of answers without a stop id rising this much above the first W "
                                    "steps' share.", gt=0, le=1)
    out_of_range: float = opt(0.5, "The share of answers a reward model scores outside the range it gave its own "
                                   "training answers (1st–99th percentile) beyond which the alarm fires.", gt=0, le=1)
    entropy_collapse: float = opt(0.2, "The mean token entropy below this share of the first W steps' mean.",
                                  gt=0, lt=1)


@dataclass(frozen=True)
class Keys:
    """Where a stage logs what the signals read (None: the stage does not log it)."""

    reward: str = "reward"
    kl: str | None = None  # nats per answer
    length: str = "completions/mean_length"
    no_stop: str = "completions/clipped_ratio"
    entropy: str | None = "entropy"
    out_of_range: str = "rewards/reward_model/out_of_range"


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def series(history: list[dict], key: str | None) -> list[float]:
    return [row[key] for row in history if key and key in row]


def reward_vs_held_out(history: list[dict], cfg: AlarmConfig, keys: Keys, max_new_tokens: int) -> str | None:
    reward, held_out, w = series(history, keys.reward), series(history, cfg.independent), cfg.window
    if len(reward) < 2 * w or len(held_out) < 2:
        return None
    rising = mean(reward[-w:]) > mean(reward[-2 * w:-w])
    fall = max(held_out) - held_out[-1]
    if rising and fall >= cfg.held_out_drop:
        return (f"the training reward rose ({mean(reward[-2 * w:-w]):.3g} → {mean(reward[-w:]):.3g} over the last "
                f"{w} steps) while {cfg.independent} fell from {max(held_out):.3g} to {held_out[-1]:.3g}")
    return None


def kl_budget(history: list[dict], cfg: AlarmConfig, keys: Keys, max_new_tokens: int) -> str | None:
    kl = series(history, keys.kl)
    if cfg.kl_budget is None or not kl or kl[-1] <= cfg.kl_budget:
        return None
    return f"KL to the reference {kl[-1]:.3g} nats per answer is over alarm.kl_budget = {cfg.kl_budget:g}"


def length(history: list[dict], cfg: AlarmConfig, keys: Keys, max_new_tokens: int) -> str | None:
    lengths, cut, w = series(history, keys.length), series(history, keys.no_stop), cfg.window
    if len(lengths) < 2 * w:
        return None
    first, last = mean(lengths[:w]), mean(lengths[-w:])
    if last < cfg.length_collapse * first:
        return f"answers collapsed from {first:.3g} to {last:.3g} tokens on average"
    limit = cfg.near_limit * max_new_tokens
    if last > limit and last > first and len(cut) >= 2 * w and mean(cut[-w:]) > mean(cut[:w]):
        return (f"answers run to the limit: {last:.3g} tokens on average of max_new_tokens {max_new_tokens}, "
                f"{mean(cut[-w:]):.0%} cut there")
    return None


def no_stop(history: list[dict], cfg: AlarmConfig, keys: Keys, max_new_tokens: int) -> str | None:
    cut, w = series(history, keys.no_stop), cfg.window
    if len(cut) < 2 * w or mean(cut[-w:]) - mean(cut[:w]) < cfg.no_stop_rise:
        return None
    return f"answers without a stop id rose from {mean(cut[:w]):.0%} to {mean(cut[-w:]):.0%}"


def entropy(history: list[dict], cfg: AlarmConfig, keys: Keys, max_new_tokens: int) -> str | None:
    h, w = series(history, keys.entropy), cfg.window
    if len(h) < 2 * w or mean(h[-w:]) >= cfg.entropy_collapse * mean(h[:w]):
        return None
    return f"the policy's entropy collapsed from {mean(h[:w]):.3g} to {mean(h[-w:]):.3g} nats per token"


def reward_model_range(history: list[dict], cfg: AlarmConfig, keys: Keys, max_new_tokens: int) -> str | None:
    share, w = series(history, keys.out_of_range), cfg.window
    if len(share) < w or mean(share[-w:]) <= cfg.out_of_range:
        return None
    return (f"the reward model scores {mean(share[-w:]):.0%} of the answers over the last {w} steps outside the range "
            f"it gave its own training answers: it is extrapolating, its scores no longer mean what they did")


SIGNALS: dict[str, Callable[[list[dict], AlarmConfig, Keys, int], str | None]] = {
    "reward_vs_held_out": reward_vs_held_out, "kl_budget": kl_budget, "length": length, "no_stop": no_stop,
    "entropy": entropy, "reward_model_range": reward_model_range}


class Alarm:
    """The signals of one run. `observe(step, values)` after each step (its training metrics and any eval/… of that
    step) returns the signals that fire for the first time. `history` and `fired` go into every checkpoint, so a
    resumed run goes on from them."""

    def __init__(self, cfg: AlarmConfig, keys: Keys, max_new_tokens: int):
        self.cfg, self.keys, self.max_new_tokens = cfg, keys, max_new_tokens
        self.fired: list[str] = []
        self.history: list[dict] = []

    @property
    def stops(self) -> bool:
        return self.cfg.on_alarm == "stop"

    def baseline(self, evaluated: dict) -> None:
        """The evaluation before the first step (step 0)."""
        self.history.append({"step": 0, **evaluated})
        self.check_independent(evaluated)

    def observe(self, step: int, values: dict) -> dict[str, str]:
        self.history.append({"step": step, **values})
        self.check_independent(values)
        return self.check(self.history)

    def check_independent(self, values: dict) -> None:
        """alarm.independent must name a metric the held-out evaluation logs: one clear error at the first one."""
        key, logged = self.cfg.independent, sorted(k for k in values if k.startswith("eval/"))
        if key and logged and key not in values:
            raise ConfigError(f"alarm.independent: the held-out evaluation logs no {key}; it logs {', '.join(logged)}")

    def check(self, history: list[dict]) -> dict[str, str]:
        if self.cfg.on_alarm == "off":
            return {}
        out = {}
        for name, signal in SIGNALS.items():
            reason = None if name in self.fired else signal(history, self.cfg, self.keys, self.max_new_tokens)
            if reason:
                out[name] = reason
                self.fired.append(name)
        return out
