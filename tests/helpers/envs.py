"""Environments the multi-turn tests run: one without tools (a reply, an observation, a second reply), one with a
calculator tool, and broken ones (raising, slow, off-protocol)."""

from __future__ import annotations

import time

from llmft.env import Environment, StepResult


class TwoTurns(Environment):
    """The policy replies, is told to go on, replies again; each reply scores its length / 10 (one decimal)."""

    def __init__(self, turns: int = 2):
        self.turns, self.seen = turns, 0

    def step(self, messages):
        self.seen += 1
        reward = round(len(messages[-1]["content"]) / 10, 1)
        if self.seen >= self.turns:
            return StepResult(None, reward, True)
        return StepResult([{"role": "user", "content": "go on"}], reward, False)


def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: The first.
        b: The second.
    """
    return a + b


class Calculator(Environment):
    """A sum to find, a calculator tool; the final answer scores 1 when it holds the sum."""

    tools = [add]

    def reset(self, row):
        self.answer = row["a"] + row["b"]
        return [{"role": "user", "content": f"what is {row['a']} + {row['b']}?"}]

    def step(self, messages):
        return None, float(str(self.answer) in messages[-1]["content"]), True


class Raises(TwoTurns):
    def step(self, messages):
        raise ValueError("broken on purpose")


class Slow(TwoTurns):
    def step(self, messages):
        time.sleep(5)


class OffProtocol(TwoTurns):
    def step(self, messages):
        return "done"


class Opening(TwoTurns):
    """TwoTurns on rows without a prompt: its reset builds the opening from the row's word."""

    def reset(self, row):
        return [{"role": "user", "content": f"say {row['word']}"}]
