"""The prompts an RL stage answers: each row's prompt turns, rendered through the chat template's generation
prompt, too-long prompts dropped and counted."""

from __future__ import annotations

from dataclasses import dataclass

from llmft.data.records import Record, prompt_messages, read_all
from llmft.errors import DataError


@dataclass
class PromptSet:
    records: list[Record]
    ids: list[list[int]]  # chat-templated prompt token ids, ready to be answered
    too_long: int  # prompts dropped for exceeding data.max_prompt_length


def load_prompts(path: str | list[str], cfg, chat) -> PromptSet:
    records, ids, too_long = [], [], 0
    for r in read_all(path, cfg.data.split):
        p = chat.prompt_ids(prompt_messages(r), r.where)
        if len(p) > cfg.data.max_prompt_length:
            too_long += 1
            continue
        records.append(r)
        ids.append(p)
    if not ids:
        raise DataError(f"{path}: no prompt fits data.max_prompt_length={cfg.data.max_prompt_length} "
                        f"({too_long} longer)")
    return PromptSet(records, ids, too_long)
