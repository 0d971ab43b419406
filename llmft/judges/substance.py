"""The substance judge: a minimum of content, the check a format-only judge lacks (an empty answer meets "all caps",
"Thanks for asking." meets "end with 'Thanks for asking.'"; docs/results.md).

    substance(answer) = min(1, words(answer) / MIN_WORDS)

Combined with the constraint judge by their minimum (reward.combine: min), an answer scores only as well as its
weaker side: meeting the format with nothing said pays nothing. Every held-out reference answer of the demo but the
shortest has 10 words or more.
"""

from __future__ import annotations

import re

MIN_WORDS = 10


def words(text: str) -> list[str]:
    return re.findall(r"[^\W_]+(?:['’][^\W_]+)?", text.lower())  # don't, don’t: one word


def substance(answer: str) -> float:
    return min(1.0, len(words(answer)) / MIN_WORDS)


def critique(answer: str) -> str:
    n = len(words(answer))
    return "" if n >= MIN_WORDS else f"the reply says {n} word{'s' * (n != 1)}; an answer needs at least {MIN_WORDS}"
