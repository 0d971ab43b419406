"""SFT's examples: a row tokenised through the chat template with its labels (the answer's terminator
included), collated into padded batches, or packed into blocks of several examples."""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

import torch

from llmft.data.chat import Chat
from llmft.data.records import Record, to_messages
from llmft.errors import DataError


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
                     where: str, tools: list[dict] | None = None) -> tuple[Example, bool]:
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
        pieces = chat.conversation(messages, where, tools)
    ids, labels = [], []
    for piece, answer in pieces:
        ids += piece
        labels += piece if answer or loss_on == "all" else [-100] * len(piece)
    truncated = len(ids) > max_length
    return Example(ids[:max_length], labels[:max_length]), truncated


def tokenize_records(records: list[Record], chat: Chat, fmt: str, max_length: int, loss_on: str) -> TokenizedSet:
    out = TokenizedSet(examples=[], rows=len(records))
    for rec in records:
        ex, truncated = tokenize_example(chat, to_messages(rec, fmt), max_length, loss_on, rec.where, row_tools(rec))
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


def row_tools(rec: Record) -> list[dict] | None:
    """A row's `tools` column: the JSON schemas of the tools its conversation offers (as TRL's SFT reads them)."""
    tools = rec.row.get("tools")
    if tools is None:
        return None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise DataError(f"{rec.where}: 'tools' must be a list of JSON schemas (objects)")
    return tools


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
