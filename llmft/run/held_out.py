"""Held-out answers during training, for every stage: what judges other than the training objective say about the
policy's greedy answers, and the best policy by one of them.

    sft, dpo, kto   eval.prompts answered greedily (eval.max_new_tokens) at step 0, every train.eval_every steps and
                    at the end, beside the stage's own eval (eval/loss ...):
                        judges   eval.judges (constraints, substance, bleu, rouge_l, meteor, module:function)
                                                                                            eval/<judge>
                        KL       Σ_t log π(y_t) − log π_ref(y_t) of each answer, π_ref = the stage's starting model
                                 (its adapter disabled)                                              eval/kl
                        shape    length, the share without a stop id                      eval/completions/…
                        file     every answer with its scores → eval_samples.jsonl
    ppo, grpo       the same on data.eval, with the reward's sources too (`rl.held_out`)
    every stage     eval.select_by: the policy where an eval/… metric was best → output_dir/best/
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import torch

from llmft import distributed, manifest
from llmft.config import SamplingConfig
from llmft.console import console
from llmft.data.examples import Example, collate
from llmft.data.records import Record, prompt_messages, read_all, shown_prompt
from llmft.errors import ConfigError, RunError
from llmft.judges import Judge, make_judge
from llmft.models.logprobs import sequence_logps
from llmft.rollout.generation import Answer, generate
from llmft.run import loop
from llmft.run.eval_config import HeldOutConfig
from llmft.run.metrics import MetricsLog


def make_judges(cfg: HeldOutConfig, records: list[Record]) -> dict[str, Judge]:
    """The independent judges, each checked against every held-out row before the run starts."""
    return {name: make_judge(name, records, cfg.reference_column) for name in cfg.judges}


# -------------------------------------------------------------------------------- sft, dpo, kto: eval.prompts
class HeldOutPrompts:
    """sft's, dpo's or kto's held-out prompts (eval.prompts), their judges, and the file their answers go to."""

    def __init__(self, cfg, chat):
        self.cfg, self.chat = cfg, chat
        self.records = read_all(cfg.eval.prompts)
        self.ids = [chat.prompt_ids(prompt_messages(r), r.where) for r in self.records]
        self.judges = make_judges(cfg.eval, self.records)
        self.log: MetricsLog | None = None

    def sampling(self) -> SamplingConfig:
        return SamplingConfig(max_new_tokens=self.cfg.eval.max_new_tokens, temperature=0.0,
                              batch_size=self.cfg.train.batch_size)

    @torch.no_grad()
    def evaluate(self, model, step: int) -> dict[str, float]:
        """Greedy answers from the policy (adapter on), judged; their KL to the starting model (adapter off)."""
        model.eval()
        sampling, pad = self.sampling(), self.chat.pad_id
        answers = generate(model, self.chat, self.ids, sampling)
        device = next(model.parameters()).device
        logps = answer_logps(model, answers, pad, sampling, device)
        with model.disable_adapter():
            kl = logps - answer_logps(model, answers, pad, sampling, device)  # [n]
        scores = judge_scores(self.judges, [self.chat.decode(p) for p in self.ids], [a.text for a in answers],
                              self.records)
        if self.log:
            for i, (rec, a) in enumerate(zip(self.records, answers, strict=True)):
                self.log.log(step, {"prompt": shown_prompt(rec), "response": a.text, "finished": a.finished,
                                    "kl": float(kl[i]), **{k: v[i] for k, v in scores.items()}})
        model.train()
        return {**summary(scores), "eval/kl": float(kl.mean()),
                "eval/completions/mean_length": sum(len(a.answer_ids) for a in answers) / len(answers),
                "eval/completions/clipped_ratio": sum(not a.finished for a in answers) / len(answers)}

    def plan_row(self, t, num_steps: int) -> None:
        when, times = schedule(self.cfg.train.eval_every, num_steps)
        t.add_row("held-out answers", f"{len(self.ids)} prompts of {self.cfg.eval.prompts}, greedy, up to "
                                      f"{self.cfg.eval.max_new_tokens} tokens, at step 0 and {when} ({times} times); "
                                      f"judges {', '.join(self.cfg.eval.judges) or 'none'} (eval_samples.jsonl)")


def schedule(every: int | None, num_steps: int) -> tuple[str, int]:
    """When held-out answers are given besides step 0 ("every 5 steps", or "the end") and how many times in all."""
    when = ("every step" if every == 1 else f"every {every} steps") if every else "the end"
    return when, 2 + (len([k for k in range(1, num_steps) if k % every == 0]) if every else 0)


def held_out_prompts(cfg, chat, has_eval: bool) -> HeldOutPrompts | None:
    """eval.prompts, read and checked before any weights load; None without them."""
    if cfg.eval.judges and not cfg.eval.prompts:
        raise ConfigError("eval.judges need eval.prompts (a file of held-out prompts) to judge answers to")
    if cfg.eval.select_by and not (cfg.eval.prompts or has_eval):
        raise ConfigError("eval.select_by needs an evaluation: data.eval or eval.prompts")
    if cfg.eval.select_by:
        distributed.refuse_fsdp("eval.select_by", "the best policy is written by one process")
    if not cfg.eval.prompts:
        return None
    distributed.refuse_fsdp("eval.prompts", "held-out answers are generated by one process")
    return HeldOutPrompts(cfg, chat)


def with_held_out(stage: loop.Stage, s, model) -> loop.Stage:
    """sft, dpo, kto: after the stage's own evaluation (when it has one) the held-out answers (eval.prompts), then
    eval.select_by's best; the best so far kept in every checkpoint."""
    prompts, own, own_step = s.held_out, stage.evaluate, stage.step
    if not prompts and not s.cfg.eval.select_by:
        return stage
    assert stage.state is None and stage.resume is None, "a stage with its own loop state keeps the best itself"
    best, current = {"step": None, "value": None}, {"step": 0}  # the step an evaluation follows

    def step(micro_batches: list[list[int]], ctx: loop.StepContext) -> tuple[dict, dict]:
        current["step"] = ctx.number
        return own_step(micro_batches, ctx)

    def evaluate() -> dict[str, float]:
        metrics = {**(own() if own else {}), **(prompts.evaluate(model, current["step"]) if prompts else {})}
        return {**metrics, **keep_best(stage.name, s, model, current["step"], metrics, best)}

    def resume(state: dict | None) -> None:
        current["step"] = state["step"] if state else 0
        if prompts:
            prompts.log = samples_log(s, state["step"] if state else None)
        if state:  # rank 0 alone reads and removes best/, every rank gets the best so far
            best.update(distributed.on_main(lambda: resumed_best(s, state.get("best", {}), state["step"])))

    shown = (*stage.shown, *(k for k in [s.cfg.eval.select_by] if k and k not in stage.shown))
    return dataclasses.replace(stage, step=step, evaluate=evaluate, resume=resume, state=lambda: {"best": dict(best)},
                               shown=shown)


def answer_logps(model, answers: list[Answer], pad: int, sampling: SamplingConfig, device) -> torch.Tensor:
    """log π(y | x) of each generated answer at the sampling temperature (1 for greedy), fp32: [n] (multi-turn: of
    the policy's tokens, not the environment's)."""
    temperature = sampling.temperature if sampling.temperature > 0 else 1.0
    out = []
    for i in range(0, len(answers), sampling.batch_size):
        chunk = answers[i:i + sampling.batch_size]
        batch = collate([Example(a.prompt_ids + a.answer_ids, [-100] * len(a.prompt_ids) + [
            t if a.mask is None or a.mask[k] else -100 for k, t in enumerate(a.answer_ids)]) for a in chunk], pad)
        batch = {k: v.to(device) for k, v in batch.items()}
        out.append(sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"],
                                  temperature).cpu())
    return torch.cat(out)


# ------------------------------------------------------------------------------------------- every stage
def judge_scores(judges: dict[str, Judge], prompts: list[str], answers: list[str], records: list[Record]
                 ) -> dict[str, list[float]]:
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


def keep_best(stage: str, s, model, step: int, metrics: dict, best: dict) -> dict:
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
        out = Path(s.cfg.output_dir) / "best"
        if best.get("value") is None and out.is_dir() and any(out.iterdir()) and manifest.read(out) is None:
            raise RunError(f"{out} holds files that are not an llmft output: move them (eval.select_by writes the "
                           f"best policy there)")
        best.update(step=step, value=value)
        out.mkdir(exist_ok=True)
        loop.write_output(out, s, stage, model, {"best/step": step, "best/value": value, key: value}, s.data)
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


def samples_log(s, start_step: int | None) -> MetricsLog:
    """eval_samples.jsonl: kept through `start_step` on a resume, else begun afresh."""
    return MetricsLog(Path(s.cfg.output_dir), start_step, name="eval_samples.jsonl")
