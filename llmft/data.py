"""Datasets: reading rows from files or the hub, recognising their format, and tokenising them.

Row formats (auto-detected from the first row, or named with `data.format`):
  prompt_completion  {"prompt": str | [messages], "completion": str | [messages]}
  messages           {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}
  text               {"text": str}
Every error names the file and the line (JSONL/CSV) or row (JSON/Parquet/hub) it is about.
"""

from __future__ import annotations

import bisect
import csv
import io
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from llmft.chat import Chat
from llmft.errors import DataError

EXTENSIONS = (".jsonl", ".json", ".parquet", ".csv")
FORMATS = {"prompt_completion": ("prompt", "completion"), "messages": ("messages",), "text": ("text",)}
ROLES = {"system", "user", "assistant", "tool"}


@dataclass
class Record:
    row: dict
    where: str  # "file:line" or "file row N", for error messages


# --------------------------------------------------------------------------------------------- reading
def read_records(source: str, split: str = "train") -> list[Record]:
    """All rows of a local data file, or of a hub dataset split. An empty dataset is an error."""
    path = Path(source).expanduser()
    suffix = path.suffix.lower()
    if path.is_file():
        if suffix not in EXTENSIONS:
            raise DataError(f"{source}: unsupported data file extension '{path.suffix}' "
                            f"(supported: {', '.join(EXTENSIONS)})")
        records = READERS[suffix](path)
    elif suffix in EXTENSIONS or source.startswith(("/", "./", "../", "~")) or path.exists():
        raise DataError(f"data file not found: {source}")
    else:
        records = read_hub(source, split)
    if not records:
        raise DataError(f"{source}: the dataset is empty")
    return records


def read_jsonl(path: Path) -> list[Record]:
    records = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            line = decode(raw, f"{path}:{n}")
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: invalid JSON: {e.msg} (column {e.colno})") from None
            records.append(as_record(row, f"{path}:{n}"))
    return records


def decode(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{where}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1})") from None


def read_json(path: Path) -> list[Record]:
    try:
        data = json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of row objects (or {{\"data\": [...]}})")
    return [as_record(row, f"{path} row {i}") for i, row in enumerate(data)]


def read_text(path: Path) -> str:
    """A whole file as UTF-8 text; bytes that are not name their line."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x})") from None


def read_csv(path: Path) -> list[Record]:
    reader = csv.DictReader(io.StringIO(read_text(path), newline=""))
    try:
        return [Record(dict(row), f"{path}:{reader.line_num}") for row in reader]
    except csv.Error as e:
        raise DataError(f"{path}:{reader.line_num}: malformed CSV: {e}") from None


def read_parquet(path: Path) -> list[Record]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError("reading .parquet files needs pyarrow: pip install pyarrow") from None
    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as e:  # noqa: BLE001
        raise DataError(f"{path}: cannot read Parquet file: {e}") from None
    return [as_record(row, f"{path} row {i}") for i, row in enumerate(rows)]


def read_hub(name: str, split: str) -> list[Record]:
    from llmft.sources import reachable

    try:
        import datasets
        from huggingface_hub import constants
    except ImportError:
        raise DataError(f"data source '{name}' is not a local file; hub datasets need the datasets "
                        f"package: pip install datasets") from None
    if constants.HF_HUB_OFFLINE or not reachable("huggingface.co"):
        raise DataError(f"data source '{name}' is not a local file, and the hub cannot be reached "
                        f"(offline): use a local {'/'.join(EXTENSIONS)} file")
    try:
        rows = datasets.load_dataset(name, split=split)
    except Exception as e:  # noqa: BLE001
        raise DataError(f"cannot load hub dataset '{name}' (split {split}): {e}") from None
    return [as_record(row, f"{name}[{split}] row {i}") for i, row in enumerate(rows)]


READERS = {".jsonl": read_jsonl, ".json": read_json, ".csv": read_csv, ".parquet": read_parquet}


def as_record(row: object, where: str) -> Record:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object with named fields, got {type(row).__name__}")
    check_unicode(row, where, "")
    return Record(row, where)


def check_unicode(value: object, where: str, key: str) -> None:
    """Every string of a row must be valid Unicode: JSON's \\ud800 escapes decode to lone surrogates, which no
    tokenizer can encode."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise DataError(f"{where}: field '{key or '?'}' holds invalid Unicode (a lone surrogate "
                            f"U+{ord(value[e.start]):04X} at character {e.start})") from None
    elif isinstance(value, dict):
        for k, v in value.items():
            check_unicode(v, where, f"{key}.{k}" if key else str(k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            check_unicode(v, where, f"{key}[{i}]")


def read_splits(d, seed: int) -> tuple[list[Record], list[Record]]:
    """Train and eval rows of a stage's `data` section: `d.eval` when given, else `d.eval_fraction` of train."""
    train = read_all(d.train, d.split)
    if d.eval:
        return train, read_all(d.eval, d.split)
    return split_eval(train, d.eval_fraction, seed)


def read_all(sources: str | list[str], split: str = "train") -> list[Record]:
    """The rows of one source, or of several in order (`data.train: [a.jsonl, b.jsonl]`)."""
    return [r for source in as_list(sources) for r in read_records(source, split)]


def as_list(sources: str | list[str] | None) -> list[str]:
    return [] if sources is None else [sources] if isinstance(sources, str) else list(sources)


def split_eval(records: list[Record], fraction: float, seed: int) -> tuple[list[Record], list[Record]]:
    """Hold out `fraction` of the records (at least one) for evaluation, chosen by `seed`."""
    if fraction <= 0:
        return records, []
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    k = max(1, round(len(records) * fraction))
    if k >= len(records):
        raise DataError(f"data.eval_fraction={fraction} leaves no training rows out of {len(records)}")
    held = set(order[:k])
    return [r for i, r in enumerate(records) if i not in held], [records[i] for i in sorted(held)]


# --------------------------------------------------------------------------------------------- formats
def detect_format(records: list[Record], fmt: str, formats: dict[str, tuple[str, ...]] = FORMATS) -> str:
    """`fmt`, or for 'auto' the first of `formats` (name → required fields) whose fields the first row has."""
    if fmt != "auto":
        return fmt
    first = records[0]
    for name, keys in formats.items():
        if all(k in first.row for k in keys):
            return name
    expected = " or ".join("{" + ", ".join(keys) + "}" for keys in formats.values())
    raise DataError(f"{first.where}: cannot tell the row format from its fields {sorted(first.row)}; "
                    f"expected {expected} (or set data.format)")


def to_messages(rec: Record, fmt: str) -> list[dict] | str:
    """A row as chat messages (prompt_completion, messages) or plain text (text)."""
    row, where = rec.row, rec.where
    for key in FORMATS[fmt]:
        if key not in row or row[key] is None:
            raise DataError(f"{where}: missing field '{key}' (format {fmt})")
    if fmt == "text":
        return nonempty_str(row["text"], "text", where)
    if fmt == "messages":
        return check_messages(row["messages"], "messages", where)
    return as_turns(row["prompt"], "prompt", "user", where) + as_turns(row["completion"], "completion",
                                                                   "assistant", where)


def as_turns(value: object, key: str, role: str, where: str) -> list[dict]:
    """A prompt or completion given as a string (one `role` turn) or as a list of chat messages."""
    if isinstance(value, list):
        return check_messages(value, key, where)
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{key}' must be a string or a list of messages, "
                        f"got {type(value).__name__}")
    return [{"role": role, "content": nonempty_str(value, key, where)}]


def nonempty_str(value: object, key: str, where: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{key}' must be a string, got {type(value).__name__}")
    if not value.strip():
        raise DataError(f"{where}: field '{key}' is empty")
    return value


def check_messages(value: object, key: str, where: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: field '{key}' must be a non-empty list of {{role, content}} messages")
    for i, m in enumerate(value):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError(f"{where}: {key}[{i}] must be an object with 'role' and 'content'")
        if m["role"] not in ROLES:
            raise DataError(f"{where}: {key}[{i}] has unknown role {m['role']!r} (expected one of "
                            f"{', '.join(sorted(ROLES))})")
        if not isinstance(m["content"], str):
            raise DataError(f"{where}: {key}[{i}].content must be a string")
    return value


# ------------------------------------------------------------------------------------------ tokenising
@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # -100 where no loss is taken


@dataclass
class TokenizedSet:
    examples: list[Example]
    blocks: list[list[int]] | None = None  # data.packing: blocks — the examples of each packed block (`pack_blocks`)
    rows: int = 0
    truncated: int = 0
    dropped: int = 0  # rows left with no supervised token after truncation
    tokens: int = field(default=0)
    supervised: int = field(default=0)


def tokenize_example(chat: Chat, messages: list[dict] | str, max_length: int, loss_on: str,
                     where: str) -> tuple[Example, bool]:
    """Token ids and labels of one example; returns (example, was_truncated).

    A conversation is its context pieces and its answers (`Chat.conversation`): each assistant turn is labelled
    from its content through the template's turn terminator (EOS without a template), the ending generation stops
    at; EOS is never masked, even when pad == eos. Plain text gets the tokenizer's BOS handling and EOS, all labelled.
    """
    if isinstance(messages, str):
        ids = chat.tokenizer(messages)["input_ids"]
        eos = chat.tokenizer.eos_token_id
        pieces = [(ids + ([eos] if eos is not None and ids[-1:] != [eos] else []), True)]
    else:
        pieces = chat.conversation(messages, where)
    ids, labels = [], []
    for piece, answer in pieces:
        ids += piece
        labels += piece if answer or loss_on == "all" else [-100] * len(piece)
    truncated = len(ids) > max_length
    return Example(ids[:max_length], labels[:max_length]), truncated


def tokenize_records(records: list[Record], chat: Chat, fmt: str, max_length: int, loss_on: str) -> TokenizedSet:
    out = TokenizedSet(examples=[], rows=len(records))
    for rec in records:
        ex, truncated = tokenize_example(chat, to_messages(rec, fmt), max_length, loss_on, rec.where)
        out.truncated += truncated
        n_sup = sum(1 for t in ex.labels[1:] if t != -100)
        if n_sup == 0:
            out.dropped += 1
            continue
        out.examples.append(ex)
        out.tokens += len(ex.input_ids)
        out.supervised += n_sup
    if not out.examples:
        raise DataError(f"{records[0].where.split(':')[0]}: no row has a token to train on after "
                        f"truncation to max_length={max_length}")
    return out


def collate(examples: list[Example], pad_id: int, side: str = "right") -> dict[str, torch.Tensor]:
    """Pad to the longest example; padding gets attention 0 and label -100 (never masked by token id)."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        cols = slice(0, n) if side == "right" else slice(width - n, width)
        ids[i, cols] = torch.tensor(e.input_ids)
        mask[i, cols] = 1
        labels[i, cols] = torch.tensor(e.labels)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def pack_blocks(lengths: list[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing: the indices of rows of `lengths` tokens grouped into blocks of at most `capacity` tokens.
    Longest rows first, each into the block it fills most (the one with the least room that still fits it), else a
    new block; blocks in the order they were opened, their rows in the order they were placed."""
    blocks: list[list[int]] = []
    room: list[tuple[int, int]] = []  # (tokens left, block), sorted
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        at = bisect.bisect_left(room, (lengths[i], -1))
        if at == len(room):
            blocks.append([i])
            left, block = capacity - lengths[i], len(blocks) - 1
        else:
            (left, block) = room.pop(at)
            blocks[block].append(i)
            left -= lengths[i]
        bisect.insort(room, (left, block))
    return blocks


def collate_blocks(blocks: list[list[Example]], pad_id: int) -> dict[str, torch.Tensor]:
    """One row per block: its examples one after another, positions restarting at each, right-padded to the longest
    block (the padding counts from 0 again: a sequence of its own). No token's label is predicted from another
    example (each example's first label is -100), so the supervised log-probs are the unpacked rows'. `position_ids`
    is how the model keeps attention within each example (transformers' packed-sequence mask)."""
    rows = [Example([t for e in b for t in e.input_ids], [t for e in b for t in [-100, *e.labels[1:]]])
            for b in blocks]
    batch = collate(rows, pad_id)
    positions = torch.zeros_like(batch["input_ids"])
    for r, b in enumerate(blocks):
        pieces = [len(e.input_ids) for e in b] + [batch["input_ids"].shape[1] - len(rows[r].input_ids)]
        positions[r] = torch.cat([torch.arange(n) for n in pieces])
    return batch | {"position_ids": positions}
