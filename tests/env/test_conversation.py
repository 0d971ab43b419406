"""Multi-turn rollouts with a scripted engine: the mask over a constructed two-turn trajectory by hand, the policy's
tokens kept verbatim where decoding and encoding again would change them, tool calls run and fed back, the prefix
self-test, the limits (turns, tokens), and an environment's errors."""

from __future__ import annotations

import json

import pytest

from llmft.config import load_config
from llmft.data.chat import Chat
from llmft.data.records import Record
from llmft.data.templates import HERMES
from llmft.errors import ConfigError, DataError
from llmft.rl.multi_turn import Conversations
from llmft.rollout.generation import Answer
from tests.helpers.runs import save_config


class Scripted:
    """An engine that answers each turn with the next scripted token lists (one per live trajectory)."""

    def __init__(self, chat, turns: list[list[list[int]]]):
        self.chat, self.turns, self.prompts = chat, list(turns), []

    def sample(self, model, prompts, sampling, logprobs=False):
        self.prompts.append(prompts)
        out = []
        for ids in self.turns.pop(0)[:len(prompts)]:
            cut, finished = self.chat.cut(ids)
            out.append(Answer(prompts[0], cut, "", finished, [-0.5] * len(cut)))
        return out


def conversations(tmp_path, tokenizer, **env) -> Conversations:
    cfg = load_config("grpo", save_config(tmp_path, "grpo", {
        "model": {"name": "unused"}, "data": {"train": "unused"}, "reward": {},
        "env": {"name": "tests.helpers.envs:TwoTurns", **env}}))
    return Conversations(cfg, Chat(tokenizer))


def test_the_mask_of_a_two_turn_trajectory_by_hand(tmp_path, tiny_tokenizer):
    conv = conversations(tmp_path, tiny_tokenizer)
    chat = conv.chat
    end = chat.tokenizer.convert_tokens_to_ids("<|im_end|>")
    first, second = chat.ids("the sea") + [end], chat.ids("is blue") + [end]
    engine = Scripted(chat, [[first], [second]])
    [t] = conv.rollout(engine, None, [Record({"prompt": "hello world"}, "row 1")], sampling=_sampling())
    prompt = chat.ids("<|im_start|>user\nhello world<|im_end|>\n<|im_start|>assistant\n")
    between = chat.ids("\n<|im_start|>user\ngo on<|im_end|>\n<|im_start|>assistant\n")
    assert t.prompt_ids == prompt
    assert t.ids == first + between + second
    assert t.mask == [1] * len(first) + [0] * len(between) + [1] * len(second)
    assert t.logprobs == [-0.5] * len(first) + [0.0] * len(between) + [-0.5] * len(second)
    assert engine.prompts[1] == [prompt + first + between]  # the second turn sees the whole sequence
    assert t.rewards == [0.7, 0.7] and t.score == pytest.approx(1.4) and t.finished and not t.cut  # "the sea" / 10
    assert [m["role"] for m in t.messages] == ["user", "assistant", "user", "assistant"]


def test_the_policy_tokens_are_kept_verbatim_where_re_encoding_changes_them(tmp_path, tiny_tokenizer):
    conv = conversations(tmp_path, tiny_tokenizer)
    chat = conv.chat
    end = chat.tokenizer.convert_tokens_to_ids("<|im_end|>")
    spelled = [i for ch in "the sea" for i in chat.ids(ch)] + [end]  # "the sea" one character a token
    assert spelled != chat.ids("the sea") + [end]  # what decoding and encoding again would give
    [t] = conv.rollout(Scripted(chat, [[spelled], [spelled]]), None, [Record({"prompt": "hi"}, "row 1")], _sampling())
    assert t.ids[:len(spelled)] == spelled and t.ids[-len(spelled):] == spelled
    assert t.messages[1]["content"] == "the sea"  # the environment reads the text


def test_tool_calls_are_run_and_their_results_fed_back(tmp_path):
    from tests.helpers.tiny import build_tokenizer

    tok = build_tokenizer(HERMES)
    conv = conversations(tmp_path, tok, name="tests.helpers.envs:Calculator")
    assert conv.format == "hermes" and conv.tools[0]["function"]["name"] == "add"
    chat, end = conv.chat, tok.convert_tokens_to_ids("<|im_end|>")
    call = chat.ids('<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>') + [end]
    bad = chat.ids('<tool_call>\n{"name": "mul"}\n</tool_call>') + [end]
    final = chat.ids("5") + [end]
    engine = Scripted(chat, [[call, bad], [final, final]])
    trajectories = conv.rollout(engine, None, [Record({"a": 2, "b": 3}, "row 1"), Record({"a": 2, "b": 3}, "row 2")],
                                _sampling())
    good, wrong = trajectories
    assert good.messages[2] == {"role": "tool", "name": "add", "content": "5"}
    assert good.messages[1]["tool_calls"][0]["function"] == {"name": "add", "arguments": {"a": 2, "b": 3}}
    assert wrong.messages[2]["content"] == "error: unknown tool 'mul' (tools: add)"
    assert (good.tool_calls, good.tool_errors, wrong.tool_calls, wrong.tool_errors) == (1, 0, 1, 1)
    assert good.rewards == [0.0, 1.0] and good.score == 1.0
    between = chat.ids("\n<|im_start|>user\n<tool_response>\n5\n</tool_response><|im_end|>\n<|im_start|>assistant\n")
    assert good.ids == call + between + final
    assert "<tools>" in chat.decode(good.prompt_ids) or '"name": "add"' in tok.decode(good.prompt_ids)


def test_a_template_without_tools_is_refused_for_an_environment_with_tools(tmp_path, tiny_tokenizer):
    with pytest.raises(ConfigError, match="has no tool support"):
        conversations(tmp_path, tiny_tokenizer, name="tests.helpers.envs:Calculator")


def test_a_template_that_rewrites_earlier_turns_is_refused_at_start(tmp_path):
    from tests.helpers.families import QWEN3
    from tests.helpers.tiny import build_tokenizer

    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"prompt": "hi"}) + "\n")
    conv = conversations(tmp_path, build_tokenizer(QWEN3.replace("<think>\\n", "<think>\\n")))
    with pytest.raises(DataError, match="renders earlier turns differently"):
        conv.prompts(str(rows), "train", 256)


def test_the_token_budget_cuts_a_trajectory(tmp_path, tiny_tokenizer):
    conv = conversations(tmp_path, tiny_tokenizer, max_tokens=6)
    chat = conv.chat
    end = chat.tokenizer.convert_tokens_to_ids("<|im_end|>")
    first = chat.ids("the sea") + [end]
    [t] = conv.rollout(Scripted(chat, [[first], [first]]), None, [Record({"prompt": "hi"}, "row 1")], _sampling())
    assert len(first) < 6 and t.cut and t.over and t.ids == first  # the observation did not fit
    conv = conversations(tmp_path, tiny_tokenizer, max_tokens=2)
    [t] = conv.rollout(Scripted(chat, [[first]]), None, [Record({"prompt": "hi"}, "row 1")], _sampling())
    assert t.ids == first[:2] and t.cut and not t.finished and t.answer().finished is False


def test_max_turns_ends_a_trajectory(tmp_path, tiny_tokenizer):
    conv = conversations(tmp_path, tiny_tokenizer, max_turns=1, args={"turns": 5})
    chat = conv.chat
    first = chat.ids("the sea") + [chat.tokenizer.convert_tokens_to_ids("<|im_end|>")]
    engine = Scripted(chat, [[first]])
    [t] = conv.rollout(engine, None, [Record({"prompt": "hi"}, "row 1")], _sampling())
    assert t.turns == 1 and t.over and not t.cut and len(engine.prompts) == 1


@pytest.mark.parametrize("env, message", [
    ("Raises", "TwoTurns.step raised ValueError: broken on purpose|Raises.step raised ValueError: broken on purpose"),
    ("Slow", "took longer than env.timeout = 0.2 s"),
    ("OffProtocol", "step must return"),
])
def test_an_environment_error_names_the_row_or_scores_zero(tmp_path, tiny_tokenizer, env, message):
    chat = Chat(tiny_tokenizer)
    first = chat.ids("the sea") + [tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")]
    conv = conversations(tmp_path, tiny_tokenizer, name=f"tests.helpers.envs:{env}", timeout=0.2)
    with pytest.raises(DataError, match=f"row 7: env .*({message})"):
        conv.rollout(Scripted(chat, [[first]]), None, [Record({"prompt": "hi"}, "row 7")], _sampling())
    conv = conversations(tmp_path, tiny_tokenizer, name=f"tests.helpers.envs:{env}", timeout=0.2, on_error="zero")
    [t] = conv.rollout(Scripted(chat, [[first]]), None, [Record({"prompt": "hi"}, "row 7")], _sampling())
    assert t.failed and t.score == 0.0 and t.over


def test_unknown_environment_classes_are_one_clear_error(tmp_path, tiny_tokenizer):
    with pytest.raises(ConfigError, match="cannot import Nope from tests.helpers.envs"):
        conversations(tmp_path, tiny_tokenizer, name="tests.helpers.envs:Nope")
    with pytest.raises(ConfigError, match="is not module:Class"):
        conversations(tmp_path, tiny_tokenizer, name="justamodule")
    with pytest.raises(ConfigError, match=r"must be a class with reset\(row\) and step\(messages\)"):
        conversations(tmp_path, tiny_tokenizer, name="tests.helpers.envs:add")
    with pytest.raises(ConfigError, match="raised TypeError"):
        conversations(tmp_path, tiny_tokenizer, args={"nope": 1})


def _sampling():
    from llmft.sampling import RolloutConfig

    return RolloutConfig(temperature=1.0, max_new_tokens=8)


def test_an_sft_demonstration_is_the_token_sequence_a_rollout_of_it_makes(tmp_path):
    """SFT on a tool-use conversation (with its `tools` column) supervises exactly the tokens, and only those, that
    a rollout of the same conversation marks as the policy's."""
    from examples.calculator.make_data import demonstration
    from llmft.data.examples import row_tools, tokenize_example
    from tests.helpers.tiny import build_tokenizer

    tok = build_tokenizer(HERMES)
    conv = conversations(tmp_path, tok, name="examples.calculator.calculator:Calculator")
    demo = demonstration(48213, 90577)
    example, _ = tokenize_example(conv.chat, demo["messages"], 4096, "assistant", "row 1",
                                  row_tools(Record(demo, "row 1")))
    pieces = conv.chat.conversation(demo["messages"], "row 1", demo["tools"])
    policy = [ids for ids, answer in pieces if answer]
    [t] = conv.rollout(Scripted(conv.chat, [[policy[0]], [policy[1]]]), None, [Record({"a": 48213, "b": 90577},
                                                                                         "row 1")], _sampling())
    assert t.prompt_ids + t.ids == example.input_ids
    assert [0] * len(t.prompt_ids) + t.mask == [int(label != -100) for label in example.labels]
    assert t.messages[2]["content"] == str(48213 + 90577) and t.score == 1.0


def test_the_documented_example_environment_runs_as_written(tmp_path, monkeypatch):
    """docs/environments.md's complete example, copied from the page into my_env.py as a user would: its tool is
    offered, called, fed back, and its score (with the bonus for using the tool) is the trajectory's."""
    import re

    from tests.helpers import ROOT
    from tests.helpers.tiny import build_tokenizer

    page = (ROOT / "docs" / "environments.md").read_text()
    code = re.search(r"`my_env\.py` in the working directory:\n\n```python\n(.*?)```", page, re.S).group(1)
    (tmp_path / "my_env.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    tok = build_tokenizer(HERMES)
    conv = conversations(tmp_path, tok, name="my_env:Calculator", args={"bonus": 0.5})
    chat, end = conv.chat, tok.convert_tokens_to_ids("<|im_end|>")
    call = chat.ids('<tool_call>\n{"name": "add", "arguments": {"a": 48213, "b": 90577}}\n</tool_call>') + [end]
    final = chat.ids("138790") + [end]
    [t] = conv.rollout(Scripted(chat, [[call], [final]]), None, [Record({"a": 48213, "b": 90577}, "row 1")],
                       _sampling())
    assert t.messages[2] == {"role": "tool", "name": "add", "content": "138790"}
    assert t.rewards == [0.0, 1.5] and t.score == 1.5 and t.tool_calls == 1
