"""Unpaired feedback for KTO: answers labelled desirable or undesirable, each on its own, with no partner answer.

Row formats (`data.format`, auto-detected from the first row):
    labelled  {prompt, completion, label} — TRL's unpaired preference format: `label` true for a desirable answer;
              with `data.rating_threshold`, a numeric `rating` may stand in for `label` (desirable when
              rating ≥ threshold: people's 1–5 scores used as they are)
    pairs     {prompt, chosen, rejected}: each pair gives one desirable and one undesirable answer

The prompt is a string or chat messages, the answer a string or messages ending with the assistant turn; an answer is
tokenised as the model writes it (`Chat.encode`: through the template's turn terminator), like every stage's answers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from llmft.data.chat import Chat
from llmft.data.examples import Example, collate
from llmft.data.preferences import answer_text
from llmft.data.records import Record, as_turns, detect_format, read_splits
from llmft.errors import DataError

FORMATS = {"labelled": ("prompt", "completion"), "pairs": ("chosen", "rejected")}


@dataclass
class LabelledAnswer:
    prompt_ids: list[int]
    answer_ids: list[int]  # answer tokens, the terminator included
    desirable: bool


@dataclass
class LabelledSet:
    answers: list[LabelledAnswer]
    rows: int  # rows read
    too_long: int = 0  # answers dropped because prompt + answer exceeds max_length
    identical: int = 0  # pairs dropped because chosen == rejected
    tokens: int = 0

    @property
    def desirable(self) -> int:
        return sum(a.desirable for a in self.answers)


# ---------------------------------------------------------------------------------------------- rows
def to_answers(rec: Record, fmt: str, threshold: float | None) -> list[tuple[list[dict], str, bool]]:
    """(prompt messages, answer text, desirable) of every answer a row holds: one, or two for a pair."""
    row, where = rec.row, rec.where
    for key in FORMATS[fmt]:
        if row.get(key) is None:
            raise DataError(f"{where}: missing field '{key}' (format {fmt})")
    if fmt == "pairs":
        prefix, chosen = answer_text(row["chosen"], "chosen", where)
        _, rejected = answer_text(row["rejected"], "rejected", where)
        prompt = (as_turns(row["prompt"], "prompt", "user", where) if row.get("prompt") is not None else []) + prefix
        if not prompt:
            raise DataError(f"{where}: no prompt: give a 'prompt' field or conversations in chosen/rejected")
        if chosen.strip() == rejected.strip():  # one answer both desirable and not: no signal (dropped, counted)
            return []
        return [(prompt, chosen, True), (prompt, rejected, False)]
    prefix, answer = answer_text(row["completion"], "completion", where)
    return [(as_turns(row["prompt"], "prompt", "user", where) + prefix, answer, label_of(row, where, threshold))]


def label_of(row: dict, where: str, threshold: float | None) -> bool:
    """The row's `label` (a boolean; "true"/"false" in a CSV file), or its `rating` ≥ `threshold`."""
    if "label" in row:
        label = row["label"]
        if isinstance(label, str) and label.strip().lower() in ("true", "false"):
            return label.strip().lower() == "true"
        if not isinstance(label, bool):
            raise DataError(f"{where}: 'label' must be true or false, got {str(label)[:40]}")
        return label
    if threshold is None:
        raise DataError(f"{where}: missing field 'label' (true/false); for rated rows set data.rating_threshold")
    rating = row.get("rating")
    if isinstance(rating, str):  # a CSV cell
        try:
            rating = float(rating)
        except ValueError:
            pass
    if isinstance(rating, bool) or not isinstance(rating, (int, float)) or not math.isfinite(rating):
        raise DataError(f"{where}: needs 'label' (true/false) or a numeric 'rating', got rating={str(rating)[:40]}")
    return rating >= threshold


# ------------------------------------------------------------------------------------------ tokenising
def tokenize_answers(records: list[Record], chat: Chat, fmt: str, max_length: int,
                     threshold: float | None) -> LabelledSet:
    """Read and tokenise every labelled answer; drop (and count) the ones longer than `max_length` with their
    prompt."""
    out = LabelledSet(answers=[], rows=len(records))
    for rec in records:
        answers = to_answers(rec, fmt, threshold)
        out.identical += not answers
        for prompt, answer, desirable in answers:
            prompt_ids, answer_ids = chat.encode(prompt, answer, rec.where)
            if len(prompt_ids) + len(answer_ids) > max_length:
                out.too_long += 1
                continue
            out.answers.append(LabelledAnswer(prompt_ids, answer_ids, desirable))
            out.tokens += len(prompt_ids) + len(answer_ids)
    if not out.answers:
        name = records[0].where.split(":")[0] if records else "data"
        raise DataError(f"{name}: no usable answer ({out.too_long} longer than max_length={max_length}, "
                        f"{out.identical} pairs with chosen == rejected)")
    return out


def load_labelled_sets(cfg, chat: Chat) -> tuple[LabelledSet, LabelledSet | None]:
    """Train and eval answers of a KTO config (`cfg.data`)."""
    train_rows, eval_rows = read_splits(cfg.data, cfg.seed)
    fmt = detect_format(train_rows, cfg.data.format, FORMATS)
    d = cfg.data
    return tuple(tokenize_answers(rows, chat, fmt, d.max_length, d.rating_threshold) if rows else None
                 for rows in (train_rows, eval_rows))


def describe(ls: LabelledSet, max_length: int) -> str:
    return (f"{len(ls.answers)} answers ({ls.desirable} desirable, {len(ls.answers) - ls.desirable} undesirable) "
            f"from {ls.rows} rows, {ls.tokens} tokens; dropped {ls.too_long} longer than {max_length}"
            + (f", {ls.identical} pairs with identical answers" if ls.identical else ""))


def collate_answers(answers: list[LabelledAnswer], pad_id: int) -> dict[str, torch.Tensor]:
    """input_ids/attention_mask/labels [B, T] (labels on the answer tokens only) and desirable [B]."""
    batch = collate([Example(a.prompt_ids + a.answer_ids, [-100] * len(a.prompt_ids) + a.answer_ids)
                     for a in answers], pad_id)
    return batch | {"desirable": torch.tensor([a.desirable for a in answers])}


def mismatched(answers: list[LabelledAnswer], max_length: int) -> list[LabelledAnswer]:
    """Each prompt with the answer of the nearest row before it (cyclically) that has another prompt, cut to
    `max_length`: the pairs from which KTO estimates its KL reference point, answers that are not the prompt's own
    (two answers of one pair are neighbours; a list of one prompt can only pair each row with the row before)."""
    n = len(answers)

    def other(i: int) -> LabelledAnswer:
        before = (answers[(i - k) % n] for k in range(1, n))
        return next((b for b in before if b.prompt_ids != answers[i].prompt_ids), answers[(i - 1) % n])

    return [LabelledAnswer(a.prompt_ids, b.answer_ids[:max(1, max_length - len(a.prompt_ids))], b.desirable)
            for a, b in ((a, other(i)) for i, a in enumerate(answers))]
