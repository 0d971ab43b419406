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

import pickle
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import torch
from rich.table import Table

from llmft import distributed, manifest
from llmft.checkpoint import (
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
    save_final,
    write_failure,
)
from llmft.console import console, describe_step, progress_bar
from llmft.data.records import as_list
from llmft.errors import RunError
from llmft.models import quantization
from llmft.models.adapters import parameter_counts, unwrap
from llmft.models.forward import check_lm_head
from llmft.models.loading import dry_build
from llmft.models.sources import file_sha256
from llmft.run import report, rundir
from llmft.run.metrics import MetricsLog, Throughput
from llmft.run.optim import (
    configure_backend,
    ensure_finite,
    make_optimizer,
    make_scheduler,
    optimizer_step,
    seed_everything,
)
from llmft.run.plan import StepPlan
from llmft.schema import to_dict, to_yaml


@dataclass
class Setup:
    """What a stage's setup resolves before any model is built."""

    cfg: Any
    source: Any  # sources.ModelSource
    chat: Any  # chat.Chat: the tokenizer, its template's rules and the stop set
    train: Any  # the stage's training examples (data.TokenizedSet, preferences.PairSet, ...)
    eval: Any | None
    plan: StepPlan
    device: torch.device
    dtype: torch.dtype
    held_out: Any = None  # run.held_out.HeldOutPrompts: sft's, dpo's, kto's held-out prompts (eval.prompts)
    data: list[dict] = field(default_factory=list)  # the data files (`data_files`), hashed once when the run starts

    def close(self) -> None:
        """Release what the setup holds beyond the model (the RL stages: their rollout engine), when the run ends."""


@dataclass
class StepContext:
    """What a stage's step is given besides its micro-batches."""

    number: int  # the plan's step, from 1
    update: Callable[[float], float]  # update(loss) → the gradient norm: one optimizer step (see Stage)


StepFn = Callable[[list[list[int]], StepContext], tuple[dict[str, float], dict[str, int]]]


@dataclass
class Stage:
    """What a stage plugs into `fit`: one convention for every stage.

    step(micro_batches, ctx) runs one step of the plan: forward and backward over its micro-batches (this
    process's, each a list of example indices), and `ctx.update(loss)` for each optimizer step it takes — once
    for sft, reward and dpo; once per minibatch of the rollout for ppo and grpo (grpo skips a minibatch whose
    loss has no term on any process). `loss` is this process's share of that update's loss; the update checks
    that it and the gradient norm are finite on every process (before the weights are touched), sums the
    gradients over processes, clips, steps AdamW, zeroes, and returns the norm.
    step returns (metrics, counts): metrics hold at least "loss" and "grad_norm" (the last update's); counts are
    amounts of work, e.g. {"tokens": 4096, "pairs": 16}, logged as they are; "tokens_per_s", "pairs_per_s" are
    measured over the timed work of every step since the last logged row (train.log_every). The learning-rate
    schedule advances once per step of the plan. evaluate() returns metrics named "eval/...".
    `state()` is extra loop state saved in every checkpoint; `resume(state)` gets it back (None on a fresh
    start) before the first step.
    """

    name: str
    cfg: Any  # the stage config: output_dir, train, report_to
    plan: StepPlan
    device: torch.device
    step: StepFn
    evaluate: Callable[[], dict[str, float]] | None = None
    shown: tuple[str, ...] = ("loss", "lr", "tokens_per_s")  # metrics in the progress line
    state: Callable[[], dict] | None = None
    resume: Callable[[dict | None], None] | None = None
    alarm: Any = None  # rl.alarms.Alarm: observe(step, values) → {signal: reason} fired now; .stops; .resume(rows)
    finish: Callable[[], dict[str, float]] | None = None  # figures of the final weights, recorded with the output
    # (reward: the range of its scores on its training answers)


S = TypeVar("S", bound=Setup)


@dataclass(frozen=True)
class Recipe(Generic[S]):
    """What a training stage gives `run_stage`, in the order it runs (each stage module ends with its RECIPE):

        setup(cfg) → S              checks, model source and chat rules, data, the step plan (no weights read)
        show_plan(S)                the plan table
        build_model(S) → model      the model with its fresh adapter(s), on the device
        stage(S, model) → Stage     the step function (and eval, extra state) that `fit` runs
    """

    name: str  # the stage's command: sft, reward, dpo, kto, ppo, grpo
    setup: Callable[[Any], S]
    show_plan: Callable[[S], None]
    build_model: Callable[[S], torch.nn.Module]
    stage: Callable[[S, torch.nn.Module], Stage]


def run_stage(cfg: Any, recipe: Recipe, dry_run: bool = False) -> dict | None:
    """A training stage from start to end. Returns the final metrics (None for a dry run, or when output_dir already
    holds this run, finished)."""
    name = recipe.name
    run_dir = rundir.run_dir_of(cfg)
    distributed.init()  # a no-op unless torchrun / accelerate launch started several processes
    console.quiet = not distributed.world().main
    if rundir.finished_already(cfg):
        console.print(f"[green]{run_dir} already holds this run, finished; nothing to do")
        distributed.finish()
        return None
    rundir.check_output_dir(cfg)  # refuse early, before the model and data are loaded
    report.check_installed(cfg)
    s = recipe.setup(cfg)
    recipe.show_plan(s)
    if dry_run:  # what the real run would refuse at its model, found without loading weights
        dry_build(s.source, cfg.model, cfg.lora, s.chat.added_ids)
        console.print(to_yaml(cfg), markup=False, highlight=False)
        distributed.finish()
        return None
    data = s.data = data_files(cfg)
    resume_from = distributed.on_main(lambda: rundir.prepare_output_dir(cfg, name, data))
    try:
        metrics = train(s, recipe, resume_from, data)
    finally:
        s.close()
        rundir.unlock(run_dir)
    console.print(f"[green]done: {name} output (adapter, tokenizer, manifest) in {run_dir}")
    distributed.finish()  # the output exists on every process's return
    return metrics


def train(s: Setup, recipe: Recipe, resume_from: Path | None, data: list[dict]) -> dict:
    """Build the model, run the plan (from `resume_from` when given) and write the final output; return the
    final metrics."""
    cfg, run_dir = s.cfg, rundir.run_dir_of(s.cfg)
    configure_backend(s.device)
    seed_everything(cfg.seed)
    model = recipe.build_model(s)
    if units := distributed.shard_model(model, unwrap(getattr(model, "lm", model)), s.device):
        console.print(f"FSDP: base weights sharded over {distributed.world().size} processes in {units} units; "
                      f"adapters and heads whole on each")
    check_lm_head(getattr(model, "lm", model))
    trainable, count = parameter_counts(model)
    console.print(f"trainable parameters: {trainable:,} of {count:,} ({100 * trainable / count:.2f}%); weights "
                  f"{weight_bytes(model) / 2**20:,.0f} MiB")
    optimizer = make_optimizer(model, cfg.train)
    scheduler = make_scheduler(optimizer, cfg.train, s.plan.num_steps)
    explicit = isinstance(cfg.resume, str) and cfg.resume != "auto"
    state, resume_from = restore(resume_from, model, optimizer, scheduler, s.plan.num_steps, explicit)
    metrics = fit(recipe.stage(s, model), model, optimizer, scheduler, state, resume_from)
    if distributed.world().main:
        write_output(run_dir, s, recipe.name, model, metrics, data,
                     before_move=lambda names: rundir.record_final_files(run_dir, names))
    return metrics


def write_output(out: Path, s: Setup, stage: str, model, metrics: dict, data: list[dict],
                 before_move: Callable[[list[str]], None] | None = None) -> None:
    """A stage output in `out` (the adapter, tokenizer, generation config, then the manifest naming them): what a
    later stage or `llmft eval` loads. The run's final output, or an RL run's best policy (out = run_dir/best)."""
    record = manifest.describe(stage, s.cfg, s.source, metrics, data)
    record["model"]["embedding_rows"] = embedding_rows(unwrap(getattr(model, "lm", model)))
    if quantized := quantization.record(s.cfg.model.quantization, s.dtype):
        record["model"]["quantization"] = quantized
    try:
        record["files"] = save_final(out, model, s.chat.tokenizer, s.chat.generation_ids(), before_move=before_move)
        manifest.write(out, record)
    except OSError as e:
        raise RunError(write_failure(e, out, latest_checkpoint(rundir.run_dir_of(s.cfg)))) from None


def plan_table(name: str, s: Any) -> Table:
    """The start of every stage's plan: where it writes, the model, device and dtype."""
    t = Table(title=f"llmft {name} → {s.cfg.output_dir}", show_header=False)
    t.add_row("model", f"{s.cfg.model.name} ({s.source.kind}: {s.source.path})")
    quantized = f"; base linear layers in {q} (QLoRA)" if (q := s.cfg.model.quantization) else ""
    t.add_row("device / dtype", f"{s.device} / {str(s.dtype).removeprefix('torch.')}{quantized}")
    return t


def steps_row(t: Table, s: Any, unit: str) -> None:
    tr, procs = s.cfg.train, distributed.world().size
    per_step = f"{tr.batch_size} {unit} × {tr.grad_accum} accumulation"
    if procs > 1:
        per_step += f" × {procs} processes = {tr.batch_size * tr.grad_accum * procs} {unit} per step"
    t.add_row("steps", f"{s.plan.num_steps} optimizer steps ({s.plan.steps_per_epoch}/epoch) × {per_step}")


def restore(resume_from: Path | None, model, optimizer, scheduler, num_steps: int,
            explicit: bool = False) -> tuple[dict | None, Path | None]:
    """Load a checkpoint into the live objects when resuming; return its loop state ("step": the step to
    continue after) and the checkpoint used, (None, None) on a fresh start. Rank 0 picks the checkpoint: a damaged
    one (an empty or truncated file) is set aside (checkpoint-N.damaged, with a warning) and the one before it
    taken; one named by `resume: PATH` (`explicit`) is an error instead. Every rank then loads the one picked."""
    if not resume_from:
        return None, None
    earlier = [] if explicit else [p for p in list_checkpoints(resume_from.parent) if p != resume_from][::-1]
    path = distributed.on_main(lambda: first_usable([resume_from, *earlier], model, optimizer, scheduler))
    state = load_checkpoint(path, model, optimizer, scheduler)
    procs = distributed.world().size
    if state.get("processes", 1) != procs:
        raise RunError(f"resume: {path} was written by a run on {state.get('processes', 1)} processes; "
                       f"resume it with the same number (not {procs}): the step plan depends on it")
    console.print(f"resuming from {path} (step {state['step']} of {num_steps})")
    return state, path


DAMAGE = (OSError, EOFError, ValueError, KeyError, RuntimeError, pickle.UnpicklingError)  # what a bad file raises


def first_usable(candidates: list[Path], model, optimizer, scheduler) -> Path:
    """The first checkpoint that loads; damaged ones before it are renamed aside so that no later run takes them."""
    from safetensors import SafetensorError

    damaged = []
    for path in candidates:
        try:
            load_checkpoint(path, model, optimizer, scheduler)
            return path
        except torch.OutOfMemoryError:
            raise
        except (*DAMAGE, SafetensorError) as e:
            reason = str(e).splitlines()[0][:80] if str(e) else ""
            damaged.append(f"{path.name} ({type(e).__name__}: {reason})")
            if len(candidates) > 1:
                path.rename(path.with_name(f"{path.name}.damaged"))
            console.print(f"[yellow]warning: {path} is damaged ({damaged[-1]}); set aside as {path.name}.damaged")
    raise RunError(f"resume: no usable checkpoint in {candidates[0].parent}: {'; '.join(damaged)}; set "
                   f"overwrite: true to start the run again")


def fit(stage: Stage, model, optimizer, scheduler, state: dict | None, last_ckpt: Path | None) -> dict:
    """Run the plan from the step after `state["step"]` (the first, when state is None) to the end; return the
    last values of every metric."""
    cfg, run_dir = stage.cfg, Path(stage.cfg.output_dir)
    main = distributed.world().main
    start = state["step"] if state else 0
    if stage.resume:
        stage.resume(state)
    trackers: list = []  # rank 0's: opened there; its error, if it raised one, raised on every rank
    distributed.on_main(lambda: trackers.extend(report.open_trackers(cfg, run_dir, start if last_ckpt else None,
                                                                     to_dict(cfg))))
    log = MetricsLog(run_dir, start if last_ckpt else None, trackers=trackers if main else [])
    try:
        return run_plan(stage, model, optimizer, scheduler, start, last_ckpt, log)
    finally:
        log.close()


def run_plan(stage: Stage, model, optimizer, scheduler, start: int, last_ckpt: Path | None, log: MetricsLog) -> dict:
    """fit's loop: the steps after `start`, their logs, evaluations, alarm and checkpoints; the final metrics."""
    tr, run_dir, plan, main = stage.cfg.train, Path(stage.cfg.output_dir), stage.plan, distributed.world().main
    speed = Throughput()
    final: dict = {}
    # rank 0 evaluates and logs, every rank gets its figures (and its error, if it raised one); under FSDP every rank
    # joins the forwards (they gather sharded weights)
    evaluate = None
    if stage.evaluate:
        evaluate = stage.evaluate if distributed.fsdp() else (lambda: distributed.on_main(stage.evaluate))
    if evaluate and start == 0:  # the starting point, so the curve shows what training changed
        evaluated = evaluate()
        log.log(0, evaluated)
        if stage.alarm:
            stage.alarm.baseline(evaluated)
    model.train()
    step = start  # the last step run
    with progress_bar() as bar:
        task = bar.add_task(stage.name, total=plan.num_steps, completed=start, info="")
        for step in range(start + 1, plan.num_steps + 1):
            lr = scheduler.get_last_lr()[0]  # the rate this step uses
            with speed.timed(stage.device):
                metrics, counts, grad_norm = run_step(stage, step, model, optimizer, scheduler, last_ckpt)
            speed.add(counts)
            values = {**metrics, "lr": lr, "grad_norm": grad_norm, "epoch": round(plan.epoch_of(step), 4),
                      **counts}
            if step % tr.log_every == 0 or step == plan.num_steps:
                values.update(speed.rates())
                if stage.device.type == "cuda":
                    values["cuda_peak_mib"] = torch.cuda.max_memory_allocated(stage.device) / 2**20
                log.log(step, values)
            if evaluate and (step == plan.num_steps or (tr.eval_every and step % tr.eval_every == 0)):
                evaluated = evaluate()
                values.update(evaluated)
                log.log(step, evaluated)
            stop = bool(stage.alarm) and sound_alarm(stage.alarm, step, values, log, final)  # before the checkpoint
            if step % tr.save_every == 0 and step < plan.num_steps and main and not stop:
                extra = {"processes": distributed.world().size, **(stage.state() if stage.state else {})}
                try:
                    last_ckpt = save_checkpoint(run_dir, step, model, optimizer, scheduler,
                                                {"epoch": values["epoch"], **extra}, tr.keep_checkpoints)
                except OSError as e:
                    raise RunError(write_failure(e, run_dir / f"checkpoint-{step}", last_ckpt)) from None
            final.update(values)
            shown = describe_step({k: values[k] for k in stage.shown if k in values})
            bar.update(task, completed=step, info=shown)
            if not console.is_terminal and (step % max(1, plan.num_steps // 20) == 0 or step == plan.num_steps):
                # a log, not a terminal: ~20 lines
                console.print(f"step {step}/{plan.num_steps}  {shown}", highlight=False)
            if stop:
                break
    if stage.finish:  # rank 0 alone, its figures on every rank (under FSDP every rank joins the forwards)
        finished = stage.finish() if distributed.fsdp() else distributed.on_main(stage.finish)
        log.log(step, finished)
        final.update(finished)
    return final


def sound_alarm(alarm, step: int, values: dict, log: MetricsLog, final: dict) -> bool:
    """The reward-hacking alarm after a step: each signal that fires is a warning and an `alarms` row in
    metrics.jsonl; True when the run stops here (alarm.on_alarm: stop, on every process alike)."""
    fired = distributed.on_main(lambda: alarm.observe(step, values))  # rank 0's history decides for every rank
    for name, reason in fired.items():
        console.print(f"[bold red]alarm at step {step}[/] ({name}): {reason}")
    if fired:
        log.log(step, {"alarms": fired})
    stop = distributed.any_rank(bool(fired) and alarm.stops)
    if stop:
        final["alarm/stopped_at"] = step
        console.print(f"[bold red]stopped at step {step} by the alarm[/] (alarm.on_alarm: stop); the policy is saved "
                      f"as it is now")
    return stop


def run_step(stage: Stage, step: int, model, optimizer, scheduler, last_ckpt: Path | None):
    """One step of the plan: the stage's step (its forwards, backwards and updates), then the schedule."""
    max_norm = stage.cfg.train.max_grad_norm
    micro_batches = distributed.shard(stage.plan.steps[step - 1])  # this process's part of the step

    def update(loss: float) -> float:
        ensure_finite(step, last_ckpt, loss=distributed.global_sum(loss))  # every process's share: all stop together
        return optimizer_step(model, optimizer, max_norm, lambda norm: ensure_finite(step, last_ckpt, grad_norm=norm))

    metrics, counts = distributed.reduce_metrics(*stage.step(micro_batches, StepContext(step, update)))
    scheduler.step()
    return metrics, counts, metrics.pop("grad_norm")


# ------------------------------------------------------------------------------- what the manifest records


def weight_bytes(model) -> int:
    """Bytes the model's parameters hold (a quantised base: its packed weights; its constants are not counted)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def embedding_rows(lm) -> int:
    """Rows of the input embedding (grown when a chat template added tokens): the next stage grows its base to it."""
    emb = lm.get_input_embeddings()
    return (emb.get_base_layer() if hasattr(emb, "get_base_layer") else emb).weight.shape[0]


def data_files(cfg: Any) -> list[dict]:
    """The run's data files: role, resolved path and sha256 (hub datasets: the id, no hash)."""
    held_out = getattr(getattr(cfg, "eval", None), "prompts", None)  # sft's, dpo's, kto's eval.prompts
    named = [(role, path) for role, paths in (("train", cfg.data.train), ("eval", cfg.data.eval),
                                              ("held_out", held_out)) for path in as_list(paths)]
    return [{"role": role, "path": str(Path(p).expanduser().resolve()) if Path(p).expanduser().is_file() else p,
             "sha256": file_sha256(Path(p).expanduser()) if Path(p).expanduser().is_file() else None}
            for role, p in named]
