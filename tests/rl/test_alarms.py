"""The reward-hacking alarm's signals on constructed metric streams: each fires on the stream that shows it, at the
step it first holds, and stays quiet on a run that learns honestly."""

from __future__ import annotations

import pytest
import torch

from llmft.rl.alarms import Alarm, AlarmConfig, Keys

KEYS = Keys(kl="objective/kl")


def stream(n: int = 8, **columns) -> list[dict]:
    """n training steps; each column a function of the step (from 1)."""
    healthy = {"reward": lambda t: 0.1 * t, "completions/mean_length": lambda t: 30.0,
               "completions/clipped_ratio": lambda t: 0.05, "entropy": lambda t: 2.0, "objective/kl": lambda t: 0.5}
    fns = {**healthy, **columns}
    return [{"step": t, **{k: f(t) for k, f in fns.items() if f(t) is not None}} for t in range(1, n + 1)]


def first_firing(history: list[dict], cfg: AlarmConfig) -> dict[int, dict]:
    alarm, fired = Alarm(cfg, KEYS, max_new_tokens=64), {}
    for t in range(1, len(history) + 1):
        if got := alarm.check(history[:t]):
            fired[t] = got
    return fired


def test_an_honest_run_fires_nothing():
    held_out = {"eval/pass_rate": lambda t: 0.3 + 0.02 * t if t % 2 == 0 else None}  # evaluated every 2 steps
    cfg = AlarmConfig(window=2, independent="eval/pass_rate", kl_budget=5.0)
    assert first_firing(stream(12, **held_out), cfg) == {}


def test_reward_rising_while_the_held_out_score_falls():
    # eval at steps 2, 4, 6, 8: 0.40, 0.42, 0.38, 0.30; the reward rises all along
    scores = {2: 0.40, 4: 0.42, 6: 0.38, 8: 0.30}
    cfg = AlarmConfig(window=2, independent="eval/pass_rate", held_out_drop=0.05)
    fired = first_firing(stream(8, **{"eval/pass_rate": scores.get}), cfg)
    assert list(fired) == [8]  # at 6 it fell by 0.04 only; at 8 by 0.12
    assert "eval/pass_rate fell from 0.42 to 0.3" in fired[8]["reward_vs_held_out"]
    flat = {"reward": lambda t: 1.0}  # the reward not rising: a falling score alone is not this signal
    assert first_firing(stream(8, **flat, **{"eval/pass_rate": scores.get}), cfg) == {}


def test_kl_beyond_its_budget():
    fired = first_firing(stream(6, **{"objective/kl": lambda t: 2.0 * t}), AlarmConfig(kl_budget=7.0))
    assert list(fired) == [4] and "8 nats per answer is over alarm.kl_budget = 7" in fired[4]["kl_budget"]
    assert first_firing(stream(6, **{"objective/kl": lambda t: 2.0 * t}), AlarmConfig()) == {}  # no budget set


@pytest.mark.parametrize("lengths, cut, expected", [
    # "Thanks for asking." as a whole answer: mean(10, 8) < 0.5 × 30 first at step 5
    ([30, 30, 20, 10, 8, 6], [0.0] * 6, "collapsed from 30 to 9"),
    # mean(60, 62) > 0.9 × 64 first at step 5, with the share cut rising
    ([30, 30, 50, 60, 62, 64], [0.0, 0.0, 0.2, 0.6, 0.8, 1.0], "run to the limit: 61 tokens"),
])
def test_answer_length_collapsing_or_running_to_the_limit(lengths, cut, expected):
    history = stream(6, **{"completions/mean_length": lambda t: lengths[t - 1],
                           "completions/clipped_ratio": lambda t: cut[t - 1]})
    fired = first_firing(history, AlarmConfig(window=2, no_stop_rise=1.0))
    assert list(fired) == [5] and expected in fired[5]["length"]


def test_answers_without_a_stop_id_rising_and_entropy_collapsing():
    history = stream(6, **{"completions/clipped_ratio": lambda t: [0.0, 0.1, 0.1, 0.3, 0.4, 0.5][t - 1],
                           "entropy": lambda t: [2.0, 2.0, 1.0, 0.6, 0.3, 0.2][t - 1]})
    fired = first_firing(history, AlarmConfig(window=2))
    assert fired[5] == {"no_stop": "answers without a stop id rose from 5% to 35%"}  # 0.35 − 0.05 ≥ 0.25
    assert "collapsed from 2 to 0.25" in fired[6]["entropy"]  # 0.25 < 0.2 × 2.0 only at step 6
    assert all(len(v) == 1 for v in fired.values())  # each signal fires once


def test_off_fires_nothing():
    history = stream(6, **{"objective/kl": lambda t: 10.0})
    assert first_firing(history, AlarmConfig(kl_budget=1.0, on_alarm="off")) == {}


def test_a_reward_model_scoring_outside_its_training_range():
    """The share of answers scored outside the reward model's 1st–99th percentile on its training answers: above
    alarm.out_of_range over a window, the reward model is extrapolating."""
    share = [0.0, 0.1, 0.3, 0.6, 0.8, 0.9]
    history = stream(6, **{"rewards/reward_model/out_of_range": lambda t: share[t - 1]})
    fired = first_firing(history, AlarmConfig(window=2))
    assert list(fired) == [5]  # mean(0.6, 0.8) = 0.7 > 0.5; at 4 mean(0.3, 0.6) = 0.45
    assert "scores 70% of the answers over the last 2 steps outside the range" in fired[5]["reward_model_range"]
    assert first_firing(stream(6), AlarmConfig(window=2)) == {}  # judges only: nothing logged, silent


def test_the_out_of_range_share_counts_answers_outside_the_trained_range():
    from llmft.rl.scoring import REWARD_MODEL, Scorer

    scorer = Scorer.__new__(Scorer)
    scorer.range = (-1.0, 2.0)
    parts = {REWARD_MODEL: torch.tensor([-1.5, -1.0, 0.0, 2.0, 2.5, 9.0]), "constraints": torch.ones(6)}
    assert scorer.range_metrics(parts) == {"rewards/reward_model/out_of_range": 0.5}  # the bounds are inside
    scorer.range = None  # a reward run written before the range was recorded
    assert scorer.range_metrics(parts) == {}
