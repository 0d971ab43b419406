"""What a run logs: metrics.jsonl (and the trackers of report_to), and throughput measured over the timed work only."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from llmft import distributed
from llmft.errors import RunError
from llmft.run.report import close_all, log_all, scalars


class MetricsLog:
    """Appends one JSON object per logged step to metrics.jsonl, and its numbers to the trackers (report_to)."""

    def __init__(self, run_dir: Path, resume_step: int | None, name: str = "metrics.jsonl", trackers: list = ()):
        self.path, self.trackers = run_dir / name, list(trackers)  # run.report's: each has log(step, numbers), close()
        if not distributed.world().main:  # rank 0 alone writes
            self.path = None
            return
        if resume_step is not None and self.path.is_file():  # drop what was logged after the checkpoint
            rows = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in rows if r["step"] <= resume_step))
        elif self.path.exists():
            self.path.unlink()

    def log(self, step: int, values: dict[str, float]) -> None:
        if self.path is None:
            return
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": step, **values}) + "\n")
        except OSError as e:
            from llmft.checkpoint import latest_checkpoint, write_failure

            raise RunError(write_failure(e, self.path, latest_checkpoint(self.path.parent))) from None
        if self.trackers and (numbers := scalars(values)):
            log_all(self.trackers, step, numbers)

    def close(self) -> None:
        close_all(self.trackers)
        self.trackers = []


class Throughput:
    """Work per second of training (tokens, pairs, ...): `timed` measures the steps only, never eval or
    checkpoints."""

    def __init__(self):
        self.counts: dict[str, int] = {}
        self.seconds = 0.0

    @contextmanager
    def timed(self, device: torch.device):
        with stopwatch(device) as watch:
            yield
        self.seconds += watch.seconds

    def add(self, counts: dict[str, int]) -> None:
        for name, n in counts.items():
            self.counts[name] = self.counts.get(name, 0) + n

    def rates(self) -> dict[str, float]:
        """`{name}_per_s` for every count since the last call."""
        rates = {f"{name}_per_s": n / max(self.seconds, 1e-9) for name, n in self.counts.items()}
        self.counts, self.seconds = {}, 0.0
        return rates


@dataclass
class Stopwatch:
    seconds: float = 0.0


@contextmanager
def stopwatch(device: torch.device) -> Iterator[Stopwatch]:
    """The seconds a block takes, in `.seconds` once it ends; on CUDA, until the work it queued has run."""
    watch, start = Stopwatch(), time.perf_counter()
    yield watch
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    watch.seconds = time.perf_counter() - start
