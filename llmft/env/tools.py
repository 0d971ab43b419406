"""Tools: their schemas for the chat template, the calls a model writes in its family's format, and running them.

    hermes   Qwen2.5 / Qwen3 (and llmft's `hermes` template): <tool_call>{"name": ..., "arguments": {...}}</tool_call>,
             one block per call
    llama3   Llama-3.1+: the turn is a JSON object {"name": ..., "parameters": {...}} (after <|python_tag|> or not);
             several separated by ';'
    mistral  [TOOL_CALLS][{"name": ..., "arguments": {...}}, ...], or [TOOL_CALLS]name[ARGS]{...} (v11+)

The format is read from the chat template's text; a template that never mentions tools has no tool support.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass

from llmft.env.protocol import EnvError, time_limit
from llmft.errors import ConfigError

FORMATS = ("hermes", "llama3", "mistral")
HERMES = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)


@dataclass
class ToolCall:
    name: str
    arguments: dict
    error: str | None = None  # the call could not be read (malformed JSON, no name): fed back to the model


def call_format(template: str | None) -> str:
    """The tool-call format of a chat template, or a clear error when it has no tool support."""
    text = template or ""
    if "<tool_call>" in text:
        return "hermes"
    if "[TOOL_CALLS]" in text:
        return "mistral"
    if "<|python_tag|>" in text or "ipython" in text:
        return "llama3"
    if "tools" in text:
        raise ConfigError("env.tools: the chat template takes tools but writes calls in a format llmft does not read "
                          f"({', '.join(FORMATS)})")
    raise ConfigError("env.tools: the model's chat template has no tool support (it never renders `tools`); give "
                      "the model one in the stage that starts from it, e.g. sft with model.chat_template: hermes")


def schemas(tools: list[Callable]) -> list[dict]:
    """The JSON schema of each tool (from its type hints and docstring), one clear error naming a tool without."""
    from transformers.utils import get_json_schema

    out = []
    for fn in tools:
        try:
            out.append(get_json_schema(fn))
        except Exception as e:  # noqa: BLE001 - transformers raises its own exceptions for each defect
            name = getattr(fn, "__name__", str(fn))
            raise ConfigError(f"env tool '{name}': {e} (a tool needs type hints and a docstring with an Args "
                              f"section describing each argument)") from None
    return out


def parse_calls(text: str, fmt: str) -> list[ToolCall]:
    """The tool calls in a policy turn's text ([] when it calls none)."""
    if fmt == "hermes":
        return [read_call(block) for block in HERMES.findall(text)] if "<tool_call>" in text else []
    if fmt == "mistral":
        return mistral_calls(text)
    body = text.strip().removeprefix("<|python_tag|>").strip()
    if not body.startswith("{"):
        return []
    return [read_call(part, "parameters") for part in split_objects(body)]


def read_call(body: str, arguments_key: str = "arguments") -> ToolCall:
    try:
        obj = json.loads(body)
    except json.JSONDecodeError as e:
        return ToolCall("", {}, f"the tool call is not valid JSON ({e.msg} at character {e.pos})")
    return call_from(obj, arguments_key)


def call_from(obj, arguments_key: str = "arguments") -> ToolCall:
    """A parsed call object {"name", "arguments" (or "parameters")} as a ToolCall, or the reason it is not one."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return ToolCall("", {}, 'a tool call must be a JSON object with a "name"')
    args = obj.get(arguments_key, obj.get("arguments", obj.get("parameters", {})))
    if isinstance(args, str):  # some models write the arguments as a JSON string
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            pass
    if not isinstance(args, dict):
        return ToolCall(obj["name"], {}, f'the "{arguments_key}" of a tool call must be a JSON object')
    return ToolCall(obj["name"], args)


def split_objects(body: str) -> list[str]:
    """JSON objects separated by ';' (Llama-3.1's several calls); one piece when it is not that."""
    parts = [p.strip() for p in body.split(";")]
    return parts if len(parts) > 1 and all(p.startswith("{") for p in parts) else [body]


def mistral_calls(text: str) -> list[ToolCall]:
    if "[TOOL_CALLS]" not in text:
        return []
    body = text.split("[TOOL_CALLS]", 1)[1].strip()
    if "[ARGS]" in body:  # v11+: name[ARGS]{...}, repeated after further [TOOL_CALLS]
        calls = []
        for piece in text.split("[TOOL_CALLS]")[1:]:
            name, _, args = piece.partition("[ARGS]")
            calls.append(call_from({"name": name.strip(), "arguments": json.loads(args)}) if valid_json(args)
                         else ToolCall(name.strip(), {}, "the tool call's arguments are not JSON"))
        return calls
    try:
        objs = json.loads(body)
    except json.JSONDecodeError as e:
        return [ToolCall("", {}, f"the tool calls are not valid JSON ({e.msg} at character {e.pos})")]
    objs = objs if isinstance(objs, list) else [objs]
    return [call_from(o) for o in objs]


def valid_json(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except json.JSONDecodeError:
        return False


def run_call(tools: dict[str, Callable], call: ToolCall, timeout: float) -> tuple[str, bool]:
    """(the result as the tool turn's text, whether the call failed). A failed call — unreadable, an unknown tool,
    wrong arguments, the tool raising or running over env.timeout — is the model's mistake: its message is the
    result, so the model reads it, and it is counted."""
    if call.error:
        return f"error: {call.error}", True
    if call.name not in tools:
        return f"error: unknown tool '{call.name}' (tools: {', '.join(sorted(tools))})", True
    try:
        with time_limit(timeout, f"tool {call.name}"):
            result = tools[call.name](**call.arguments)
    except EnvError as e:
        return f"error: {e}", True
    except Exception as e:  # noqa: BLE001 - the tool's code, called with the model's arguments
        return f"error: {type(e).__name__}: {e}", True
    return result if isinstance(result, str) else json.dumps(result, default=str), False


def tool_table(tools: list[Callable]) -> dict[str, Callable]:
    table = {}
    for fn in tools:
        name = getattr(fn, "__name__", None)
        if not name or name in table:
            raise ConfigError(f"env tools: each tool needs a name of its own ({name or fn!r} is not one)")
        table[name] = fn
    return table
