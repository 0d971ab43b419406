"""The environment protocol: what a user's class gives llmft, and how llmft calls it.

One instance per trajectory, made as `Class(**env.args)` (`env.name: module:Class`):

    messages = env.reset(row)                 the conversation's opening turns for a data row (default: its prompt)
    repeat, up to env.max_turns policy turns and env.max_tokens tokens after the opening:
        the policy answers one assistant turn (its sampled tokens are kept verbatim)
        the answer calls tools (env.tools)  → llmft runs each call and appends its result as a tool turn
        it calls none                       → env.step(messages) → (observations, reward, done):
                                              observations (messages, or None) are appended and the policy goes on,
                                              reward (or None) is this turn's, done ends the trajectory

`messages[-1]` in `step` is the policy's turn: {"role": "assistant", "content": the text it wrote}. A trajectory's
score is the sum of its turns' rewards. `tools` are plain functions or methods with type hints and a docstring whose
Args section describes each argument (transformers' `get_json_schema` reads them); the chat template's own `tools`
argument offers them to the model.
"""

from __future__ import annotations

import inspect
import signal
from collections.abc import Callable
from contextlib import contextmanager
from typing import NamedTuple

from llmft.errors import ConfigError


class StepResult(NamedTuple):
    messages: list[dict] | None  # observations appended to the conversation (none: the policy's turn ends it or not)
    reward: float | None  # this turn's reward (none: 0)
    done: bool  # the trajectory ends here


class Environment:
    """The base class of an environment (subclassing it is optional: any class with `reset` and `step` will do)."""

    tools: list[Callable] = []  # functions or methods offered to the model as tools

    def reset(self, row: dict) -> list[dict]:
        """The opening messages for a data row: its `prompt` (a string or messages) or `messages`."""
        from llmft.data.records import Record, prompt_messages

        return prompt_messages(Record(row, "env.reset"))

    def step(self, messages: list[dict]) -> StepResult:
        """After a policy turn without tool calls: observations, this turn's reward, whether the trajectory ends."""
        raise NotImplementedError


class EnvError(Exception):
    """The environment's code raised, returned something else than the protocol says, or took too long."""


def environment_class(spec: str) -> type:
    """The class `module:Class` names, checked for `reset` and `step`."""
    from llmft.judges import import_from_here

    module, _, name = spec.partition(":")
    if not module or not name:
        raise ConfigError(f"env.name: '{spec}' is not module:Class")
    try:
        cls = getattr(import_from_here(module), name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"env.name: cannot import {name} from {module}: {e} (modules are found on PYTHONPATH and "
                          f"in the working directory)") from None
    missing = [m for m in ("reset", "step") if not callable(getattr(cls, m, None))]
    if not inspect.isclass(cls) or missing:
        raise ConfigError(f"env.name: {spec} must be a class with reset(row) and step(messages) methods"
                          + (f"; it has no {', '.join(missing)}" if missing and inspect.isclass(cls) else ""))
    return cls


def make_environment(cls: type, args: dict):
    try:
        return cls(**args)
    except Exception as e:  # noqa: BLE001 - the user's code
        raise ConfigError(f"env: {cls.__name__}(**env.args) raised {type(e).__name__}: {e}") from None


def step_result(value) -> StepResult:
    """`step`'s return value, checked: (messages | None, reward | None, done)."""
    if not isinstance(value, tuple) or len(value) != 3:
        raise EnvError(f"step must return (messages or None, reward or None, done), got {str(value)[:80]}")
    messages, reward, done = value
    check_messages(messages, "step", allow_none=True)
    if reward is not None:
        try:
            reward = float(reward)
        except (TypeError, ValueError):
            raise EnvError(f"step returned a reward that is not a number: {str(reward)[:40]}") from None
        if reward != reward or reward in (float("inf"), float("-inf")):
            raise EnvError(f"step returned a reward that is not finite: {reward}")
    return StepResult(messages, reward, bool(done))


def check_messages(messages, where: str, allow_none: bool = False) -> None:
    if messages is None and allow_none:
        return
    if not isinstance(messages, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages):
        raise EnvError(f"{where} must return a list of messages ({{role, content}} dicts), got {str(messages)[:80]}")
    if not messages and not allow_none:
        raise EnvError(f"{where} returned no messages")


@contextmanager
def time_limit(seconds: float, what: str):
    """Raise EnvError when the block takes longer than `seconds` (SIGALRM: the main thread of a Unix process, as
    every llmft process is; elsewhere the block runs unbounded)."""
    def expire(*_):
        raise EnvError(f"{what} took longer than env.timeout = {seconds:g} s")

    usable = seconds > 0 and hasattr(signal, "setitimer")
    if usable:
        try:
            previous = signal.signal(signal.SIGALRM, expire)
        except ValueError:  # not the main thread
            usable = False
    if usable:
        signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        if usable:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)


def call(what: str, seconds: float, fn: Callable, *args):
    """fn(*args) under the time limit; whatever it raises becomes an EnvError naming `what`."""
    try:
        with time_limit(seconds, what):
            return fn(*args)
    except EnvError:
        raise
    except Exception as e:  # noqa: BLE001 - the user's code
        raise EnvError(f"{what} raised {type(e).__name__}: {e}") from None
