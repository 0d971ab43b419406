"""Feedback on a round's answers: programs (scores, and critiques in words from the judges that can say what is
wrong) or people (the annotation page serves the round's answers; the round waits until enough are judged)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import torch

from llmft.annotate.export import agreement, position_bias, rows_for, verdicts
from llmft.annotate.items import read_items
from llmft.annotate.server import App, make_server
from llmft.annotate.store import Store
from llmft.checkpoint import atomic_write_text
from llmft.config import RewardSourcesConfig
from llmft.console import console
from llmft.data.records import Record
from llmft.errors import ConfigError
from llmft.judges import join_critiques, make_critic
from llmft.loop.config import PeopleConfig
from llmft.rl.scoring import REWARD_MODEL, Scorer


class Programs:
    """Judges and/or a reward model: each answer's combined score (as `reward:` combines them in ppo and grpo) and
    what the critics found wrong, one line per answer ("" = nothing)."""

    def __init__(self, cfg: RewardSourcesConfig, records: list[Record], device: str, dtype: str):
        from llmft.models.reward_model import RewardScorer

        self.scorer = Scorer(cfg, records)
        critics = {name: make_critic(name, records) for name in cfg.judges}
        self.critics = [c for c in critics.values() if c]
        self.reward = RewardScorer.load(cfg.model, device, dtype) if cfg.model else None
        self.penalty = cfg.missing_eos_penalty

    def judge(self, prompts: list[str], answers: list[str], finished: list[bool], rows: list[dict],
              ids: list[list[int]]) -> tuple[list[float], list[str]]:
        """(scores, critiques) of answers; `ids`: each prompt + answer as tokens, for the reward model."""
        model_scores = self.reward.score_ids(ids) if self.reward else None
        parts = self.scorer.parts(prompts, answers, rows, model_scores)
        scores = self.scorer.combine(parts, torch.tensor(finished, dtype=torch.bool)).tolist()
        said = [critic(prompts, answers, rows) for critic in self.critics]
        if self.penalty:
            said.append(["the answer never ends: it runs on past the length limit" if not f else ""
                         for f in finished])
        return scores, join_critiques(said, len(answers))

    @property
    def criticises(self) -> bool:
        return bool(self.critics)

    @property
    def has_reward_model(self) -> bool:
        return REWARD_MODEL in self.scorer.weights


# ------------------------------------------------------------------------------------------------ people
def write_candidates(path: Path, round_id: int, prompts: list, answers: list[list[str]], rows: list[dict]) -> None:
    """The round's candidates file (llmft annotate's): one item per prompt, its distinct answers as candidates."""
    lines = []
    for i, (prompt, texts, row) in enumerate(zip(prompts, answers, rows, strict=True)):
        distinct: dict[str, list[str]] = {}
        for j, t in enumerate(texts):
            distinct.setdefault(t, []).append(f"answer {j + 1}")
        if len(distinct) < 2:
            continue
        extra = {k: v for k, v in row.items() if k in ("constraints",)}
        lines.append({"id": f"r{round_id}-{i + 1}", "prompt": prompt,
                      "candidates": [{"text": t, "sources": s} for t, s in distinct.items()], **extra})
    if not lines:
        raise ConfigError(f"round {round_id}: every prompt got the same answer {len(answers[0])} times: nothing "
                          f"for people to compare (raise sampling.temperature)")
    atomic_write_text(path, "".join(json.dumps(ln, ensure_ascii=False) + "\n" for ln in lines))


def judged_items(store: Store) -> int:
    return len(verdicts(store))


def wait_for_people(candidates: Path, cfg: PeopleConfig, log=console.print) -> Store:
    """Serve the round's items on the annotation page until cfg.items of them (or all) are judged; the judgements
    stay in CANDIDATES.annotations.jsonl, so a killed round waits on from where people were."""
    items = read_items(candidates)
    store = Store(candidates.with_name(candidates.stem + ".annotations.jsonl"), items, writable=True)
    need = min(cfg.items, len(items))
    if judged_items(store) < need:
        server = make_server(App(items, store, cfg.mode, None, None, True), cfg.host, cfg.port)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        log(f"people: open [bold]http://{cfg.host}:{server.server_address[1]}/[/] and judge {need} of the "
            f"{len(items)} items of {candidates} (judged so far: {judged_items(store)})", soft_wrap=True)
        try:
            while judged_items(store) < need:
                time.sleep(cfg.poll_seconds)
        finally:
            server.shutdown()
            server.server_close()
    store.close()
    return Store(store.path, items)  # read back whole, read-only


def people_rows(store: Store, target: str) -> list[dict]:
    """The judged items as rows: dpo pairs (best ≻ worst by each item's votes and ratings, edits ≻ what they edit)
    or critiques ({prompt, completion, critique})."""
    return rows_for(target, verdicts(store))


def people_report(store: Store) -> dict:
    return {"items_judged": judged_items(store), "agreement": agreement(store), "position_bias": position_bias(store)}
