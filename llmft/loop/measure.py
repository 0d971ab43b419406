"""The per-round report: greedy answers to the held-out prompts, judged; the win rate against the previous round."""

from __future__ import annotations

import json
from pathlib import Path

from rich.table import Table

from llmft.checkpoint import atomic_write_text
from llmft.commands.evaluation import mean, win_rate
from llmft.config import SamplingConfig
from llmft.console import console
from llmft.data.records import Record, prompt_messages, shown_prompt
from llmft.judges import make_judge
from llmft.loop.config import LoopConfig
from llmft.rollout.generation import generate


def measure(cfg: LoopConfig, model, chat, held: list[Record], rd: Path, previous: dict | None) -> dict:
    """The policy's held-out figures (each judge's mean, the constraints pass rate, length, the share that ended),
    its answers in rd/held_out.jsonl, and per judge its win rate against `previous` (the last round's report)."""
    sampling = SamplingConfig(temperature=0.0, max_new_tokens=cfg.held_out.max_new_tokens,
                              batch_size=cfg.sampling.batch_size)
    prompts = [chat.prompt_ids(prompt_messages(r), r.where) for r in held]
    gens = generate(model, chat, prompts, sampling)
    texts, rows, shown = [g.text for g in gens], [r.row for r in held], [chat.decode(p) for p in prompts]
    scores = {j: make_judge(j, held, cfg.held_out.reference_column)(shown, texts, rows) for j in cfg.held_out.judges}
    report = {f"{j}/score" if j == "constraints" else j: mean(s) for j, s in scores.items()}
    if "constraints" in scores:
        report["constraints/pass_rate"] = mean(s == 1.0 for s in scores["constraints"])
    report |= {"length": mean(len(g.answer_ids) for g in gens), "eos_share": mean(g.finished for g in gens),
               "scores": scores}
    if previous:
        report["win_rate"] = {j: win_rate(s, previous["scores"][j]) for j, s in scores.items()}
    rd.mkdir(parents=True, exist_ok=True)
    atomic_write_text(rd / "held_out.jsonl", "".join(json.dumps({"prompt": shown_prompt(r), "response": g.text,
                                                                 "finished": g.finished, **{j: s[i] for j, s in
                                                                                            scores.items()}},
                                                                ensure_ascii=False) + "\n"
                                                     for i, (r, g) in enumerate(zip(held, gens, strict=True))))
    console.print(f"held out: {summary(report)}")
    return report


def summary(report: dict) -> str:
    shown = {k: v for k, v in report.items() if isinstance(v, float)}
    wins = ", ".join(f"{j} {v:.3f}" for j, v in report.get("win_rate", {}).items())
    return ", ".join(f"{k} {v:.3g}" for k, v in shown.items()) + (f"; win rate vs previous round: {wins}"
                                                                   if wins else "")


def show(record: dict) -> None:
    """A row per round: its training rows and its held-out figures."""
    t = Table(title="llmft loop")
    before = record.get("measured") or {}
    keys = [k for k, v in before.items() if isinstance(v, float)] or \
        [k for r in record["rounds"][:1] for k, v in r["report"].items() if isinstance(v, float)]
    for col in ("round", "rows", *keys, "win rate vs previous"):
        t.add_column(col, justify="right")
    if before:
        t.add_row("0", "-", *[f"{before[k]:.3g}" for k in keys], "-")
    for r in record["rounds"]:
        rep = r["report"]
        wins = " ".join(f"{v:.3f}" for v in rep.get("win_rate", {}).values()) or "-"
        t.add_row(str(r["round"]), str(r["rows"]), *[f"{rep.get(k, float('nan')):.3g}" for k in keys], wins)
    console.print(t)
