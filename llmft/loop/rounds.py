"""`llmft loop`: rounds of on-policy feedback, each round's policy the next one's reference.

    measure   round 0: the first policy's greedy answers to the held-out prompts
    for each round k = 1..R:
        answer    the policy samples G answers to each of the round's prompts
        feedback  programs score them and say what is wrong, or people judge them on the annotation page
        rows      pairs: best ≻ worst; refine: the worst answer's critique shown, the rewrite that fixes it ≻ it (ILF)
        train     a dpo (or sft) stage from the policy (its reference), whose output is the next policy
        measure   the held-out pass rate, and the win rate against the previous round

Every step's result is a file in round-k/ (written whole or not at all) and the record loop.json names them, so a
killed loop goes on from its last finished step; the training stage resumes from its own checkpoints.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

from llmft.annotate.items import item_prompt
from llmft.checkpoint import atomic_write_text
from llmft.config import STAGE_CONFIGS, ModelConfig
from llmft.console import console
from llmft.data.chat import tokenizer_difference
from llmft.data.records import Record, prompt_messages, read_records
from llmft.errors import ConfigError, ModelError
from llmft.judges.text import rouge_l
from llmft.loop import feedback as fb
from llmft.loop import rows as rules
from llmft.loop.config import LoopConfig
from llmft.loop.measure import measure, show
from llmft.models.loading import load_chat, load_model, resolve_device, resolve_dtype
from llmft.models.sources import resolve_source
from llmft.rollout.generation import generate
from llmft.schema import build, to_dict


def run(cfg: LoopConfig) -> dict:
    """The `llmft loop` command: returns the record of the rounds (also in output_dir/loop.json)."""
    records, held = read_records(cfg.prompts), read_records(cfg.held_out.prompts) if cfg.held_out.prompts else []
    check(cfg, records)
    out, record = open_record(cfg)
    programs = fb.Programs(cfg.feedback, records, cfg.device, cfg.model.dtype) if needs_programs(cfg) else None
    chat = load_chat(resolve_source(cfg.model.name))
    if cfg.refine.model and (what := tokenizer_difference(load_chat(resolve_source(cfg.refine.model)).tokenizer,
                                                          chat.tokenizer)):
        raise ModelError(f"refine.model {cfg.refine.model} has another {what} than the policy {cfg.model.name}: it "
                         f"rewrites in the policy's conversation, so it needs the same {what}")
    policy = cfg.model.name
    if held and "measured" not in record:
        record["measured"] = measure(cfg, load(cfg, policy), chat, held, out / "round-0", None)
        save(out, record)
    for k in range(1, cfg.rounds + 1):
        done = next((r for r in record["rounds"] if r["round"] == k), None)
        policy = done["model"] if done else one_round(cfg, k, policy, chat, records, held, programs, out, record)
    show(record)
    return record


def one_round(cfg: LoopConfig, k: int, policy: str, chat, records: list[Record], held: list[Record],
              programs: fb.Programs | None, out: Path, record: dict) -> str:
    rd = out / f"round-{k}"
    console.print(f"[bold]round {k}/{cfg.rounds}[/]: policy {policy}")
    todo = round_prompts(records, k, cfg.prompts_per_round)
    sampled = step(rd / "answers.jsonl", lambda: answer(cfg, k, load(cfg, policy), chat, todo))
    judged, people = judge(cfg, k, rd, sampled, todo, programs)
    rows = step(rd / "train.jsonl", lambda: build_rows(cfg, k, rd, policy, chat, judged, todo, programs, people))
    model = train(cfg, k, policy, rd, rows)
    previous = record.get("rounds", [])[-1]["report"] if record.get("rounds") else record.get("measured")
    report = measure(cfg, load(cfg, model), chat, held, rd, previous) if held else {}
    entry = {"round": k, "policy": policy, "model": model, "prompts": [r.where for r in todo], "rows": len(rows),
             "trained": model != policy, "files": {p.name: str(p) for p in sorted(rd.glob("*.jsonl"))},
             "report": report | ({"people": fb.people_report(people)} if people else {}) | refined(rd)}
    record["rounds"].append(entry)
    save(out, record)
    return model


# ------------------------------------------------------------------------------------------------ steps
def answer(cfg: LoopConfig, k: int, model, chat, todo: list[Record]) -> list[dict]:
    """G sampled answers to each prompt (round k's seed): one line per prompt."""
    prompts = [chat.prompt_ids(prompt_messages(r), r.where) for r in todo]
    gens = generate(model, chat, [p for p in prompts for _ in range(cfg.answers)],
                    replace(cfg.sampling, seed=cfg.seed + k))
    g = cfg.answers
    return [{"where": r.where, "prompt": item_prompt(r), "prompt_text": chat.decode(p),
             "answers": [{"text": a.text, "finished": a.finished, "ids": a.prompt_ids + a.answer_ids}
                         for a in gens[i * g:(i + 1) * g]]}
            for i, (r, p) in enumerate(zip(todo, prompts, strict=True))]


def judge(cfg: LoopConfig, k: int, rd: Path, sampled: list[dict], todo: list[Record], programs):
    """(lines with each answer's score and critique, people's store or None)."""
    if cfg.people.items:
        candidates = rd / "candidates.jsonl"
        if not candidates.exists():
            fb.write_candidates(candidates, k, [s["prompt"] for s in sampled],
                                [[a["text"] for a in s["answers"]] for s in sampled], [r.row for r in todo])
        people = fb.wait_for_people(candidates, cfg.people)
        return (step(rd / "feedback.jsonl", lambda: score(sampled, todo, programs)) if programs else sampled), people
    return step(rd / "feedback.jsonl", lambda: score(sampled, todo, programs)), None


def score(sampled: list[dict], todo: list[Record], programs: fb.Programs) -> list[dict]:
    answers = [a for s in sampled for a in s["answers"]]
    rows = [r.row for s, r in zip(sampled, todo, strict=True) for _ in s["answers"]]
    prompts = [s["prompt_text"] for s in sampled for _ in s["answers"]]
    scores, critiques = programs.judge(prompts, [a["text"] for a in answers], [a["finished"] for a in answers],
                                       rows, [a["ids"] for a in answers])
    it = iter(zip(scores, critiques, strict=True))
    return [s | {"answers": [a | dict(zip(("score", "critique"), next(it), strict=True)) for a in s["answers"]]}
            for s in sampled]


def build_rows(cfg: LoopConfig, k: int, rd: Path, policy: str, chat, judged: list[dict], todo: list[Record],
               programs, people) -> list[dict]:
    """The round's training rows: pairs, refinements or both, as the trainer reads them."""
    pairs = []
    if cfg.method in ("pairs", "both"):
        pairs += fb.people_rows(people, "dpo") if people else score_pairs(judged)
    if cfg.method in ("refine", "both"):
        wanted = people_critiques(people, judged) if people else worst_criticised(judged)
        refined = step(rd / "refinements.jsonl", lambda: refine(cfg, k, load(cfg, cfg.refine.model or policy), chat,
                                                                 wanted, todo, programs))
        pairs += [rules.pair_row(r["prompt"], r["refinements"][r["chosen"]]["text"], r["answer"],
                                 (r["refinements"][r["chosen"]]["score"], r["score"]), critique=r["critique"])
                  for r in refined if r["chosen"] is not None]
    return rules.sft_rows(pairs) if cfg.trainer == "sft" else pairs


def score_pairs(judged: list[dict]) -> list[dict]:
    out = []
    for line in judged:
        answers = line["answers"]
        if found := rules.best_and_worst([a["score"] for a in answers]):
            w, lo = answers[found[0]], answers[found[1]]
            out.append(rules.pair_row(line["prompt"], w["text"], lo["text"], (w["score"], lo["score"])))
    return out


def worst_criticised(judged: list[dict]) -> list[dict]:
    """Per prompt, the lowest-scoring answer that a critic found fault with: what refine rewrites."""
    out = []
    for i, line in enumerate(judged):
        answers = line["answers"]
        c = rules.to_refine([a["score"] for a in answers], [a["critique"] for a in answers])
        if c is not None:
            out.append({"index": i, "prompt": line["prompt"], "answer": answers[c]["text"],
                        "critique": answers[c]["critique"], "score": answers[c]["score"]})
    return out


def people_critiques(people, judged: list[dict]) -> list[dict]:
    """The answers people criticised (their critiques joined), each with its programs' score."""
    by_prompt = {json.dumps(line["prompt"], sort_keys=True): i for i, line in enumerate(judged)}
    out = []
    for row in fb.people_rows(people, "critiques"):
        i = by_prompt[json.dumps(row["prompt"], sort_keys=True)]
        score = next(a["score"] for a in judged[i]["answers"] if a["text"] == row["completion"])
        out.append({"index": i, "prompt": row["prompt"], "answer": row["completion"], "critique": row["critique"],
                    "score": score})
    return out


def refine(cfg: LoopConfig, k: int, model, chat, wanted: list[dict], todo: list[Record], programs) -> list[dict]:
    """refine.attempts rewrites of each criticised answer, sampled with its critique shown, judged as answers to the
    original request; `chosen`: the best that beats the answer, or None."""
    n = cfg.refine.attempts
    asks = [chat.prompt_ids(rules.refinement_messages(prompt_messages(todo[w["index"]]), w["answer"], w["critique"],
                                                      cfg.refine.template), todo[w["index"]].where) for w in wanted]
    gens = generate(model, chat, [a for a in asks for _ in range(n)], replace(cfg.sampling, seed=cfg.seed + 1000 + k))
    rows = [todo[w["index"]].row for w in wanted for _ in range(n)]
    originals = [chat.prompt_ids(prompt_messages(todo[w["index"]])) for w in wanted for _ in range(n)]
    scores, _ = programs.judge([chat.decode(p) for p in originals], [g.text for g in gens],
                               [g.finished for g in gens], rows, [p + g.answer_ids for p, g in zip(originals, gens,
                                                                                                    strict=True)])
    out = []
    for i, w in enumerate(wanted):
        mine = [{"text": g.text, "finished": g.finished, "score": s, "overlap": rouge_l(g.text, w["answer"])}
                for g, s in zip(gens[i * n:(i + 1) * n], scores[i * n:(i + 1) * n], strict=True)]
        chosen = rules.best_refinement(w["score"], [m["score"] for m in mine], [m["overlap"] for m in mine],
                                       cfg.refine.min_overlap)
        out.append(w | {"refinements": mine, "chosen": chosen})
    return out


def refined(rd: Path) -> dict:
    """How the refinements went: answers criticised, rewrites sampled, the share of criticised answers that a rewrite
    improved, the rewrites' mean score against the criticised answers'."""
    lines = step(rd / "refinements.jsonl", list) if (rd / "refinements.jsonl").exists() else []
    if not lines:
        return {}
    tries = [t["score"] for r in lines for t in r["refinements"]]
    return {"refine": {"criticised": len(lines), "rewrites": len(tries),
                       "improved": sum(r["chosen"] is not None for r in lines) / len(lines),
                       "rewrite_score": sum(tries) / len(tries),
                       "criticised_score": sum(r["score"] for r in lines) / len(lines)}}


def train(cfg: LoopConfig, k: int, policy: str, rd: Path, rows: list[dict]) -> str:
    """The trainer stage from the policy on the round's rows; its output is the next policy (the policy itself
    when the round found nothing to train on)."""
    if not rows:
        console.print(f"round {k}: no training rows (every answer scored alike): the policy carries over")
        return policy
    from llmft.stages import dpo, sft

    stage_cfg = trainer_config(cfg, policy, str(rd / "train.jsonl"), str(rd / "model"), cfg.seed + k)
    {"dpo": dpo, "sft": sft}[cfg.trainer].run(stage_cfg)
    return str(rd / "model")


def trainer_config(cfg: LoopConfig, policy: str, data: str, out: str, seed: int):
    raw = json.loads(json.dumps(cfg.train))
    if not isinstance(raw.get("data", {}), dict):
        raise ConfigError("loop: train.data must be a mapping of the trainer's data keys")
    raw["data"] = raw.get("data", {}) | {"train": data}
    raw |= {"model": to_dict(cfg.model) | {"name": policy}, "output_dir": out, "resume": "auto", "seed": seed,
            "device": cfg.device}
    return build(STAGE_CONFIGS[cfg.trainer], raw, f"loop config, train (llmft schema {cfg.trainer})")


# ----------------------------------------------------------------------------------------------- helpers
def check(cfg: LoopConfig, records: list[Record]) -> None:
    """Everything a round needs, before the first model loads."""
    for key in ("model", "data", "output_dir", "resume", "seed", "device"):
        if key in cfg.train and key != "data":
            raise ConfigError(f"loop: train.{key} is the loop's own (each round sets it); remove it from train")
    trainer_config(cfg, cfg.model.name, "round.jsonl", "round", cfg.seed)
    if cfg.sampling.temperature <= 0:
        raise ConfigError("loop: sampling.temperature must be > 0: greedy answers to a prompt are all alike")
    if cfg.method != "pairs" and not cfg.people.items and not any(n in cfg.feedback.judges for n in
                                                                 ("constraints", "substance")) and \
            not any(":" in n for n in cfg.feedback.judges):
        raise ConfigError("loop: method refine needs critiques: a judge that says what is wrong (feedback.judges: "
                          "constraints, substance or a module:function returning {score, critique}) or people")
    if not records:
        raise ConfigError(f"loop: {cfg.prompts} has no prompt rows")


def needs_programs(cfg: LoopConfig) -> bool:
    """Programs judge unless people do; with people they still score refinements."""
    return not cfg.people.items or cfg.method != "pairs"


def round_prompts(records: list[Record], k: int, n: int) -> list[Record]:
    """Round k's n prompts: the next n after round k − 1's, from the start again at the end of the file."""
    return [records[((k - 1) * n + i) % len(records)] for i in range(min(n, len(records)))]


_loaded: dict[str, object] = {}


def load(cfg: LoopConfig, name: str):
    """The model of `name`, loaded once while it is the one in use."""
    if name not in _loaded:
        _loaded.clear()
        device = resolve_device(cfg.device)
        model_cfg = ModelConfig(**to_dict(cfg.model) | {"name": name})
        _loaded[name] = load_model(resolve_source(name), resolve_dtype(cfg.model.dtype, device), device, model_cfg)
    return _loaded[name]


def step(path: Path, make) -> list[dict]:
    """A step's lines: read back when an earlier run wrote them, else made and written whole."""
    if path.exists():
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    lines = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines))
    return lines


def open_record(cfg: LoopConfig) -> tuple[Path, dict]:
    """output_dir and its record: this loop's (to go on with), or a fresh one; another loop's is refused unless
    overwrite."""
    out = Path(cfg.output_dir)
    mine = to_dict(cfg) | {"overwrite": False}
    path = out / "loop.json"
    if path.exists():
        record = json.loads(path.read_text())
        if record["config"] == mine:
            return out, record
        if not cfg.overwrite:
            key = differs(record["config"], mine)
            raise ConfigError(f"output_dir {out} holds a loop with another config ('{key}' differs); set overwrite: "
                              f"true to start over, or another output_dir")
        shutil.rmtree(out)
    elif out.exists() and any(out.iterdir()):
        raise ConfigError(f"output_dir {out} holds something else than an llmft loop; choose another output_dir")
    record = {"config": mine, "rounds": []}
    save(out, record)
    return out, record


def differs(a: dict, b: dict, prefix: str = "") -> str:
    """The first dotted key whose value differs between two configs."""
    for k in dict.fromkeys([*a, *b]):
        x, y = a.get(k), b.get(k)
        if x != y:
            return differs(x, y, f"{prefix}{k}.") if isinstance(x, dict) and isinstance(y, dict) else prefix + k
    return prefix.rstrip(".")


def save(out: Path, record: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "loop.json", json.dumps(record, indent=2, ensure_ascii=False))

