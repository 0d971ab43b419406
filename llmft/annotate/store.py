"""The annotations file: every judgement a person makes, one JSON line, appended the moment it is made.

    {"schema": 1, "candidates": FINGERPRINT, "item": ID, "annotator": NAME, "time": ISO-8601 UTC,
     "action": ACTION, "shown": [candidate indices in the order the page showed them], ...its fields}

    rate     candidate, rating (1-5)          rank   order: every candidate, best first
    pick     best, worst (or null)            edit   candidate, text (the person's version of that answer)
    tie      all answers equally good         skip   no judgement
    compare  winner: candidate or null (tie), blind side-by-side of two answers
    critique candidate (or null: the item as a whole), text: what is wrong, in words ("" takes it back)
    done     the person moved on: the item is finished

A line is written, flushed and fsync'ed before the page hears it was saved, so a closed tab, a crash or a restart
loses nothing; reopening continues at the first item the person has not finished. A later judgement of the same
kind (the same candidate for rate, edit and critique) replaces an earlier one: people change their minds. The same
line twice (same annotator, item, judgement and time) is a duplicate: an error naming both lines. A last line cut
short by a crash was never confirmed to the page and is dropped.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from llmft.annotate.items import Item, Items
from llmft.errors import DataError

SCHEMA = 1
ACTIONS = ("rate", "rank", "pick", "edit", "critique", "tie", "skip", "compare", "done")
FINISHING = ("done", "tie", "skip", "compare")  # after one of these, the item is finished for that person
MAX_CRITIQUE = 4000  # characters
STAMPS = ("schema", "candidates", "item", "annotator", "time", "action", "shown")


@dataclass
class Judgement:
    line: dict  # the whole line as written
    where: str  # file:line

    @property
    def item(self) -> str:
        return self.line["item"]

    @property
    def annotator(self) -> str:
        return self.line["annotator"]

    @property
    def action(self) -> str:
        return self.line["action"]

    def key(self) -> tuple:
        """What a later judgement replaces: same person, item, kind, and candidate where there is one."""
        return self.annotator, self.item, self.action, self.line.get("candidate")


def shown_order(annotator: str, item: Item) -> list[int]:
    """The order a person sees an item's candidates in: shuffled, the same on every visit (seeded by both)."""
    order = list(range(len(item.candidates)))
    seed = int.from_bytes(hashlib.sha256(f"{annotator}\0{item.id}".encode()).digest()[:8], "big")
    random.Random(seed).shuffle(order)
    return order


FIELDS = {"rate": ("candidate", "rating"), "rank": ("order",), "pick": ("best", "worst"),
          "edit": ("candidate", "text"), "critique": ("candidate", "text"), "compare": ("winner",), "tie": (),
          "skip": (), "done": ()}


def is_index(v: object, k: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < k


def is_order(v: object, k: int) -> bool:
    """Every candidate index once."""
    return isinstance(v, list) and all(is_index(x, k) for x in v) and sorted(v) == list(range(k))


def check_fields(line: dict, item: Item, where: str) -> None:
    """A judgement's own fields, against its item (candidate indices, a 1-5 rating, a full ranking ...), and the
    order it was shown in."""
    action, k = line.get("action"), len(item.candidates)

    def candidate(name: str, optional: bool = False) -> None:
        v = line.get(name)
        if not (v is None and optional) and not is_index(v, k):
            raise DataError(f"{where}: '{name}' must be a candidate index 0..{k - 1}, got {v!r}")

    if action not in ACTIONS:
        raise DataError(f"{where}: unknown action {action!r} (one of {', '.join(ACTIONS)})")
    if not is_order(line.get("shown"), k):
        raise DataError(f"{where}: 'shown' must list each of the {k} candidates once, in the order shown")
    if action in ("rate", "edit"):
        candidate("candidate")
    rating = line.get("rating")
    if action == "rate" and (not isinstance(rating, int) or isinstance(rating, bool) or not 1 <= rating <= 5):
        raise DataError(f"{where}: 'rating' must be a whole number 1-5, got {rating!r}")
    if action == "rank" and not is_order(line.get("order"), k):
        raise DataError(f"{where}: 'order' must list each of the {k} candidates once, best first")
    if action == "pick":
        candidate("best")
        candidate("worst", optional=True)
        if line["best"] == line.get("worst"):
            raise DataError(f"{where}: the best and the worst answer must differ")
    if action == "edit":
        text = line.get("text")
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{where}: an edit needs the edited 'text'")
        if text.strip() == item.candidates[line["candidate"]].text.strip():
            raise DataError(f"{where}: the edit leaves the answer as it was")
    if action == "critique":
        candidate("candidate", optional=True)
        if not isinstance(line.get("text"), str):
            raise DataError(f"{where}: a critique needs its 'text' (empty to take it back)")
        if len(line["text"]) > MAX_CRITIQUE:
            raise DataError(f"{where}: a critique of {len(line['text'])} characters (at most {MAX_CRITIQUE})")
    if action == "compare":
        if k != 2:
            raise DataError(f"{where}: a blind comparison needs items of exactly 2 candidates, item has {k}")
        candidate("winner", optional=True)


class Store:
    """The annotations file of one candidates file: read and checked at start, appended to while people work."""

    def __init__(self, path: str | Path, items: Items, writable: bool = False):
        """`writable`: this process appends (the server, an import): it holds the file's lock while it lives, and
        repairs what a crash left (a torn last line dropped, a missing final newline added). Readers (export,
        report) change nothing and skip a torn last line, which may be a judgement being written right now."""
        self.path, self.items, self.by_id = Path(path), items, items.by_id()
        self.judgements: list[Judgement] = []
        self.lines = 0  # lines in the file: the next judgement's line is lines + 1
        self.lock = threading.Lock()
        self.writable, self.handle = writable, None
        if writable:
            self.take_lock()
        if self.path.exists():
            self.load()

    # ------------------------------------------------------------------------------------------- reading
    def load(self) -> None:
        raw = self.path.read_bytes()
        lines = raw.split(b"\n")
        torn = bool(lines[-1].strip()) and not is_json(lines[-1])  # cut short by a crash: never confirmed
        kept = raw[:len(raw) - len(lines[-1])] if torn else raw
        seen: dict[tuple, str] = {}
        for n, data in enumerate(lines[:-1] if torn else lines, 1):
            if not data.strip():
                continue
            j = self.parse(data, f"{self.path}:{n}")
            stamp = (*j.key(), j.line["time"], json.dumps(j.line, sort_keys=True))
            if stamp in seen:
                raise DataError(f"{j.where}: duplicate judgement (the same as {seen[stamp]})")
            seen[stamp] = j.where
            self.judgements.append(j)
        self.lines = kept.count(b"\n")
        if self.writable and (torn or (kept and not kept.endswith(b"\n"))):
            with open(self.path, "r+b") as f:
                f.truncate(len(kept))
                f.seek(0, os.SEEK_END)
                if kept and not kept.endswith(b"\n"):  # a last line whole but for its newline
                    f.write(b"\n")
                    self.lines += 1
                os.fsync(f.fileno())

    def close(self) -> None:
        """Let another writer have the file."""
        if self.handle is not None:
            self.handle.close()
            self.handle = None

    def take_lock(self) -> None:
        """One writer per annotations file: a second server on it is refused, not interleaved."""
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.handle = open(self.path.with_name(self.path.name + ".lock"), "w")
        try:
            fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise DataError(f"{self.path} is being written by another `llmft annotate` process") from None

    def parse(self, data: bytes, where: str) -> Judgement:
        try:
            line = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DataError(f"{where}: not a JSON line ({e})") from None
        if not isinstance(line, dict) or any(k not in line for k in STAMPS):
            raise DataError(f"{where}: an annotation needs {', '.join(STAMPS)}")
        if line["schema"] != SCHEMA:
            raise DataError(f"{where}: annotation schema {line['schema']!r}; this llmft reads schema {SCHEMA}")
        if line["candidates"] != self.items.fingerprint:
            raise DataError(f"{where}: made on another candidates file (fingerprint {line['candidates']}, "
                            f"{self.items.path} has {self.items.fingerprint})")
        line["item"] = str(line["item"])
        item = self.by_id.get(line["item"])
        if item is None:
            raise DataError(f"{where}: item '{line['item']}' is not in {self.items.path}")
        check_fields(line, item, where)
        return Judgement(line, where)

    # ------------------------------------------------------------------------------------------- writing
    def append(self, annotator: str, item_id: str, action: str, fields: dict, shown: list[int] | None = None,
               time: str | None = None) -> Judgement:
        """Check, write, flush and fsync one judgement; only then is it in memory (and the page told). `shown` and
        `time` default to the page's order for this person and now (an import gives the tool's own)."""
        item = self.by_id.get(item_id)
        if item is None:
            raise DataError(f"item '{item_id}' is not in {self.items.path}")
        if not self.writable:
            raise DataError(f"{self.path} was opened for reading")
        if not annotator.strip():
            raise DataError("an annotator name is needed")
        line = {"schema": SCHEMA, "candidates": self.items.fingerprint, "item": item_id, "annotator": annotator,
                "time": time or datetime.now(timezone.utc).isoformat(timespec="microseconds"), "action": action,
                "shown": shown if shown is not None else shown_order(annotator, item),
                **{k: fields[k] for k in FIELDS.get(action, ()) if k in fields}}  # what the action uses, no more
        with self.lock:
            check_fields(line, item, f"{action} of item '{item_id}'")
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(line, ensure_ascii=False) + "\n")
                f.flush()
                os.fsync(f.fileno())
            self.lines += 1
            judgement = Judgement(line, f"{self.path}:{self.lines}")
            self.judgements.append(judgement)
        return judgement

    # ------------------------------------------------------------------------------------------- state
    def current(self, annotator: str | None = None) -> list[Judgement]:
        """The judgements in force (the latest of each key), in file order; one person's when named."""
        latest: dict[tuple, Judgement] = {}
        for j in self.judgements:
            if annotator is None or j.annotator == annotator:
                latest.pop(j.key(), None)  # re-inserted: the dict keeps the order of the latest
                latest[j.key()] = j
        return list(latest.values())

    def finished(self, annotator: str) -> set[str]:
        return {j.item for j in self.judgements if j.annotator == annotator and j.action in FINISHING}

    def annotators(self) -> list[str]:
        return list(dict.fromkeys(j.annotator for j in self.judgements))


def is_json(data: bytes) -> bool:
    try:
        json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return False
    return True
