"""Reading, format detection, label masking and collation, checked by hand on a ChatML tokenizer."""

from __future__ import annotations

import json

import pytest

from llmft.data.chat import TEXT_SEPARATOR, Chat
from llmft.data.examples import Example, collate, tokenize_example, tokenize_records
from llmft.data.records import Record, detect_format, read_records, split_eval, to_messages
from llmft.errors import DataError
from tests.helpers.tiny import build_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def chat(tok):
    return Chat(tok)


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_prompt_masked_and_eos_kept_when_pad_is_eos(tok, chat):
    assert tok.pad_token_id == tok.eos_token_id
    msgs = to_messages(Record({"prompt": "hello world", "completion": "the sea"}, "x"), "prompt_completion")
    ex, truncated = tokenize_example(chat, msgs, 128, "completion", "x")
    prompt = ids(tok, "<|im_start|>user\nhello world<|im_end|>\n<|im_start|>assistant\n")
    answer = ids(tok, "the sea<|im_end|>")  # through the turn's terminator, where generation stops
    assert ex.input_ids == prompt + answer and not truncated
    assert ex.labels == [-100] * len(prompt) + answer
    assert tok.eos_token_id in [t for t in ex.labels if t != -100]  # EOS trained although pad == eos
    batch = collate([ex, Example([5, 6], [-100, 6])], tok.pad_token_id)
    assert batch["labels"][1].tolist()[2:] == [-100] * (len(ex.input_ids) - 2)  # padding is masked ...
    assert batch["labels"][0].tolist() == ex.labels  # ... but the real EOS is not


def test_loss_on_all_labels_every_token(chat):
    msgs = to_messages(Record({"prompt": "hello", "completion": "sea"}, "x"), "prompt_completion")
    ex, _ = tokenize_example(chat, msgs, 128, "all", "x")
    assert ex.labels == ex.input_ids


def test_multi_turn_trains_every_assistant_turn_only(tok, chat):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"},
            {"role": "assistant", "content": "sea"}, {"role": "user", "content": "again"},
            {"role": "assistant", "content": "blue"}]
    ex, _ = tokenize_example(chat, msgs, 256, "completion", "x")
    supervised = tok.decode([t for t in ex.labels if t != -100])
    assert supervised == "sea<|im_end|>blue<|im_end|>"
    assert tok.decode(ex.input_ids) == tok.apply_chat_template(msgs, tokenize=False).removesuffix("\n")


def test_text_and_templateless_rows_get_eos(tok, chat):
    ex, _ = tokenize_example(chat, "hello world", 64, "completion", "x")
    assert ex.input_ids[-1] == tok.eos_token_id and ex.labels == ex.input_ids
    plain = Chat(build_tokenizer(chat_template=None))
    msgs = to_messages(Record({"prompt": "hello", "completion": "sea"}, "x"), "prompt_completion")
    ex, _ = tokenize_example(plain, msgs, 64, "completion", "x")
    n_prompt = len(plain.tokenizer("hello" + TEXT_SEPARATOR)["input_ids"])  # prompt, then the separator: not glued
    assert plain.tokenizer.decode(ex.input_ids) == "hello\n\nsea<|im_end|>"
    assert ex.labels[:n_prompt] == [-100] * n_prompt
    assert ex.labels[n_prompt:] == ids(plain.tokenizer, "sea") + [plain.tokenizer.eos_token_id]


def test_truncation_is_counted_and_empty_rows_dropped(chat):
    recs = [Record({"prompt": "hi", "completion": "the sea is deep and wide " * 20}, "a:1"),
            Record({"prompt": "hello world " * 30, "completion": "sea"}, "a:2"),
            Record({"prompt": "hi", "completion": "sea"}, "a:3")]
    out = tokenize_records(recs, chat, "prompt_completion", 32, "completion")
    assert (out.rows, out.truncated, out.dropped, len(out.examples)) == (3, 2, 1, 2)
    assert all(len(e.input_ids) <= 32 for e in out.examples)


@pytest.mark.parametrize("row, fmt, expected", [
    ({"prompt": "a"}, "prompt_completion", "missing field 'completion'"),
    ({"prompt": "a", "completion": ""}, "prompt_completion", "field 'completion' is empty"),
    ({"prompt": 3, "completion": "b"}, "prompt_completion", "field 'prompt' must be a string"),
    ({"messages": []}, "messages", "non-empty list"),
    ({"messages": [{"role": "bot", "content": "x"}]}, "messages", "unknown role 'bot'"),
    ({"messages": [{"role": "user"}]}, "messages", "must be an object with 'role' and 'content'"),
    ({"text": None}, "text", "missing field 'text'"),
])
def test_malformed_rows_name_the_row(row, fmt, expected):
    with pytest.raises(DataError, match=expected) as e:
        to_messages(Record(row, "f.jsonl:7"), fmt)
    assert str(e.value).startswith("f.jsonl:7: ")


def test_format_detection():
    rec = lambda row: [Record(row, "f:1")]  # noqa: E731
    assert detect_format(rec({"prompt": "a", "completion": "b", "extra": 1}), "auto") == "prompt_completion"
    assert detect_format(rec({"messages": []}), "auto") == "messages"
    assert detect_format(rec({"text": "x"}), "auto") == "text"
    with pytest.raises(DataError, match="cannot tell the row format"):
        detect_format(rec({"question": "a"}), "auto")


def test_readers_and_file_errors(tmp_path):
    rows = [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    (tmp_path / "d.json").write_text(json.dumps(rows))
    (tmp_path / "d.csv").write_text("prompt,completion\na,b\nc,d\n")
    for ext in ("jsonl", "json", "csv"):
        got = read_records(str(tmp_path / f"d.{ext}"))
        assert [r.row for r in got] == rows
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    assert [r.row for r in read_records(str(tmp_path / "d.parquet"))] == rows

    (tmp_path / "bad.jsonl").write_text('{"prompt": "a"}\n{"prompt": \n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: invalid JSON"):
        read_records(str(tmp_path / "bad.jsonl"))
    (tmp_path / "list.jsonl").write_text('["a"]\n')
    with pytest.raises(DataError, match=r"list.jsonl:1: expected an object"):
        read_records(str(tmp_path / "list.jsonl"))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="the dataset is empty"):
        read_records(str(tmp_path / "empty.jsonl"))
    (tmp_path / "d.txt").write_text("hello")
    with pytest.raises(DataError, match=r"unsupported data file extension '.txt'"):
        read_records(str(tmp_path / "d.txt"))
    with pytest.raises(DataError, match="data file not found"):
        read_records(str(tmp_path / "missing.jsonl"))


def test_hub_dataset_while_offline_is_a_clear_error(monkeypatch):
    pytest.importorskip("datasets")
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match="hub cannot be reached"):
        read_records("some-org/some-dataset")


def test_eval_split_is_deterministic():
    recs = [Record({"text": str(i)}, f"f:{i}") for i in range(20)]
    a, b = split_eval(recs, 0.25, seed=1), split_eval(recs, 0.25, seed=1)
    assert [r.where for r in a[1]] == [r.where for r in b[1]] and len(a[1]) == 5 and len(a[0]) == 15


def test_left_padding_collate():
    b = collate([Example([1, 2, 3], [-100, 2, 3]), Example([4], [4])], pad_id=0, side="left")
    assert b["input_ids"].tolist() == [[1, 2, 3], [0, 0, 4]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
