"""The demo task's judge: does an answer satisfy its prompt's verifiable constraints?

A constraint is a dict `{"type": NAME, **params}`; a prompt carries a list of them. `judge` returns a
pass/fail per constraint and a score in [0, 1] (the share passed). Specs are validated first: an unknown
constraint name or a missing / mistyped parameter is a DataError naming the row. `critique` says in words what
an answer got wrong, one clause per unmet constraint ("the reply uses commas; the request said no commas").
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


def bullet_count(text: str) -> int:
    return sum(line.startswith("- ") for line in text.split("\n"))


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
    "bullets": ({"n": int}, lambda c, t: bullet_count(t) == c["n"]),
    "include_keyword": ({"word": str}, lambda c, t: has_word(t, c["word"])),
    "exclude_word": ({"word": str}, lambda c, t: not has_word(t, c["word"])),
    "starts_with": ({"phrase": str}, lambda c, t: t.strip().startswith(c["phrase"])),
    "ends_with": ({"phrase": str}, lambda c, t: t.strip().endswith(c["phrase"])),
    "quoted": ({}, lambda c, t: is_quoted(t)),
    "json_key": ({"key": str}, lambda c, t: is_json_with_key(t, c["key"])),
    "no_commas": ({}, lambda c, t: "," not in t),
    "sentences": ({"n": int}, lambda c, t: count_sentences(t) == c["n"]),
}


def json_fault(text: str, key: str) -> str:
    try:
        obj = json.loads(text)
    except ValueError:
        return "is not valid JSON"
    return "has no key " + repr(key) if isinstance(obj, dict) else "is JSON but not an object"


def sentences_said(text: str) -> str:
    n = count_sentences(text)
    return "ends mid-sentence" if n < 0 else f"has {n} sentence{'s' * (n != 1)}"


# name → what an answer that fails it did, and what the request asked
CRITIQUES: dict[str, Callable[[dict, str], str]] = {
    "lowercase": lambda c, t: "the reply has capital letters; the request said all lowercase",
    "uppercase": lambda c, t: "the reply has lowercase letters; the request said all capitals",
    "max_words": lambda c, t: f"the reply has {count_words(t)} words; the request said at most {c['n']}",
    "min_words": lambda c, t: f"the reply has {count_words(t)} words; the request said at least {c['n']}",
    "bullets": lambda c, t: f"the reply has {bullet_count(t)} bullet points ('- ' lines); the request said "
                            f"exactly {c['n']}",
    "include_keyword": lambda c, t: f"the reply never says '{c['word']}'; the request said to include it",
    "exclude_word": lambda c, t: f"the reply says '{c['word']}'; the request said not to",
    "starts_with": lambda c, t: f"the reply does not start with '{c['phrase']}'; the request said to",
    "ends_with": lambda c, t: f"the reply does not end with '{c['phrase']}'; the request said to",
    "quoted": lambda c, t: "the reply is not wrapped in double quotes; the request said to wrap it in them",
    "json_key": lambda c, t: f"the reply {json_fault(t, c['key'])}; the request said a JSON object with key "
                             f"'{c['key']}'",
    "no_commas": lambda c, t: "the reply uses commas; the request said no commas",
    "sentences": lambda c, t: f"the reply {sentences_said(t)}; the request said exactly {c['n']} "
                              f"sentence{'s' * (c['n'] != 1)}",
}


def critique(constraints: list[dict], text: str) -> str:
    """What `text` got wrong, one clause per unmet constraint joined by "; " ("" when it meets them all)."""
    return "; ".join(CRITIQUES[c["type"]](c, text) for c, ok in zip(constraints, check(constraints, text),
                                                                     strict=True) if not ok)


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
