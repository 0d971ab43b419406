"""Tool calls read in each family's format, the format read from a template, schemas from type hints and
docstrings, and a call's failures fed back as its result."""

from __future__ import annotations

import time

import pytest

from llmft.env.tools import ToolCall, call_format, parse_calls, run_call, schemas
from llmft.errors import ConfigError
from tests.helpers.envs import add


def test_hermes_calls():
    text = ('I will add.\n<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>\n'
            '<tool_call>{"name": "add", "arguments": "{\\"a\\": 3, \\"b\\": 4}"}</tool_call>')
    assert parse_calls(text, "hermes") == [ToolCall("add", {"a": 1, "b": 2}), ToolCall("add", {"a": 3, "b": 4})]
    assert parse_calls("the answer is 3", "hermes") == []
    [broken] = parse_calls('<tool_call>{"name": "add", "arguments": {"a": 1</tool_call>', "hermes")
    assert broken.error.startswith("the tool call is not valid JSON")


def test_llama3_calls():
    assert parse_calls('<|python_tag|>{"name": "add", "parameters": {"a": 1, "b": 2}}', "llama3") == [
        ToolCall("add", {"a": 1, "b": 2})]
    assert parse_calls('{"name": "add", "parameters": {"a": 1, "b": 2}}; {"name": "add", "parameters": {"a": 0, '
                       '"b": 0}}', "llama3") == [ToolCall("add", {"a": 1, "b": 2}), ToolCall("add", {"a": 0, "b": 0})]
    assert parse_calls("3", "llama3") == []


def test_mistral_calls():
    assert parse_calls('[TOOL_CALLS][{"name": "add", "arguments": {"a": 1, "b": 2}}]', "mistral") == [
        ToolCall("add", {"a": 1, "b": 2})]
    assert parse_calls('[TOOL_CALLS]add[ARGS]{"a": 1, "b": 2}', "mistral") == [ToolCall("add", {"a": 1, "b": 2})]
    assert parse_calls("three", "mistral") == []


def test_the_format_is_read_from_the_template():
    from llmft.data.templates import HERMES

    assert call_format(HERMES) == "hermes"
    assert call_format("{{ '<|python_tag|>' }}{% for t in tools %}{% endfor %}") == "llama3"
    assert call_format("{{ '[TOOL_CALLS]' }}") == "mistral"
    with pytest.raises(ConfigError, match="has no tool support"):
        call_format("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    with pytest.raises(ConfigError, match="in a format llmft does not read"):
        call_format("{% if tools %}{{ tools }}{% endif %}")


def test_schemas_need_documented_arguments():
    assert schemas([add])[0]["function"]["parameters"]["properties"]["a"] == {"type": "integer",
                                                                                "description": "The first."}

    def undocumented(x: int) -> int:
        return x

    with pytest.raises(ConfigError, match="env tool 'undocumented'"):
        schemas([undocumented])


def test_a_failed_call_is_its_result():
    def slow(x: int) -> int:
        """Sleep.

        Args:
            x: Ignored.
        """
        time.sleep(3)
        return x

    tools = {"add": add, "slow": slow}
    assert run_call(tools, ToolCall("add", {"a": 1, "b": 2}), 1.0) == ("3", False)
    assert run_call(tools, ToolCall("sub", {}), 1.0) == ("error: unknown tool 'sub' (tools: add, slow)", True)
    text, failed = run_call(tools, ToolCall("add", {"a": 1}), 1.0)
    assert failed and text.startswith("error: TypeError") and "'b'" in text
    assert run_call(tools, ToolCall("slow", {"x": 1}), 0.1) == ("error: tool slow took longer than env.timeout = "
                                                                "0.1 s", True)
    assert run_call(tools, ToolCall("", {}, "bad JSON"), 1.0) == ("error: bad JSON", True)
