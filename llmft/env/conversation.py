"""Tokens in, tokens out: a multi-turn conversation as one token sequence in which the policy's tokens are exactly
the ones it sampled.

    opening     the environment's first messages rendered through the generation prompt (tools in the template's
                own `tools` argument), tokenised                                              → prompt ids
    policy turn its sampled ids, verbatim, through its stop id                                → mask 1
    what the environment adds (observations, tool results, the next generation prompt): the conversation rendered
                again, and only the text after what is already there tokenised, in its context → mask 0

Nothing the policy wrote is ever decoded and encoded again. That needs a template that renders earlier turns the
same once later ones exist (prefix-preserving): every new rendering must start with the text of the one before,
else one clear error (`prefix_self_test` checks the turns an environment produces before a run starts).
"""

from __future__ import annotations

import json

from llmft.data.chat import Chat
from llmft.errors import ConfigError, DataError


def render(chat: Chat, messages: list[dict], tools: list[dict] | None, where: str) -> str:
    """The conversation rendered through the generation prompt. Assistant turns render as the text the policy
    wrote (their parsed `tool_calls` are not rendered a second time)."""
    plain = [{k: v for k, v in m.items() if k != "tool_calls"} for m in messages]
    try:
        return chat.tokenizer.apply_chat_template(plain, tools=tools or None, tokenize=False,
                                                  add_generation_prompt=True)
    except Exception as e:  # noqa: BLE001 - templates raise anything (jinja errors, role checks)
        raise DataError(f"{where}: the chat template rejects this conversation: {e}") from None


def check_template(chat: Chat) -> None:
    if not chat.templated:
        raise ConfigError("env: a multi-turn environment needs a chat template; give the model one in the stage "
                          "that starts from it (model.chat_template)")
    if not chat.frame.end:
        raise ConfigError("env: the chat template ends turns in plain text, so a policy turn's end (EOS) is never "
                          "written between turns: it cannot hold a multi-turn conversation")


def assistant_content(chat: Chat, ids: list[int], finished: bool) -> str:
    """What the policy wrote in a turn, as the assistant message's content: its ids decoded with special tokens
    kept (Mistral's [TOOL_CALLS] is one), less the stop id and the template's lead-in (Qwen3's think block)."""
    text = chat.tokenizer.decode(ids[:-1] if finished else ids, skip_special_tokens=False)
    lead = chat.frame.lead
    return text[len(lead):] if lead and text.startswith(lead) else text


def following_ids(chat: Chat, before: str, rendered: str, where: str) -> list[int]:
    """The ids of what `rendered` adds after `before` (the text already in the sequence), tokenised in its context.
    The template must keep `before` as it was: else one clear error."""
    if not rendered.startswith(before):
        raise DataError(f"{where}: the chat template renders earlier turns differently once later ones exist (Qwen3 "
                        f"drops earlier think blocks; Mistral moves the system message to the last user turn), so the "
                        f"conversation cannot stay one token sequence with the policy's own tokens; use a "
                        f"prefix-preserving template (model.chat_template in the stage that starts from the model)")
    return chat.following(before, chat.ids(before), rendered[len(before):])


def probe_call(fmt: str, name: str) -> str:
    """A tool call in the format's own syntax, for the self-test."""
    if fmt == "hermes":
        return f'<tool_call>\n{json.dumps({"name": name, "arguments": {}})}\n</tool_call>'
    if fmt == "mistral":
        return "[TOOL_CALLS]" + json.dumps([{"name": name, "arguments": {}}])
    return json.dumps({"name": name, "parameters": {}})


def prefix_self_test(chat: Chat, opening: list[dict], tools: list[dict] | None, fmt: str | None,
                     where: str) -> None:
    """Two policy turns with an environment turn between (a tool call and its result when there are tools, else a
    user observation), each rendering checked to start with the text before it: a template that is not
    prefix-preserving for the turns this environment produces is refused before the run starts."""
    name = tools[0]["function"]["name"] if tools else ""
    first = probe_call(fmt, name) if tools else "Sure."
    observation = {"role": "tool", "name": name, "content": "1"} if tools else {"role": "user", "content": "Go on."}
    messages = list(opening)
    text = render(chat, messages, tools, where)
    for content, added in ((first, [observation]), ("Done.", [{"role": "user", "content": "Thanks."}])):
        text += chat.answer_text(content)
        messages += [{"role": "assistant", "content": content}, *added]
        following_ids(chat, text, render(chat, messages, tools, where), where)
        text = render(chat, messages, tools, where)
