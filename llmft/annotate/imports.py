"""`llmft annotate import`: feedback collected in Label Studio or Argilla → a candidates file and an annotations file,
which `llmft annotate export` turns into training files like any judged in llmft's own page.

Label Studio, the pairwise template ("Human preference collection for RLHF": `<Pairwise name="comparison"
toName="answer1,answer2">`), JSON export: one task per prompt, `data` {prompt, answer1, answer2}, one entry in
`annotations` per person, each `result` holding {"type": "pairwise", "value": {"selected": "left" | "right"}}
(left = the first answer). An annotation with `was_cancelled` (or `skipped`) is left out, one without a pairwise
result said nothing. JSON-MIN rows ({prompt, answer1, answer2, comparison: [{selected}], annotator}) work too.

Argilla, `dataset.records.to_datasets()` / `to_list(flatten=True)` rows (2.x: columns `Q.responses`,
`Q.responses.users`, `Q.responses.status`) or 1.x `format_as("datasets")` rows (column `Q`: [{user_id, value,
status}]); only submitted responses count. The questions are named on the command line: a ranking over the answer
fields (best first; 1.x ranks may tie), a 1-5 rating per answer field, a text question holding an edited answer.
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path

from llmft.annotate.items import read_items
from llmft.annotate.store import Store
from llmft.checkpoint import atomic_write_text
from llmft.data.records import Record, read_records
from llmft.errors import DataError

Judgements = list[tuple[str, str, dict, str]]  # (annotator, action, fields, where in the source) of one item


def label_studio(path: str, fields: list[str]) -> list[tuple[dict, Judgements]]:
    """(item, judgements) per task of a Label Studio JSON export, or of a JSON-MIN one (one row per annotation,
    grouped back into tasks by id)."""
    tasks: dict[str, tuple[dict, Judgements]] = {}
    for n, rec in enumerate(read_records(path)):
        row, where = rec.row, rec.where
        data = row.get("data", row)
        if not isinstance(data, dict):
            raise DataError(f"{where}: a task's 'data' must be an object")
        prompt_key, *answer_keys = fields
        for key in fields:
            if not isinstance(data.get(key), str):
                raise DataError(f"{where}: no text field '{key}' in the task's data (name them with --fields "
                                f"PROMPT,ANSWER1,ANSWER2)")
        task_id = str(row.get("id", where))
        item = {"id": task_id, "prompt": data[prompt_key],
                "candidates": [{"text": data[k], "sources": [k]} for k in answer_keys]}
        if task_id in tasks and tasks[task_id][0] != item:
            raise DataError(f"{where}: task {task_id} appears again with other texts")
        found = tasks.setdefault(task_id, (item, []))[1]
        found += ls_judgements(row, where, n)
    return list(tasks.values())


def ls_judgements(row: dict, where: str, n: int) -> Judgements:
    if "data" not in row:  # JSON-MIN: one row per annotation
        selected = [v.get("selected") for v in row.get("comparison") or [] if isinstance(v, dict)]
        who = annotator_name(row.get("annotator"), row.get("annotation_id", f"row{n}"))
        return ls_choice(selected, who, where)
    found = []
    for i, ann in enumerate(row.get("annotations", row.get("completions")) or []):
        if not isinstance(ann, dict) or ann.get("was_cancelled") or ann.get("skipped"):
            continue
        results = [r for r in ann.get("result") or [] if isinstance(r, dict) and r.get("type") == "pairwise"]
        selected = [(r.get("value") or {}).get("selected") for r in results]
        found += ls_choice(selected, annotator_name(ann.get("completed_by"), ann.get("id", f"{n}.{i}")), where)
    return found


def ls_choice(selected: list, annotator: str, where: str) -> Judgements:
    if not selected or selected[-1] in (None, "none"):
        return []
    if selected[-1] not in ("left", "right"):
        raise DataError(f"{where}: a pairwise choice is 'left' or 'right', got {selected[-1]!r}")
    return [(annotator, "compare", {"winner": 0 if selected[-1] == "left" else 1}, where)]


def annotator_name(who: object, anonymous: object) -> str:
    """The person's id or e-mail; an annotation without one counts as its own person."""
    if isinstance(who, dict):
        who = who.get("email") or who.get("id")
    return "label-studio:" + (str(who) if who is not None else f"unknown-{anonymous}")


def argilla(path: str, prompt: str, answers: list[str], ranking: str | None, ratings: dict[str, str],
            edits: dict[str, str]) -> list[tuple[dict, Judgements]]:
    """(item, judgements) per record of an Argilla export (2.x flattened or 1.x rows)."""
    out = []
    for rec in read_records(path):
        row, where = rec.row, rec.where
        for key in (prompt, *answers):
            if not isinstance(row.get(key), str):
                raise DataError(f"{where}: no text field '{key}' (name the fields with --fields PROMPT,ANSWER,...)")
        item = {"id": str(row.get("id") or row.get("external_id") or where), "prompt": row[prompt],
                "candidates": [{"text": row[k], "sources": [k]} for k in answers]}
        found: Judgements = []
        if ranking:
            found += [(who, *rank_action(v, answers, f"{where}: {ranking}"), where)
                      for who, v in responses(rec, ranking)]
        for question, field in ratings.items():
            found += [(who, "rate", {"candidate": answers.index(field), "rating": rating(v, f"{where}: {question}")},
                       where) for who, v in responses(rec, question)]
        for question, field in edits.items():
            found += [(who, "edit", {"candidate": answers.index(field), "text": v}, where)
                      for who, v in responses(rec, question)
                      if isinstance(v, str) and v.strip() and v.strip() != row[field].strip()]
        out.append((item, found))
    return out


def responses(rec: Record, question: str) -> list[tuple[str, object]]:
    """(user, value) of each submitted response to `question`, in either Argilla layout."""
    row = rec.row
    if f"{question}.responses" in row:  # 2.x, flattened: three aligned lists
        values = row[f"{question}.responses"] or []
        users = row.get(f"{question}.responses.users") or [None] * len(values)
        status = row.get(f"{question}.responses.status") or ["submitted"] * len(values)
        return [(user_name(u, i), v) for i, (v, u, s) in enumerate(zip(values, users, status, strict=False))
                if s == "submitted"]
    value = row.get(question)
    if isinstance(value, list):  # 1.x: [{user_id, value, status}]
        return [(user_name(r.get("user_id"), i), r.get("value")) for i, r in enumerate(value)
                if isinstance(r, dict) and r.get("status", "submitted") == "submitted"]
    if value is None:
        return []
    raise DataError(f"{rec.where}: column '{question}' is not an Argilla response list")


def user_name(user: object, i: int) -> str:
    return "argilla:" + (str(user) if user is not None else f"unknown-{i}")


def rank_action(value: object, answers: list[str], where: str) -> tuple[str, dict]:
    """An Argilla ranking → rank (a strict order), pick (a unique best, and worst), or tie."""
    if isinstance(value, dict) and isinstance(value.get("rank"), list) and isinstance(value.get("value"), list):
        value = [{"rank": r, "value": v} for r, v in zip(value["rank"], value["value"], strict=False)]  # 1.x
    if isinstance(value, list) and value and all(isinstance(v, dict) and "value" in v for v in value):
        ranked = sorted(((v.get("rank") or 0, v["value"]) for v in value), key=lambda x: x[0])
    elif isinstance(value, list):  # 2.x: names, best first (ranks are not exported)
        ranked = list(enumerate(value))
    else:
        raise DataError(f"{where}: a ranking must be a list, got {type(value).__name__}")
    try:
        order = [answers.index(name) for _, name in ranked]
    except ValueError as e:
        raise DataError(f"{where}: the ranking names an answer field not in --fields ({e})") from None
    ranks = [r for r, _ in ranked]
    if len(set(ranks)) == len(ranks) and sorted(order) == list(range(len(answers))):
        return "rank", {"order": order}
    if ranks.count(ranks[0]) == len(ranks):
        return "tie", {}
    best = order[0] if ranks.count(ranks[0]) == 1 else None
    worst = order[-1] if ranks.count(ranks[-1]) == 1 else None
    return ("pick", {"best": best, "worst": worst}) if best is not None else ("tie", {})


def rating(value: object, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 5:
        raise DataError(f"{where}: ratings are whole numbers 1-5, got {value!r}")
    return value


def write(found: list[tuple[dict, Judgements]], candidates: Path, annotations: Path) -> Store:
    """The candidates file and a new annotations file holding every judgement (exact repeats once): written beside
    their names and renamed only when every judgement passed its checks, so a failed import leaves nothing."""
    if annotations.exists():
        raise DataError(f"{annotations} exists: import into a new annotations file (nothing is overwritten)")
    seen: set[str] = set()
    for item, _ in found:
        while item["id"] in seen:
            item["id"] += "'"
        seen.add(item["id"])
    tmp_c, tmp_a = (p.with_name(f".importing-{p.name}") for p in (candidates, annotations))
    for tmp in (tmp_c, tmp_a):
        tmp.unlink(missing_ok=True)
    atomic_write_text(tmp_c, "".join(json.dumps(item, ensure_ascii=False) + "\n" for item, _ in found))
    store = Store(tmp_a, read_items(tmp_c), writable=True)
    try:
        append_all(store, found)
    except DataError:
        store.close()
        for tmp in (tmp_c, tmp_a, tmp_a.with_name(tmp_a.name + ".lock")):
            tmp.unlink(missing_ok=True)
        raise
    store.close()
    tmp_a.with_name(tmp_a.name + ".lock").unlink(missing_ok=True)
    os.replace(tmp_c, candidates)
    os.replace(tmp_a, annotations)
    return Store(annotations, read_items(candidates))


def append_all(store: Store, found: list[tuple[dict, Judgements]]) -> None:
    now = datetime.now(timezone.utc).isoformat(timespec="microseconds")
    for item, judgements in found:
        shown = list(range(len(item["candidates"])))
        done: set = set()
        for who, action, fields, where in judgements:
            key = (who, action, json.dumps(fields, sort_keys=True))
            if key in done:
                continue
            done.add(key)
            try:
                store.append(who, item["id"], action, fields, shown=shown, time=now)
            except DataError as e:
                raise DataError(f"{where}: {str(e).split(': ', 1)[-1]}") from None
        for who in dict.fromkeys(w for w, a, _, _ in judgements if a not in ("compare", "tie")):
            store.append(who, item["id"], "done", {}, shown=shown, time=now)
