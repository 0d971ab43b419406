"""The optimisation loop every training stage shares, and the pieces of a run around it.

A stage describes one optimizer step as a function of its micro-batches (forward + backward on each,
returning the step's metrics) and, optionally, an evaluation; `fit` does the rest, identically for
every stage: learning rate, clipping, non-finite checks, metrics.jsonl, periodic eval, atomic
checkpoints, throughput, the progress bar.

    for step in plan:                       # StepPlan: the same batches on resume
        metrics = stage.step(micro_batches) # forward/backward, loss scaled for the whole step
        clip → AdamW → schedule → log → eval → checkpoint-N/
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from llmft.checkpoint import content_hash, load_checkpoint, save_checkpoint
from llmft.config import to_dict
from llmft.modeling import file_sha256, root_source
from llmft.training import (
    MetricsLog,
    StepPlan,
    Throughput,
    console,
    describe_step,
    ensure_finite,
    now,
    optimizer_step,
    progress_bar,
    versions,
)

StepFn = Callable[[list[list[int]]], tuple[dict[str, float], dict[str, int]]]


@dataclass
class Stage:
    """What a stage plugs into `fit`.

    step(micro_batches) runs forward and backward on every micro-batch of one optimizer step (each a list
    of example indices) and returns (metrics, counts): metrics hold at least "loss"; counts are amounts of
    work, e.g. {"tokens": 4096, "pairs": 16}, logged as they are and as "tokens_per_s", "pairs_per_s".
    evaluate() returns metrics named "eval/...".
    """

    name: str
    cfg: Any  # the stage config: output_dir, train, tensorboard
    plan: StepPlan
    device: torch.device
    step: StepFn
    evaluate: Callable[[], dict[str, float]] | None = None
    shown: tuple[str, ...] = ("loss", "lr", "tokens_per_s")  # metrics in the progress line
    extra_state: dict = field(default_factory=dict)


def restore(resume_from: Path | None, model, optimizer, scheduler, total: int) -> int:
    """Load a checkpoint into the live objects when resuming; return the step to continue after."""
    if not resume_from:
        return 0
    start = load_checkpoint(resume_from, model, optimizer, scheduler)["step"]
    console.print(f"resuming from {resume_from} (step {start} of {total})")
    return start


def fit(stage: Stage, model, optimizer, scheduler, start: int, last_ckpt: Path | None) -> dict:
    """Run the plan from step `start + 1` to the end; return the last values of every metric."""
    cfg, tr, run_dir, plan = stage.cfg, stage.cfg.train, Path(stage.cfg.output_dir), stage.plan
    log = MetricsLog(run_dir, start if last_ckpt else None, cfg.tensorboard)
    speed = Throughput()
    final: dict = {}
    if stage.evaluate and start == 0:  # the starting point, so the curve shows what training changed
        log.log(0, stage.evaluate())
    model.train()
    with progress_bar() as bar:
        task = bar.add_task(stage.name, total=plan.total, completed=start, info="")
        for step in range(start + 1, plan.total + 1):
            lr = scheduler.get_last_lr()[0]  # the rate this step uses
            with speed.timed(stage.device):
                metrics, counts = stage.step(plan.steps[step - 1])
                ensure_finite(step, last_ckpt, loss=metrics["loss"])
                grad_norm = optimizer_step(model, optimizer, scheduler, tr.max_grad_norm)
                ensure_finite(step, last_ckpt, grad_norm=grad_norm)
            speed.add(counts)
            values = {**metrics, "lr": lr, "grad_norm": grad_norm, "epoch": round(plan.epoch_of(step), 4),
                      **counts}
            if step % tr.log_every == 0 or step == plan.total:
                values.update(speed.rates())
                if stage.device.type == "cuda":
                    values["cuda_peak_mib"] = torch.cuda.max_memory_allocated(stage.device) / 2**20
                log.log(step, values)
            if stage.evaluate and (step == plan.total or (tr.eval_every and step % tr.eval_every == 0)):
                evaluated = stage.evaluate()
                values.update(evaluated)
                log.log(step, evaluated)
            if step % tr.save_every == 0 and step < plan.total:
                last_ckpt = save_checkpoint(run_dir, step, model, optimizer, scheduler,
                                            {"epoch": values["epoch"], **stage.extra_state}, tr.keep_checkpoints)
            final.update(values)
            shown = describe_step({k: values[k] for k in stage.shown if k in values})
            bar.update(task, completed=step, info=shown)
            if not console.is_terminal and (step % 10 == 0 or step == plan.total):  # logs, CI: plain lines
                console.print(f"step {step}/{plan.total}  {shown}", highlight=False)
    log.close()
    return final


# -------------------------------------------------------------------------------------------- manifest
def manifest(stage: str, cfg: Any, source, metrics: dict) -> dict[str, Any]:
    """The record of a finished run (llmft.json): where the model and data came from, config, metrics."""
    parent = None
    if source.kind == "stage":
        parent = {"path": source.path, "stage": source.manifest.get("stage"),
                  "sha256": content_hash(Path(source.path))}
    data_files = [(role, path) for role, path in (("train", cfg.data.train), ("eval", cfg.data.eval)) if path]
    return {
        "stage": stage,
        "created": now(),
        "model": {"source": cfg.model.name, "kind": source.kind, "resolved": resolved_name(source),
                  "root": root_source(source).name},
        "parent": parent,
        "data": [{"role": role, "path": str(Path(p).resolve()) if Path(p).is_file() else p,
                  "sha256": file_sha256(Path(p)) if Path(p).is_file() else None} for role, p in data_files],
        "config": to_dict(cfg),
        "metrics": metrics,
        "versions": versions(),
    }


def resolved_name(src) -> str:
    """What `resolve_source` needs to find this model again from anywhere."""
    if src.kind in ("embedded", "hub"):
        return src.name
    if src.kind == "gguf":
        return str(Path(src.name).expanduser().resolve())
    return src.path
