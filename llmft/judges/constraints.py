"""The demo task's judge: does an answer satisfy its prompt's verifiable constraints?

A constraint is a dict `{"type": NAME, **params}`; a prompt carries a list of them. `judge` returns a
pass/fail per constraint and a score in [0, 1] (the share passed). Specs are validated first: an unknown
constraint name or a missing / mistyped parameter is a DataError naming the row.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass

from llmft.errors import DataError


def has_word(text: str, word: str) -> bool:
    return re.search(rf"\b{re.escape(word)}\b", text, re.IGNORECASE) is not None


def count_words(text: str) -> int:
    """Whitespace-separated tokens that contain at least one letter or digit (bullet dashes do not count)."""
    return sum(1 for tok in text.split() if any(ch.isalnum() for ch in tok))


def count_sentences(text: str) -> int:
    """Runs of . ! ? followed by whitespace or the end; -1 if the text ends mid-sentence."""
    text = text.strip()
    if not text or text[-1] not in ".!?":
        return -1
    return len(re.findall(r"[.!?]+(?=\s|$)", text))


def is_json_with_key(text: str, key: str) -> bool:
    try:
        obj = json.loads(text)
    except ValueError:
        return False
    return isinstance(obj, dict) and key in obj


def is_quoted(text: str) -> bool:
    t = text.strip()
    return len(t) >= 2 and t[0] == t[-1] == '"'


# name → (parameters with their types, check)
CONSTRAINTS: dict[str, tuple[dict[str, type], Callable[[dict, str], bool]]] = {
    "lowercase": ({}, lambda c, t: t == t.lower()),
    "uppercase": ({}, lambda c, t: t == t.upper()),
    "max_words": ({"n": int}, lambda c, t: count_words(t) <= c["n"]),
    "min_words": ({"n": int}, lambda c, t: count_words(t) >= c["n"]),
    "bullets": ({"n": int}, lambda c, t: sum(line.startswith("- ") for line in t.split("\n")) == c["n"]),
    "include_keyword": ({"word": str}, lambda c, t: has_word(t, c["word"])),
    "exclude_word": ({"word": str}, lambda c, t: not has_word(t, c["word"])),
    "starts_with": ({"phrase": str}, lambda c, t: t.strip().startswith(c["phrase"])),
    "ends_with": ({"phrase": str}, lambda c, t: t.strip().endswith(c["phrase"])),
    "quoted": ({}, lambda c, t: is_quoted(t)),
    "json_key": ({"key": str}, lambda c, t: is_json_with_key(t, c["key"])),
    "no_commas": ({}, lambda c, t: "," not in t),
    "sentences": ({"n": int}, lambda c, t: count_sentences(t) == c["n"]),
}


@dataclass
class Verdict:
    passed: list[bool]

    @property
    def score(self) -> float:
        return sum(self.passed) / len(self.passed) if self.passed else 1.0

    @property
    def all_passed(self) -> bool:
        return all(self.passed)


def validate(constraints: object, where: str = "constraints") -> list[dict]:
    """Check a constraint list's shape: known names, every parameter present with the right type."""
    if not isinstance(constraints, list) or not constraints:
        raise DataError(f"{where}: constraints must be a non-empty list of {{type, ...}} objects")
    for i, c in enumerate(constraints):
        if not isinstance(c, dict) or "type" not in c:
            raise DataError(f"{where}: constraint {i} must be an object with a 'type'")
        if c["type"] not in CONSTRAINTS:
            raise DataError(f"{where}: unknown constraint '{c['type']}' (known: {', '.join(CONSTRAINTS)})")
        params, _ = CONSTRAINTS[c["type"]]
        for name, tp in params.items():
            value = c.get(name)
            if not isinstance(value, tp) or isinstance(value, bool):
                raise DataError(f"{where}: constraint '{c['type']}' needs '{name}' as {tp.__name__}, got {value!r}")
    return constraints


def check(constraints: list[dict], text: str) -> list[bool]:
    """One bool per constraint: does `text` satisfy it? (Specs must be valid: see `validate`.)"""
    return [CONSTRAINTS[c["type"]][1](c, text) for c in constraints]


def judge(constraints: list[dict], text: str, where: str = "constraints") -> Verdict:
    return Verdict(check(validate(constraints, where), text))
