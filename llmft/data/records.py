"""Reading data files into rows: JSONL, JSON, CSV, Parquet or a hub dataset, each row a `Record` that knows its
file and line; the row formats (prompt/completion, messages, text) and their checks; train/eval splits."""

from __future__ import annotations

import csv
import io
import json
import random
import socket
from dataclasses import dataclass
from pathlib import Path

from llmft.errors import DataError

EXTENSIONS = (".jsonl", ".json", ".parquet", ".csv")


FORMATS = {"prompt_completion": ("prompt", "completion"), "messages": ("messages",), "text": ("text",)}


ROLES = {"system", "user", "assistant", "tool"}


@dataclass
class Record:
    row: dict
    where: str  # "file:line" or "file row N", for error messages


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


def prompt_messages(rec: Record) -> list[dict]:
    """A prompt row: {prompt: str | [messages]} or {messages: [...]} (a trailing assistant turn is dropped)."""
    row, where = rec.row, rec.where
    if "prompt" in row:
        value = row["prompt"]
    elif "messages" in row:
        value = row["messages"]
        if isinstance(value, list) and value and isinstance(value[-1], dict) and value[-1].get("role") == "assistant":
            value = value[:-1]
    else:
        raise DataError(f"{where}: a prompt row needs a 'prompt' (or 'messages') field; it has {sorted(row)}")
    if isinstance(value, str) and value.strip():
        return [{"role": "user", "content": value}]
    if isinstance(value, list) and value and all(isinstance(m, dict) and "role" in m for m in value):
        return value
    raise DataError(f"{where}: the prompt must be a non-empty string or a list of chat messages")


def shown_prompt(rec: Record) -> str:
    """The prompt's last turn, for a person reading samples; a row without a prompt (an environment's: its reset
    builds one) as the row itself."""
    if "prompt" in rec.row or "messages" in rec.row:
        return prompt_messages(rec)[-1]["content"]
    return json.dumps(rec.row, ensure_ascii=False)


def reachable(host: str, port: int = 443, timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False
