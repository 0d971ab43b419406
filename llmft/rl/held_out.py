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

import torch

from llmft.data.records import shown_prompt
from llmft.errors import ConfigError
from llmft.judges import Judge
from llmft.rl.actor_critic import POLICY, REFERENCE, ActorCritic
from llmft.rl.multi_turn import sample_trajectories, trajectory_metrics
from llmft.rl.scoring import no_eos_share, score_rollout
from llmft.rollout.experience import Experience, answer_logps, pack
from llmft.run.held_out import judge_scores, schedule, summary
from llmft.run.metrics import MetricsLog
from llmft.run.plan import chunks


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
    scores = judge_scores(judges, [s.chat.decode(g.prompt_ids) for g in exp.answers], [g.text for g in exp.answers],
                          records)
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
    n, steps = len(s.eval.ids), s.plan.num_steps
    when, evaluations = schedule(s.cfg.train.eval_every, steps)  # step 0 and the end counted
    share = n * evaluations / (n * evaluations + answers_per_step * steps)
    t.add_row("held-out eval", f"{n} prompts, greedy, at step 0 and {when} ({evaluations} times); judges "
                               f"{', '.join(s.cfg.eval.judges) or 'none besides the reward'}; about {share:.0%} of the "
                               f"run's answers (eval_samples.jsonl)")
