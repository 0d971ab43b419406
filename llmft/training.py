"""What every stage's training loop shares: the step plan, the optimizer and schedule, metrics and the progress
display (the output directory is `llmft.rundir`). The stages keep their loops explicit and call these.
"""

from __future__ import annotations

import json
import math
import platform
import random
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from llmft import __version__, distributed
from llmft.errors import ConfigError, RunError, TrainingAborted

console = Console(stderr=True)


def configure_backend(device: torch.device) -> None:
    """CPU: flush subnormal floats to zero (they take a slow path in every op; the gain measured on
    SmolLM2-135M is small, 0-10%, and values below 1.2e-38 carry nothing a loss can see).
    CUDA: allow TF32 for what still runs in fp32."""
    if device.type == "cpu":
        torch.set_flush_denormal(True)
    else:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def require_dropout_off(cfg: Any, stage: str, why: str) -> None:
    if cfg.lora.dropout:
        raise ConfigError(f"lora.dropout: the {stage} stage trains with dropout off ({why}); set it to 0")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


# ------------------------------------------------------------------------------------------ step plan
@dataclass
class StepPlan:
    """Which examples every optimizer step sees: steps[s] = micro-batches, each a list of example indices.

    The order of epoch e is a permutation drawn from `seed + e`, so the plan is a pure function of the
    config: a resumed run picks it up at step s with nothing more than s.
    """

    steps: list[list[list[int]]]
    steps_per_epoch: int

    @property
    def total(self) -> int:
        return len(self.steps)

    def epoch_of(self, step: int) -> float:
        return step / self.steps_per_epoch


def plan_steps(n: int, batch_size: int, grad_accum: int, epochs: int, max_steps: int | None,
               seed: int, min_batch: int = 1) -> StepPlan:
    """`batch_size` is the global micro-batch (per process × processes). An epoch's last micro-batch with
    fewer than `min_batch` examples (the number of processes: each must get one) is dropped."""
    micro_per_epoch = n // batch_size + (n % batch_size >= min_batch)
    per_epoch = math.ceil(micro_per_epoch / grad_accum)
    n_epochs = math.ceil(max_steps / per_epoch) if max_steps else epochs
    steps = []
    for epoch in range(n_epochs):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        micro = [order[i:i + batch_size] for i in range(0, n, batch_size)][:micro_per_epoch]
        steps += [micro[i:i + grad_accum] for i in range(0, len(micro), grad_accum)]
    return StepPlan(steps[:max_steps] if max_steps else steps, per_epoch)


def plan_for(cfg: Any, n: int, min_rows: int = 1) -> StepPlan:
    """The step plan of a stage config over `n` training examples; a micro-batch of the plan is
    train.batch_size on each of the data-parallel processes (an epoch's last one kept when each gets `min_rows`)."""
    tr, procs = cfg.train, distributed.world().size
    return plan_steps(n, tr.batch_size * procs, tr.grad_accum, tr.epochs, tr.max_steps, cfg.seed, procs * min_rows)


# -------------------------------------------------------------------------------- optimizer & schedule
def make_optimizer(model, train) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    fused = all(p.is_cuda for p in params)
    return torch.optim.AdamW(params, lr=train.learning_rate, weight_decay=train.weight_decay, fused=fused)


def make_scheduler(optimizer, train, total_steps: int):
    """Linear warmup over `warmup_ratio` of the steps, then constant, linear or cosine decay to 0."""
    warmup = round(train.warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total_steps - warmup)
        if train.scheduler == "linear":
            return max(0.0, 1.0 - progress)
        if train.scheduler == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def optimizer_step(model, optimizer, max_grad_norm: float | None, check_norm: Callable[[float], None]) -> float:
    """Sum the gradients over data-parallel processes, clip, `check_norm` the norm (it raises on a non-finite one,
    before the weights are touched), step, zero; return the gradient norm before clipping."""
    params = [p for p in model.parameters() if p.requires_grad]
    distributed.sync_grads(params)
    norm = float(torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm else float("inf")))
    check_norm(norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm


def autocast(device: torch.device, dtype: torch.dtype):
    """bf16/fp16 autocast on CUDA; a no-op context on CPU (fp32)."""
    enabled = device.type == "cuda" and dtype in (torch.bfloat16, torch.float16)
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=enabled)


def ensure_finite(step: int, last_checkpoint: Path | None, **values: float) -> None:
    for name, value in values.items():
        if not math.isfinite(value):
            kept = f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint yet"
            raise TrainingAborted(f"non-finite {name} ({value}) at step {step}; stopped before this update "
                                  f"touched the weights; {kept}")


# -------------------------------------------------------------------------------------------- metrics
class MetricsLog:
    """Appends one JSON object per logged step to metrics.jsonl (and TensorBoard, when asked)."""

    def __init__(self, run_dir: Path, resume_step: int | None, tensorboard: bool, name: str = "metrics.jsonl"):
        self.path, self.writer = run_dir / name, None
        if not distributed.world().main:  # rank 0 alone writes
            self.path = None
            return
        if resume_step is not None and self.path.is_file():  # drop what was logged after the checkpoint
            rows = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in rows if r["step"] <= resume_step))
        elif self.path.exists():
            self.path.unlink()
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                console.print("[yellow]tensorboard is not installed: logging to metrics.jsonl only")
            else:
                self.writer = SummaryWriter(str(run_dir / "tensorboard"))

    def log(self, step: int, values: dict[str, float]) -> None:
        if self.path is None:
            return
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": step, **values}) + "\n")
        except OSError as e:
            from llmft.checkpoint import latest_checkpoint, write_failure

            raise RunError(write_failure(e, self.path, latest_checkpoint(self.path.parent))) from None
        if self.writer:
            for k, v in values.items():
                self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        if self.writer:
            self.writer.close()


class Throughput:
    """Work per second of training (tokens, pairs, ...): `timed` measures the steps only, never eval or
    checkpoints."""

    def __init__(self):
        self.counts: dict[str, int] = {}
        self.seconds = 0.0

    @contextmanager
    def timed(self, device: torch.device):
        start = time.perf_counter()
        yield
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        self.seconds += time.perf_counter() - start

    def add(self, counts: dict[str, int]) -> None:
        for name, n in counts.items():
            self.counts[name] = self.counts.get(name, 0) + n

    def rates(self) -> dict[str, float]:
        """`{name}_per_s` for every count since the last call."""
        rates = {f"{name}_per_s": n / max(self.seconds, 1e-9) for name, n in self.counts.items()}
        self.counts, self.seconds = {}, 0.0
        return rates


def progress_bar() -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[info]}"), TimeRemainingColumn(), console=console,
                    transient=False)


def describe_step(values: dict[str, float]) -> str:
    parts = [f"{k} {v:.4g}" if k != "lr" else f"lr {v:.2e}" for k, v in values.items()]
    return "  ".join(parts)


# ------------------------------------------------------------------------------------------- manifest
def versions() -> dict[str, str]:
    import peft
    import transformers

    return {"llmft": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__}


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
