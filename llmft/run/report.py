"""report_to: the run's metrics, under metrics.jsonl's names and steps, in the trackers a user already reads.

    tensorboard   output_dir/tensorboard/                                   (pip install 'llmft[tensorboard]')
    wandb         output_dir/wandb/; online or offline as WANDB_MODE says   (pip install 'llmft[wandb]')
    mlflow        MLFLOW_TRACKING_URI, else a local file store output_dir/mlruns/ (pip install 'llmft[mlflow]')
    trackio       trackio's local database (TRACKIO_DIR; `trackio show`)     (pip install 'llmft[trackio]')

The project is report_project (W&B and trackio project, MLflow experiment), the run named after output_dir (trackio:
with the time it started, its runs are known by name). A resumed run goes on in the same W&B, MLflow and trackio run
(their ids are kept in output_dir/report_ids.json); the steps after the checkpoint that the kill discarded are logged
again: TensorBoard purges its own, MLflow keeps both, W&B keeps its first and drops the repeats. Rank 0 alone reports,
as it alone writes metrics.jsonl. A tracker that fails while the run goes on is dropped with a warning: the run and
metrics.jsonl go on.
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from pathlib import Path

from llmft.console import console
from llmft.errors import ConfigError, RunError

PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "trackio": "trackio"}
IDS = "report_ids.json"


def trackers(cfg) -> list[str]:
    """report_to, with the older `tensorboard: true` folded in."""
    return list(dict.fromkeys([*cfg.report_to, *(["tensorboard"] if cfg.tensorboard else [])]))


def check_installed(cfg) -> None:
    """Each tracker's package, before anything loads: one line naming what to install."""
    for name in trackers(cfg):
        if importlib.util.find_spec(PACKAGES[name]) is None:
            raise ConfigError(f"report_to: {name} needs the {PACKAGES[name]} package, which is not installed: "
                              f"pip install 'llmft[{name}]'")


def open_trackers(cfg, run_dir: Path, resume_step: int | None, config: dict) -> list:
    """The trackers of report_to, each started (or, resuming from `resume_step`, continued); one line if one cannot
    start, the others closed."""
    ids = read_ids(run_dir) if resume_step is not None else {}
    out = []
    for name in trackers(cfg):
        try:
            out.append(OPEN[name](cfg, run_dir, ids.get(name), config, resume_step))
        except Exception as e:  # noqa: BLE001 (each tracker raises its own kinds; the user gets one line)
            close_all(out)
            raise RunError(f"report_to: {name} could not start: {first_line(e)}") from None
    ids = {name: t.id for name, t in zip(trackers(cfg), out, strict=True) if t.id}
    if ids:
        (run_dir / IDS).write_text(json.dumps(ids))
    return out


def log_all(trackers: list, step: int, values: dict[str, float]) -> None:
    """`values` to every tracker; one that fails is dropped with a warning (the run and metrics.jsonl go on)."""
    for t in list(trackers):
        try:
            t.log(step, values)
        except Exception as e:  # noqa: BLE001
            trackers.remove(t)
            console.print(f"[yellow]report_to: {type(t).__name__} failed at step {step} ({first_line(e)}); no longer "
                          f"reporting to it (metrics.jsonl has every step)")


def close_all(trackers: list) -> None:
    for t in trackers:
        try:
            t.close()
        except Exception as e:  # noqa: BLE001
            console.print(f"[yellow]report_to: {type(t).__name__} did not close cleanly ({first_line(e)})")


def read_ids(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / IDS).read_text())
    except (OSError, ValueError):
        return {}


def first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def scalars(values: dict) -> dict[str, float]:
    """The numbers of a metrics row (not the alarms' reasons, not the step)."""
    return {k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


class TensorBoard:
    def __init__(self, cfg, run_dir: Path, run_id, config: dict, resume_step: int | None):
        from torch.utils.tensorboard import SummaryWriter

        purge = resume_step + 1 if resume_step is not None else None  # the discarded stretch's events go
        self.id, self.writer = None, SummaryWriter(str(run_dir / "tensorboard"), purge_step=purge)

    def log(self, step: int, values: dict[str, float]) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        self.writer.close()


class WandB:
    def __init__(self, cfg, run_dir: Path, run_id, config: dict, resume_step: int | None):
        import wandb

        self.run = wandb.init(project=cfg.report_project, name=run_dir.name, dir=str(run_dir), config=config,
                              id=run_id, resume="allow" if run_id else None)
        self.id = self.run.id

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


class MLflow:
    def __init__(self, cfg, run_dir: Path, run_id, config: dict, resume_step: int | None):
        import mlflow
        from mlflow.entities import Param

        uri = os.environ.get("MLFLOW_TRACKING_URI") or (run_dir / "mlruns").resolve().as_uri()
        if uri.startswith("file:"):  # MLflow 3 keeps its file store in maintenance mode, behind this switch
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = mlflow.tracking.MlflowClient(tracking_uri=uri)
        if run_id is None:
            experiment = self.client.get_experiment_by_name(cfg.report_project)
            eid = experiment.experiment_id if experiment else self.client.create_experiment(cfg.report_project)
            run_id = self.client.create_run(eid, run_name=run_dir.name).info.run_id
            params = [Param(k, str(v)[:500]) for k, v in flat(config).items()]
            for i in range(0, len(params), 100):  # MLflow takes 100 parameters a request
                self.client.log_batch(run_id, params=params[i:i + 100])
        self.id = run_id

    def log(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.id, metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def close(self) -> None:
        self.client.set_terminated(self.id)


class Trackio:
    def __init__(self, cfg, run_dir: Path, run_id, config: dict, resume_step: int | None):
        import trackio

        self.trackio = trackio
        self.id = run_id or f"{run_dir.name}-{time.strftime('%Y%m%d-%H%M%S')}"  # unique: runs/sft is not the only sft
        trackio.init(project=cfg.report_project, name=self.id, config=config, resume="allow" if run_id else "never")

    def log(self, step: int, values: dict[str, float]) -> None:
        self.trackio.log(values, step=step)

    def close(self) -> None:
        self.trackio.finish()


def flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


OPEN = {"tensorboard": TensorBoard, "wandb": WandB, "mlflow": MLflow, "trackio": Trackio}
