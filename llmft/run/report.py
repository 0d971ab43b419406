"""report_to: the run's metrics, under metrics.jsonl's names and steps, in the trackers a user already reads.

    tensorboard   output_dir/tensorboard/                                   (pip install 'llmft[tensorboard]')
    wandb         output_dir/wandb/; online or offline as WANDB_MODE says   (pip install 'llmft[wandb]')
    mlflow        MLFLOW_TRACKING_URI, else a local file store output_dir/mlruns/ (pip install 'llmft[mlflow]')
    trackio       trackio's local database (TRACKIO_DIR; `trackio show`)     (pip install 'llmft[trackio]')

The project is report_project (W&B and trackio project, MLflow experiment), the run name the output_dir's name. A
resumed run goes on in the same W&B, MLflow and trackio run (its id is kept in output_dir/report_ids.json).
Rank 0 alone reports, as it alone writes metrics.jsonl.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

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


def open_trackers(cfg, run_dir: Path, resuming: bool, config: dict) -> list:
    ids = read_ids(run_dir) if resuming else {}
    out = []
    for name in trackers(cfg):
        try:
            out.append(OPEN[name](cfg, run_dir, ids.get(name), config))
        except Exception as e:  # noqa: BLE001 (each tracker raises its own kinds; the user gets one line)
            raise RunError(f"report_to: {name} could not start: {first_line(e)}") from None
    ids = {name: t.id for name, t in zip(trackers(cfg), out, strict=True) if t.id}
    if ids:
        (run_dir / IDS).write_text(json.dumps(ids))
    return out


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
    def __init__(self, cfg, run_dir: Path, run_id, config: dict):
        from torch.utils.tensorboard import SummaryWriter

        self.id, self.writer = None, SummaryWriter(str(run_dir / "tensorboard"))

    def log(self, step: int, values: dict[str, float]) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        self.writer.close()


class WandB:
    def __init__(self, cfg, run_dir: Path, run_id, config: dict):
        import wandb

        self.run = wandb.init(project=cfg.report_project, name=run_dir.name, dir=str(run_dir), config=config,
                              id=run_id, resume="allow" if run_id else None)
        self.id = self.run.id

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


class MLflow:
    def __init__(self, cfg, run_dir: Path, run_id, config: dict):
        if "MLFLOW_TRACKING_URI" not in os.environ:  # a local file store in the run's folder
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps it in maintenance mode
        import mlflow

        uri = os.environ.get("MLFLOW_TRACKING_URI") or (run_dir / "mlruns").resolve().as_uri()
        self.client = mlflow.tracking.MlflowClient(tracking_uri=uri)
        if run_id is None:
            experiment = self.client.get_experiment_by_name(cfg.report_project)
            eid = experiment.experiment_id if experiment else self.client.create_experiment(cfg.report_project)
            run_id = self.client.create_run(eid, run_name=run_dir.name).info.run_id
            for k, v in flat(config).items():
                self.client.log_param(run_id, k, str(v)[:500])
        self.id = run_id

    def log(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        self.client.log_batch(self.id, metrics=[Metric(k, v, 0, step) for k, v in values.items()])

    def close(self) -> None:
        self.client.set_terminated(self.id)


class Trackio:
    def __init__(self, cfg, run_dir: Path, run_id, config: dict):
        import trackio

        self.trackio, self.id = trackio, run_dir.name
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
