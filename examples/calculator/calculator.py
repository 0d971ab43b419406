"""A tool-use environment for `llmft grpo` (docs/environments.md): sums of two five-digit numbers, too large for a
135M model to add in its head, a calculator tool, and a checker of the final answer.

    env:
      name: examples.calculator.calculator:Calculator     # from the repository's root
"""

from __future__ import annotations

import re

from llmft.env import Environment, StepResult


class Calculator(Environment):
    """The row's a + b to find; the final answer (a turn that calls no tool) scores 1 when its last number is the
    sum, else 0."""

    def __init__(self):
        self.tools = [self.add]

    def add(self, a: int, b: int) -> int:
        """Add two integers.

        Args:
            a: The first number.
            b: The second number.
        """
        return int(a) + int(b)

    def reset(self, row: dict) -> list[dict]:
        self.total = row["a"] + row["b"]
        return [{"role": "user", "content": question(row["a"], row["b"])}]

    def step(self, messages: list[dict]) -> StepResult:
        numbers = re.findall(r"-?\d+", messages[-1]["content"].replace(",", ""))
        return StepResult(None, float(bool(numbers) and int(numbers[-1]) == self.total), True)


def question(a: int, b: int) -> str:
    return f"What is {a} + {b}?"
