"""`llmft eval`: what each policy does on held-out prompts, measured by judges no model can argue with.

    generate → judge every answer → log-ratio to the reference (KL) → summary per policy → win rates
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from llmft.checkpoint import atomic_write_text
from llmft.config import EvalConfig, ModelConfig, SamplingConfig
from llmft.console import console
from llmft.data.chat import tokenizer_difference
from llmft.data.preferences import detect_format as detect_pair_format
from llmft.data.preferences import tokenize_pairs
from llmft.data.records import Record, prompt_messages, read_records, shown_prompt
from llmft.errors import ConfigError, ModelError
from llmft.judges import Judgement, join_critiques, make_judgement
from llmft.maths.losses import pairwise_accuracy
from llmft.models.forward import check_lm_head
from llmft.models.loading import load_chat, load_model, resolve_device, resolve_dtype
from llmft.models.reward_model import RewardScorer
from llmft.models.sources import resolve_source
from llmft.rollout.engine_model import vllm_answers
from llmft.rollout.generation import Answer, generate
from llmft.run.held_out import answer_logps
from llmft.schema import to_dict


@dataclass
class PolicyRun:
    name: str
    answers: list[Answer]
    scores: dict[str, list[float]]  # judge → one score per prompt (constraints: share met; 1.0 = passed)
    logps: torch.Tensor  # [n] summed answer log-probs under the policy itself
    env: dict[str, float] | None = None  # with an environment: its counts (`rl.multi_turn.trajectory_metrics`)
    trajectories: list[dict] | None = None  # with an environment: each row's turns and turn rewards
    critiques: list[str] | None = None  # per prompt, what the judges that can say it found wrong ("" = nothing)


# --------------------------------------------------------------------------------------------- running
def run(cfg: EvalConfig) -> dict[str, Any]:
    """The `llmft eval` command: returns (and optionally writes) the JSON report."""
    check_config(cfg)
    records = read_records(cfg.prompts)[: cfg.limit] if cfg.models else []
    judges = {name: make_judgement(name, records, cfg.reference_column)
              for name in cfg.judges if name != "reward" and cfg.models and not cfg.env.name}
    chats = check_tokenizers(cfg)  # before any generation: a mismatch must not cost minutes
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    scorer = RewardScorer.load(cfg.reward_model, cfg.device, cfg.dtype) if cfg.reward_model else None
    report: dict[str, Any] = {"config": to_dict(cfg)}
    if "meteor" in judges:
        report["meteor_matches"] = meteor_matches()
        console.print(f"meteor matches words by: {report['meteor_matches']}")
    if cfg.preferences:
        report["reward_model"] = preference_accuracy(scorer, cfg.preferences)
    if cfg.models:
        runs = [run_env(name, chats[name], records, cfg, device, dtype) if cfg.env.name else
                run_policy(name, chats[name], records, judges, scorer, cfg.sampling, device, dtype, cfg.kernels)
                for name in cfg.models]
        ref_logps = reference_logps(cfg, chats[cfg.reference], runs, device, dtype) if cfg.reference else None
        report.update(summarize(runs, ref_logps, records))
    show(report)
    if cfg.out:
        Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(cfg.out), json.dumps(report, indent=2, ensure_ascii=False))
        console.print(f"report written to {cfg.out}")
    return report


def meteor_matches() -> str:
    from llmft.judges.meteor import has_wordnet

    return "exact, stem, WordNet synonym" if has_wordnet() else "exact, stem (no WordNet data installed: no synonyms)"


def check_config(cfg: EvalConfig) -> None:
    if not cfg.models and not cfg.preferences:
        raise ConfigError("eval: name at least one model (models: [...] or --model), or a preferences file for "
                          "the reward model's pairwise accuracy")
    if cfg.models and not cfg.prompts:
        raise ConfigError("eval: 'prompts' is required to evaluate models (a file of held-out prompts)")
    if cfg.env.name and cfg.sampling.engine != "hf":
        raise ConfigError("eval: env runs on sampling.engine: hf for now (a multi-turn rollout keeps its engine "
                          "between turns)")
    if cfg.env.name and cfg.reward_model:
        raise ConfigError("eval: with env.name the environment scores each conversation; leave reward_model empty")
    if "reward" in cfg.judges and not cfg.reward_model and not cfg.env.name:
        raise ConfigError("judge 'reward' needs reward_model: the path of an llmft reward output")
    if cfg.preferences and not cfg.reward_model:
        raise ConfigError("eval: 'preferences' measures a reward model's pairwise accuracy; set reward_model")


def check_tokenizers(cfg: EvalConfig) -> dict[str, Any]:
    """Load every model's tokenizer and chat rules once; a KL reference and a reward model must tokenize exactly
    as each policy does (they score the policy's own token ids)."""
    others = [(role, name) for role, name in (("reference", cfg.reference), ("reward model", cfg.reward_model))
              if name and cfg.models]
    names = [*cfg.models, *(name for _, name in others)]
    chats = {name: load_chat(resolve_source(name)) for name in dict.fromkeys(names)}
    for role, other in others:  # the reward model reads templated answers; the reference only token ids
        for name in cfg.models:
            what = tokenizer_difference(chats[other].tokenizer, chats[name].tokenizer)
            if what == "tokenizer" or (what and role == "reward model"):
                raise ModelError(f"{role} {other} has another {what} than policy {name}: it must score the "
                                 f"policy's own tokens, so it needs the same {what}")
    return chats


def preference_accuracy(scorer: RewardScorer, path: str) -> dict[str, Any]:
    """The reward model's pairwise accuracy (r_chosen > r_rejected) on a preference file."""
    records = read_records(path)
    pairs = tokenize_pairs(records, scorer.chat, detect_pair_format(records, "auto"), max_length=1 << 30)
    console.print(f"[bold]{scorer.path}[/]: scoring {len(pairs.pairs)} preference pairs of {path}")
    r_c = scorer.score_ids([p.prompt_ids + p.chosen_ids for p in pairs.pairs])
    r_r = scorer.score_ids([p.prompt_ids + p.rejected_ids for p in pairs.pairs])
    return {"path": scorer.path, "preferences": path, "pairs": len(pairs.pairs),
            "pairwise_accuracy": pairwise_accuracy(r_c, r_r), "margin": float((r_c - r_r).mean()),
            "reward_chosen": float(r_c.mean()), "reward_rejected": float(r_r.mean())}


def run_policy(name: str, chat, records: list[Record], judges: dict[str, Judgement], scorer: RewardScorer | None,
               sampling: SamplingConfig, device, dtype, kernels: bool = False) -> PolicyRun:
    console.print(f"[bold]{name}[/]: generating {len(records)} answers")
    source, model_cfg = resolve_source(name), ModelConfig(name=name, kernels=kernels)
    prompts = [chat.prompt_ids(prompt_messages(r), r.where) for r in records]
    if sampling.engine == "vllm":  # before the model is loaded here: the two are not in memory at once
        gens = vllm_answers(source, model_cfg, chat, prompts, sampling, dtype, device)
    model = load_model(source, dtype, device, model_cfg)
    check_lm_head(model)
    if sampling.engine == "hf":
        gens = generate(model, chat, prompts, sampling)
    texts, rows = [g.text for g in gens], [r.row for r in records]
    prompt_texts = [chat.decode(p) for p in prompts]
    judged = {j: fn(prompt_texts, texts, rows) for j, fn in judges.items()}  # judge → (scores, critiques)
    scores = {j: s for j, (s, _) in judged.items()}
    critiques = join_critiques([said for _, said in judged.values()], len(texts)) if judged else None
    if scorer:  # the tokens as generated: an answer cut at max_new_tokens is scored without an EOS
        scores["reward"] = scorer.score_ids([g.prompt_ids + g.answer_ids for g in gens]).tolist()
    logps = answer_logps(model, gens, chat.pad_id, sampling, device)
    return PolicyRun(name, gens, scores, logps, critiques=critiques)


class HFSampler:
    """The rollout engine's interface (`sample`) over a plain model: what a multi-turn rollout samples with."""

    def __init__(self, chat):
        self.chat = chat

    def sample(self, model, prompts: list[list[int]], sampling: SamplingConfig, logprobs: bool = False) -> list[Answer]:
        return generate(model, self.chat, prompts, sampling, logprobs=logprobs)


def run_env(name: str, chat, records: list[Record], cfg: EvalConfig, device, dtype) -> PolicyRun:
    """Each row a whole conversation with the environment (greedy unless sampling says otherwise), scored by it."""
    from llmft.rl.multi_turn import Conversations, trajectory_metrics

    console.print(f"[bold]{name}[/]: {len(records)} conversations with {cfg.env.name}")
    conversations = Conversations(cfg, chat)
    if records:
        conversations.prompts_of(records[:1])  # the template's prefix self-test, before the model loads
    model = load_model(resolve_source(name), dtype, device, ModelConfig(name=name, kernels=cfg.kernels))
    check_lm_head(model)
    trajectories = conversations.rollout(HFSampler(chat), model, records, cfg.sampling)
    gens = [t.answer() for t in trajectories]
    logps = answer_logps(model, gens, chat.pad_id, cfg.sampling, device)
    return PolicyRun(name, gens, {"env": [t.score for t in trajectories]}, logps, trajectory_metrics(trajectories),
                     [t.sample_row() for t in trajectories])


def reference_logps(cfg: EvalConfig, chat, runs: list[PolicyRun], device, dtype) -> list[torch.Tensor]:
    console.print(f"[bold]{cfg.reference}[/]: scoring the answers for the KL to the reference")
    model = load_model(resolve_source(cfg.reference), dtype, device, ModelConfig(name=cfg.reference,
                                                                                kernels=cfg.kernels))
    return [answer_logps(model, r.answers, chat.pad_id, cfg.sampling, device) for r in runs]


# -------------------------------------------------------------------------------------------- summary
def mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


def win_rate(a: list[float], b: list[float]) -> float:
    """Share of prompts where a scores higher than b; ties count half."""
    return mean(1.0 if x > y else 0.5 if x == y else 0.0 for x, y in zip(a, b, strict=True))


def summarize(runs: list[PolicyRun], ref_logps, records: list[Record]) -> dict[str, Any]:
    models = {}
    for i, r in enumerate(runs):
        m: dict[str, float] = {}
        if "constraints" in r.scores:
            m["constraints/pass_rate"] = mean(score == 1.0 for score in r.scores["constraints"])
        for judge, scores in r.scores.items():
            m[f"{judge}/score" if judge == "constraints" else judge] = mean(scores)
        if ref_logps is not None:
            m["kl_to_reference"] = float((r.logps - ref_logps[i]).mean())
        m.update({f"env/{k.removeprefix('env/')}": v for k, v in (r.env or {}).items()})
        m["length"] = mean(sum(g.mask) if g.mask is not None else len(g.answer_ids) for g in r.answers)
        m["eos_share"] = mean(g.finished for g in r.answers)
        models[r.name] = m
    base = runs[0]
    wins = {f"{r.name} vs {base.name}": {j: win_rate(r.scores[j], base.scores[j]) for j in r.scores}
            for r in runs[1:]}
    samples = {r.name: [{"prompt": shown_prompt(rec), "response": g.text, "finished": g.finished,
                         **{j: s[k] for j, s in r.scores.items()}, **(r.trajectories[k] if r.trajectories else {}),
                         **({"critique": r.critiques[k]} if r.critiques is not None else {})}
                        for k, (rec, g) in enumerate(zip(records, r.answers, strict=True))] for r in runs}
    return {"models": models, "win_rates": wins, "samples": samples}


def show(report: dict[str, Any], out: Console | None = None) -> None:
    """The report as tables: a row per metric, a column per model, as many models side by side as the console's
    width holds (a log is 80 columns wide): metric names are never cut, models go on to a next table."""
    out = out or Console()
    if rm := report.get("reward_model"):
        out.print(f"reward model {rm['path']}: pairwise accuracy [bold]{rm['pairwise_accuracy']:.3f}[/] on "
                  f"{rm['pairs']} pairs of {rm['preferences']} (mean margin {rm['margin']:.3f})")
    if "models" not in report:
        return
    names, rows = list(report["models"]), table_rows(report)
    label = max(len(name) for name, _ in rows)
    for group in side_by_side(names, rows, out.width - label - 4):
        t = Table(title="llmft eval", caption=f"win rate: against {names[0]} (ties count half)")
        t.add_column("metric", no_wrap=True, width=label)
        for k in group:  # as wide as its widest cell: the header folds instead
            t.add_column(names[k], justify="right", overflow="fold", width=cell_width(names, rows, k))
        for name, cells in rows:
            t.add_row(name, *[cells[k] for k in group])
        out.print(t)


def table_rows(report: dict[str, Any]) -> list[tuple[str, list[str]]]:
    """(metric, a cell per model) for every metric, then a win-rate row per judge (model k against the first)."""
    models, names = report["models"], list(report["models"])
    keys = list(dict.fromkeys(k for m in models.values() for k in m))
    rows = [(k, [f"{models[n].get(k, float('nan')):.4g}" for n in names]) for k in keys]
    judges = list(dict.fromkeys(j for rates in report["win_rates"].values() for j in rates))
    for j in judges:
        cells = [report["win_rates"].get(f"{n} vs {names[0]}", {}).get(j) for n in names]
        rows.append((f"win rate ({j})", ["-" if c is None else f"{c:.3f}" for c in cells]))
    return rows


def side_by_side(names: list[str], rows: list[tuple[str, list[str]]], width: int) -> list[list[int]]:
    """The model columns in groups that fit `width` characters (each column `cell_width` and 3 for padding and
    border); a group holds one column at least."""
    groups: list[list[int]] = [[]]
    used = 0
    for k in range(len(names)):
        need = cell_width(names, rows, k) + 3
        if groups[-1] and used + need > width:
            groups.append([])
            used = 0
        groups[-1].append(k)
        used += need
    return groups


def cell_width(names: list[str], rows: list[tuple[str, list[str]]], k: int) -> int:
    """Column k's width: its widest cell (7 at least), or its model's name where that is short (8 at most)."""
    return max(7, *(len(cells[k]) for _, cells in rows), len(names[k]) if len(names[k]) <= 8 else 0)
