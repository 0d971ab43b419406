"""Held-out evaluation during RL (data.eval, at step 0, every train.eval_every steps and at the end): greedy answers to
the held-out prompts, measured by what the policy is trained on and by what it is not.

    answers     greedy, rollout.max_new_tokens (with an environment: whole conversations)
    reward      the training reward's sources on them                   eval/reward, eval/rewards/<source>/mean
    judges      eval.judges: independent of the reward (a strict verifier, ROUGE-L/METEOR against references)
                                                                         eval/<judge> (constraints: /score, /pass_rate)
    KL          Σ_t log π(y_t) − log π_ref(y_t) of each greedy answer, on the policy's tokens (as `llmft eval`'s
                kl_to_reference: how far the policy has moved on these prompts)                 eval/kl
    shape       length, the share without a stop id                       eval/completions/…
    file        every answer with its scores → eval_samples.jsonl (one row per prompt and evaluation)
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import torch

from llmft import manifest
from llmft.console import console
from llmft.data.records import Record, shown_prompt
from llmft.errors import ConfigError
from llmft.judges import Judge, make_judge
from llmft.rl.actor_critic import POLICY, REFERENCE, ActorCritic
from llmft.rl.alarms import HeldOutConfig
from llmft.rl.multi_turn import sample_trajectories, trajectory_metrics
from llmft.rl.scoring import no_eos_share, score_rollout
from llmft.rollout.experience import Experience, answer_logps, pack
from llmft.run import loop
from llmft.run.metrics import MetricsLog
from llmft.run.plan import chunks


def make_judges(cfg: HeldOutConfig, records: list[Record]) -> dict[str, Judge]:
    """The independent judges, each checked against every held-out row before the run starts."""
    return {name: make_judge(name, records, cfg.reference_column) for name in cfg.judges}


@torch.no_grad()
def evaluate(model: ActorCritic, s, judges: dict[str, Judge], log: MetricsLog | None, step: int) -> dict[str, float]:
    """The held-out evaluation's metrics (see the module's docstring); its answers appended to `log`."""
    records, env = s.eval.records, {}
    if s.conversations:  # whole conversations with the environment, greedy
        exp, parts, score, trajectories = sample_trajectories(s.conversations, model, s, records, 0, True)
        env = {f"eval/{k}": v for k, v in trajectory_metrics(trajectories).items()}
    else:
        sampling = dataclasses.replace(s.cfg.rollout, temperature=0.0)
        exp = pack(s.engine.sample(model, s.eval.ids, sampling), s.chat.pad_id, s.device)
        parts, score = score_rollout(model, s, exp, [r.row for r in records])
    scores = judge_scores(judges, s.chat, exp, records)
    kl = summed_kl(model, s, exp)  # [B]
    out = {"eval/reward": float(score.mean()), **{f"eval/rewards/{k}/mean": float(v.mean()) for k, v in parts.items()},
           **env, **summary(scores), "eval/kl": float(kl.mean()),
           "eval/completions/mean_length": float(exp.lengths().mean()),
           "eval/completions/clipped_ratio": no_eos_share(exp)}
    if "constraints" in parts and "constraints" not in scores:
        out["eval/constraints/pass_rate"] = float((parts["constraints"] == 1.0).float().mean())
    if log:
        for i, (rec, g) in enumerate(zip(records, exp.answers, strict=True)):
            log.log(step, {"prompt": shown_prompt(rec), "response": g.text, "finished": g.finished,
                           "reward": float(score[i]), "kl": float(kl[i]), **{k: v[i] for k, v in scores.items()}})
    model.train()
    return out


def judge_scores(judges: dict[str, Judge], chat, exp: Experience, records: list[Record]) -> dict[str, list[float]]:
    prompts, answers = [chat.decode(g.prompt_ids) for g in exp.answers], [g.text for g in exp.answers]
    rows = [r.row for r in records]
    return {name: [float(x) for x in judge(prompts, answers, rows)] for name, judge in judges.items()}


def summary(scores: dict[str, list[float]]) -> dict[str, float]:
    """eval/<judge>: the mean; the constraints judge as eval/constraints/score and /pass_rate (every one met)."""
    out = {}
    for name, xs in scores.items():
        if name == "constraints":
            out["eval/constraints/score"] = sum(xs) / len(xs)
            out["eval/constraints/pass_rate"] = sum(x == 1.0 for x in xs) / len(xs)
        else:
            out[f"eval/{name}"] = sum(xs) / len(xs)
    return out


def summed_kl(model: ActorCritic, s, exp: Experience) -> torch.Tensor:
    """Σ_t log π(y_t) − log π_ref(y_t) over each answer's policy tokens, at temperature 1: [B] fp32."""
    out = []
    for idx in chunks(range(exp.size), s.cfg.train.batch_size):
        with model.role(POLICY):
            logps, _ = answer_logps(model.lm, model.hidden, exp, idx, 1.0, s.dtype)
        with model.role(REFERENCE):
            ref, _ = answer_logps(model.lm, model.hidden, exp, idx, 1.0, s.dtype)
        out.append(((logps - ref) * exp.mask[idx]).sum(-1))
    return torch.cat(out)


def keep_best(stage: str, s, model: ActorCritic, step: int, metrics: dict, best: dict) -> dict:
    """eval.select_by: when this evaluation is the best so far, the policy as it is now → output_dir/best/ (a stage
    output). Returns best/step and best/value (logged, and recorded in the run's llmft.json)."""
    key, mode = s.cfg.eval.select_by, s.cfg.eval.select_mode
    if not key:
        return {}
    if key not in metrics:
        raise ConfigError(f"eval.select_by: the held-out evaluation logs no {key}; it logs "
                          f"{', '.join(sorted(k for k in metrics if k.startswith('eval/')))}")
    value = metrics[key]
    if best.get("value") is None or (value > best["value"] if mode == "max" else value < best["value"]):
        best.update(step=step, value=value)
        out = Path(s.cfg.output_dir) / "best"
        out.mkdir(exist_ok=True)
        loop.write_output(out, s, stage, model, {"best/step": step, "best/value": value, key: value},
                          loop.data_files(s.cfg))
    return {"best/step": best["step"], "best/value": best["value"]}


def resumed_best(s, best: dict, step: int) -> dict:
    """The best so far as the checkpoint knew it. A best/ written after that checkpoint (by the stretch of the run a
    kill discarded) is removed: the resumed run writes its own."""
    out = Path(s.cfg.output_dir) / "best"
    written = (manifest.read(out) or {}).get("metrics", {}).get("best/step")
    if isinstance(written, int) and written > step:
        console.print(f"[yellow]best/ was written at step {written}, after the checkpoint of step {step} this run "
                      f"resumes from: removed (the resumed run keeps its own best)")
        shutil.rmtree(out)
        return {"step": None, "value": None}
    return best


def logged_keys(cfg, reward_sources: list[str]) -> set[str]:
    """The eval/… metrics a held-out evaluation of this config logs (env/… aside)."""
    keys = {"eval/reward", "eval/kl", "eval/completions/mean_length", "eval/completions/clipped_ratio",
            *(f"eval/rewards/{k}/mean" for k in reward_sources)}
    for name in cfg.eval.judges:
        keys |= {"eval/constraints/score", "eval/constraints/pass_rate"} if name == "constraints" else {f"eval/{name}"}
    if "constraints" in reward_sources:
        keys.add("eval/constraints/pass_rate")
    return keys


def check_watched(cfg, reward_sources: list[str]) -> None:
    """alarm.independent and eval.select_by name metrics the evaluation logs: checked before the run starts."""
    keys = logged_keys(cfg, reward_sources)
    for name, key in (("alarm.independent", cfg.alarm.independent), ("eval.select_by", cfg.eval.select_by)):
        if key and key not in keys and not (cfg.env.name and key.startswith("eval/env/")):
            raise ConfigError(f"{name}: the held-out evaluation logs no {key}; it logs {', '.join(sorted(keys))}")


def plan_row(t, s, answers_per_step: int) -> None:
    """The plan table's row for the held-out evaluation: what, how often, and its share of the run's generation."""
    if not s.eval:
        return
    n, steps, every = len(s.eval.ids), s.plan.num_steps, s.cfg.train.eval_every
    evaluations = 2 + (len([k for k in range(1, steps) if k % every == 0]) if every else 0)  # step 0 and the end too
    share = n * evaluations / (n * evaluations + answers_per_step * steps)
    when = ("every step" if every == 1 else f"every {every} steps") if every else "the end"
    t.add_row("held-out eval", f"{n} prompts, greedy, at step 0 and {when} ({evaluations} times); judges "
                               f"{', '.join(s.cfg.eval.judges) or 'none besides the reward'}; about {share:.0%} of the "
                               f"run's answers (eval_samples.jsonl)")


def samples_log(s, start_step: int | None) -> MetricsLog:
    """eval_samples.jsonl: kept through `start_step` on a resume, else begun afresh."""
    return MetricsLog(Path(s.cfg.output_dir), start_step, False, name="eval_samples.jsonl")
