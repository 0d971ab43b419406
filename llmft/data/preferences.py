"""Preference data: rows → (prompt, chosen, rejected[, margin]) pairs → token ids for pairwise stages.

Row formats (`data.format`, auto-detected from the first row):
    pairs    {prompt, chosen, rejected[, margin]}; prompt a string or chat messages; chosen/rejected a
             string, or messages ending with the assistant turn. Without `prompt`, chosen and rejected are
             whole conversations that share everything but their last (assistant) turn.
    ranked   {prompt, responses: [best, ..., worst]}: listwise data, expanded into every ordered pair.

A pair is tokenised as the model sees it when it answers (`Chat.encode`): `prompt_ids` is the prompt through the
chat template's generation prompt, an answer as the template writes it, ending with the turn's
terminator. That is where `generation.generate` stops, so a reward model scores PPO rollouts the way it was
trained, reading its score on the terminator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from llmft.data.chat import Chat
from llmft.data.examples import Example, collate
from llmft.data.records import Record, as_turns, check_messages, nonempty_str, read_splits
from llmft.data.records import detect_format as detect_row_format
from llmft.errors import DataError

FORMATS = {"pairs": ("chosen", "rejected"), "ranked": ("prompt", "responses")}


def detect_format(records: list[Record], fmt: str) -> str:
    return detect_row_format(records, fmt, FORMATS)


@dataclass
class Pair:
    prompt: list[dict]  # chat messages
    chosen: str
    rejected: str
    margin: float | None
    where: str


@dataclass
class TokenizedPair:
    prompt_ids: list[int]
    chosen_ids: list[int]  # answer tokens, the terminator included
    rejected_ids: list[int]
    margin: float | None

    @property
    def tokens(self) -> int:
        return 2 * len(self.prompt_ids) + len(self.chosen_ids) + len(self.rejected_ids)


@dataclass
class PairSet:
    pairs: list[TokenizedPair]
    rows: int  # rows read
    identical: int = 0  # pairs dropped because chosen == rejected
    too_long: int = 0  # pairs dropped because prompt + answer exceeds max_length
    tokens: int = 0

    @property
    def has_margin(self) -> bool:
        return any(p.margin is not None for p in self.pairs)


# ---------------------------------------------------------------------------------------------- rows
def to_pairs(rec: Record, fmt: str) -> list[Pair]:
    """Every preference pair one row holds (one for `pairs`, K·(K−1)/2 for `ranked`)."""
    row, where = rec.row, rec.where
    for key in FORMATS[fmt]:
        if row.get(key) is None:
            raise DataError(f"{where}: missing field '{key}' (format {fmt})")
    if fmt == "ranked":
        prompt = as_turns(row["prompt"], "prompt", "user", where)
        responses = row["responses"]
        if not isinstance(responses, list) or len(responses) < 2:
            raise DataError(f"{where}: 'responses' must be a list of at least 2 answers, best first")
        texts = [answer_text(r, f"responses[{i}]", where)[1] for i, r in enumerate(responses)]
        return [Pair(prompt, texts[i], texts[j], None, where)
                for i in range(len(texts)) for j in range(i + 1, len(texts))]
    prefix_c, chosen = answer_text(row["chosen"], "chosen", where)
    prefix_r, rejected = answer_text(row["rejected"], "rejected", where)
    if prefix_c != prefix_r:
        raise DataError(f"{where}: 'chosen' and 'rejected' must share every turn before the answer")
    prompt = (as_turns(row["prompt"], "prompt", "user", where) if row.get("prompt") is not None else []) + prefix_c
    if not prompt:
        raise DataError(f"{where}: no prompt: give a 'prompt' field or conversations in chosen/rejected")
    return [Pair(prompt, chosen, rejected, margin_of(row, where), where)]


def answer_text(value: object, key: str, where: str) -> tuple[list[dict], str]:
    """(turns before the answer, answer text) of an answer given as a string or as chat messages."""
    if isinstance(value, str):
        return [], nonempty_str(value, key, where)
    messages = check_messages(value, key, where)
    if messages[-1]["role"] != "assistant":
        raise DataError(f"{where}: '{key}' must end with an assistant turn")
    return messages[:-1], nonempty_str(messages[-1]["content"], f"{key}[-1].content", where)


def margin_of(row: dict, where: str) -> float | None:
    value = row.get("margin")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise DataError(f"{where}: 'margin' must be a finite number, got {str(value)[:40]}")
    return float(value)


# ------------------------------------------------------------------------------------------ tokenising
def tokenize_pairs(records: list[Record], chat: Chat, fmt: str, max_length: int) -> PairSet:
    """Read, expand and tokenise every pair; drop (and count) identical and over-long pairs."""
    out = PairSet(pairs=[], rows=len(records))
    for rec in records:
        pairs = to_pairs(rec, fmt)
        prompt_text = chat.prompt_text(pairs[0].prompt, rec.where)
        prompt_ids = chat.prompt_ids(pairs[0].prompt, rec.where)
        for p in pairs:
            if p.chosen.strip() == p.rejected.strip():
                out.identical += 1
                continue
            chosen, rejected = (chat.answer_ids(prompt_text, prompt_ids, a) for a in (p.chosen, p.rejected))
            tp = TokenizedPair(prompt_ids, chosen, rejected, p.margin)
            if len(prompt_ids) + max(len(tp.chosen_ids), len(tp.rejected_ids)) > max_length:
                out.too_long += 1
                continue
            out.pairs.append(tp)
            out.tokens += tp.tokens
    if not out.pairs:
        name = records[0].where.split(":")[0] if records else "data"
        raise DataError(f"{name}: no usable preference pair ({out.identical} with chosen == rejected, "
                        f"{out.too_long} longer than max_length={max_length})")
    return out


def load_pair_sets(cfg, chat: Chat) -> tuple[PairSet, PairSet | None]:
    """Train and eval pairs of a reward or DPO config (`cfg.data`), identical pairs dropped with a warning."""
    from llmft.console import console

    train_rows, eval_rows = read_splits(cfg.data, cfg.seed)
    fmt = detect_format(train_rows, cfg.data.format)
    sets = [tokenize_pairs(rows, chat, fmt, cfg.data.max_length) if rows else None for rows in (train_rows, eval_rows)]
    for name, ps in zip(("train", "eval"), sets, strict=True):
        if ps and ps.identical:
            console.print(f"[yellow]warning: dropped {ps.identical} {name} pairs whose chosen and rejected "
                          f"answers are identical")
    return sets[0], sets[1]


def describe(ps: PairSet, max_length: int) -> str:
    return (f"{len(ps.pairs)} pairs from {ps.rows} rows, {ps.tokens} tokens; dropped {ps.identical} identical, "
            f"{ps.too_long} longer than {max_length}")


def collate_pairs(pairs: list[TokenizedPair], pad_id: int, side: str = "right",
                  default_margin: float = 0.0, packed: bool = False) -> dict[str, torch.Tensor]:
    """One batch of 2B sequences, chosen rows first: input_ids/attention_mask/labels [2B, T] (labels are the
    answer tokens, -100 on the prompt and padding) and margin [B] (`default_margin` where a pair has none); with
    `packed`, also the pairs packed with each prompt once (`preferences.pack_pairs`)."""
    def example(p: TokenizedPair, answer: list[int]) -> Example:
        return Example(p.prompt_ids + answer, [-100] * len(p.prompt_ids) + answer)

    examples = [example(p, p.chosen_ids) for p in pairs] + [example(p, p.rejected_ids) for p in pairs]
    batch = collate(examples, pad_id, side)
    batch["margin"] = torch.tensor([default_margin if p.margin is None else p.margin for p in pairs],
                                   dtype=torch.float32)
    if packed:
        batch.update(pack_pairs(pairs))
    return batch


PROMPT, CHOSEN, REJECTED = 0, 1, 2


def pack_pairs(pairs) -> dict[str, torch.Tensor]:
    """The packed sequence of B tokenized pairs, as tensors to add to a collated batch (host tensors):
    tree_ids, tree_positions, tree_pair, tree_segment [N]; tree_predictors, tree_targets, tree_rows [M] (every answer
    token: the position whose state predicts it, the token, its sequence 0 … 2B − 1, chosen rows first); tree_last
    [2B] (each answer's last position)."""
    ids, positions, pair_of, segment = [], [], [], []
    predictors, targets, rows, last = [], [], [], [[], []]
    for k, p in enumerate(pairs):
        start, width = len(ids), len(p.prompt_ids)
        ids += p.prompt_ids
        positions += range(width)
        pair_of += [k] * width
        segment += [PROMPT] * width
        for side, answer in ((CHOSEN, p.chosen_ids), (REJECTED, p.rejected_ids)):
            first = len(ids)
            predictors += [start + width - 1] + list(range(first, first + len(answer) - 1))
            targets += answer
            rows += [k + (side - 1) * len(pairs)] * len(answer)
            ids += answer
            positions += range(width, width + len(answer))
            pair_of += [k] * len(answer)
            segment += [side] * len(answer)
            last[side - 1].append(len(ids) - 1)
    long = torch.long
    return {"tree_ids": torch.tensor([ids]), "tree_positions": torch.tensor([positions]),
            "tree_pair": torch.tensor(pair_of), "tree_segment": torch.tensor(segment),
            "tree_predictors": torch.tensor(predictors, dtype=long), "tree_targets": torch.tensor(targets, dtype=long),
            "tree_rows": torch.tensor(rows, dtype=long), "tree_last": torch.tensor(last[0] + last[1], dtype=long)}
