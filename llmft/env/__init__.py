"""Environments for multi-turn and tool-using RL (`env:` in grpo): the protocol a user's class follows, its tools,
and how a conversation's new turns become tokens. docs/environments.md has the protocol and a complete example."""

from llmft.env.protocol import Environment, StepResult  # noqa: F401 (the public names)
