"""Items to annotate: a prompt and K candidate answers, read from a candidates file.

A candidates file is JSONL, one item per line:
    {"id": "...", "prompt": str | messages, "candidates": [{"text": str, "sources": [str, ...]}, ...], ...}
`id` is optional (the line number then), a candidate may be a plain string, and any other column (constraints, a
reference completion) travels along to the exported rows. `llmft annotate candidates A.jsonl B.jsonl` builds one
from `llmft generate` outputs: the same prompts in the same order, each file's `response` a candidate named by
its file, identical answers shown once (with every source that gave them).

The file's fingerprint (a hash of ids, prompts and candidate texts) is written into every annotation, so that
annotations are never read against another candidates file.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from llmft.checkpoint import atomic_write_text
from llmft.data.records import Record, as_turns, prompt_messages, read_records
from llmft.errors import DataError


@dataclass
class Candidate:
    text: str
    sources: list[str] = field(default_factory=list)  # the models / generate files that gave this answer


@dataclass
class Item:
    id: str
    prompt: str | list[dict]  # as in the data: text or chat messages
    candidates: list[Candidate]
    row: dict  # every other column of the line
    where: str

    @property
    def prompt_text(self) -> str:
        """The prompt as a person reads it: the text, or the conversation's turns one per line."""
        if isinstance(self.prompt, str):
            return self.prompt
        return "\n\n".join(f"[{m['role']}] {m['content']}" for m in self.prompt)


@dataclass
class Items:
    path: str
    items: list[Item]
    fingerprint: str

    def __len__(self) -> int:
        return len(self.items)

    def by_id(self) -> dict[str, Item]:
        return {it.id: it for it in self.items}


def read_items(path: str | Path) -> Items:
    """The items of a candidates file; a malformed line is one error naming it."""
    records = read_records(str(path))
    items = [parse_item(rec, n) for n, rec in enumerate(records, 1)]
    seen: dict[str, str] = {}
    for it in items:
        if it.id in seen:
            raise DataError(f"{it.where}: id '{it.id}' was already used at {seen[it.id]}")
        seen[it.id] = it.where
    return Items(str(path), items, fingerprint(items))


def parse_item(rec: Record, n: int) -> Item:
    row, where = dict(rec.row), rec.where
    prompt = row.pop("prompt", None)
    if prompt is None:
        raise DataError(f"{where}: an item needs a 'prompt' (text or chat messages)")
    as_turns(prompt, "prompt", "user", where)
    raw = row.pop("candidates", None)
    if not isinstance(raw, list) or len(raw) < 2:
        raise DataError(f"{where}: 'candidates' must be a list of at least 2 answers")
    candidates = [parse_candidate(c, f"{where}: candidates[{i}]") for i, c in enumerate(raw)]
    item_id = row.pop("id", None)
    item_id = str(n) if item_id is None else str(item_id)
    return Item(item_id, prompt, candidates, row, where)


def parse_candidate(value: object, where: str) -> Candidate:
    if isinstance(value, str):
        return Candidate(value)
    if not isinstance(value, dict) or not isinstance(value.get("text"), str):
        raise DataError(f"{where} must be a string or an object with a 'text' string")
    sources = value.get("sources", [])
    if not isinstance(sources, list) or not all(isinstance(s, str) for s in sources):
        raise DataError(f"{where}: 'sources' must be a list of strings")
    return Candidate(value["text"], sources)


def fingerprint(items: list[Item]) -> str:
    canon = json.dumps([[it.id, it.prompt, [c.text for c in it.candidates]] for it in items], ensure_ascii=False,
                       sort_keys=True)
    return hashlib.sha256(canon.encode("utf-8")).hexdigest()[:16]


# ---------------------------------------------------------------------------------------- from generate
def from_generations(paths: list[str], out: str | Path) -> Items:
    """A candidates file from several `llmft generate` outputs over the same prompts file (rows in the same order):
    each output's `response` a candidate, its source the file's name; identical answers merged."""
    if len(paths) < 1:
        raise DataError("name at least one `llmft generate` output")
    outputs = [read_records(p) for p in paths]
    n = len(outputs[0])
    for p, rows in zip(paths, outputs, strict=True):
        if len(rows) != n:
            raise DataError(f"{p}: {len(rows)} rows, but {paths[0]} has {n}: the outputs must answer the same "
                            f"prompts file")
    names = source_names(paths)
    lines = []
    for i in range(n):
        first = outputs[0][i]
        prompt = item_prompt(first)
        merged: dict[str, list[str]] = {}
        for name, rows in zip(names, outputs, strict=True):
            rec = rows[i]
            if item_prompt(rec) != prompt:
                raise DataError(f"{rec.where}: its prompt differs from {first.where}: the outputs must answer the "
                                f"same prompts in the same order")
            text = rec.row.get("response")
            if not isinstance(text, str):
                raise DataError(f"{rec.where}: no 'response' text: is it an `llmft generate` output?")
            merged.setdefault(text, []).append(name)
        extra = {k: v for k, v in first.row.items()
                 if k not in ("prompt", "messages", "response", "finished", "response_tokens", "id", "candidates")}
        lines.append({"id": str(first.row.get("id", i + 1)), "prompt": prompt,
                      "candidates": [{"text": t, "sources": s} for t, s in merged.items()], **extra})
    kept = [ln for ln in lines if len(ln["candidates"]) >= 2]
    if not kept:
        raise DataError("every prompt got the same answer from every output: nothing to compare")
    atomic_write_text(Path(out), "".join(json.dumps(ln, ensure_ascii=False) + "\n" for ln in kept))
    return read_items(out)


def item_prompt(rec: Record) -> str | list[dict]:
    """The prompt as `llmft generate` answered it: a `prompt` as written; `messages` without an ending assistant
    turn (an SFT eval set's reference answer: never shown beside the candidates, never an earlier turn of an
    exported row)."""
    return rec.row["prompt"] if "prompt" in rec.row else prompt_messages(rec)


def source_names(paths: list[str]) -> list[str]:
    """Each output's name: its file stem, or its path when two stems are alike."""
    stems = [Path(p).stem for p in paths]
    return stems if len(set(stems)) == len(stems) else list(paths)
