"""report_to: every number of metrics.jsonl, under its name and step, in TensorBoard, W&B (offline), MLflow (a local
file store) and trackio, read back from what each library wrote; a missing package is one line naming the extra."""

from __future__ import annotations

import glob
import json
import os
import struct
import subprocess
import sys

import pytest

from llmft.config import load_config
from llmft.errors import ConfigError
from llmft.stages import sft


def numbers(metrics_path) -> dict[tuple[str, int], float]:
    out = {}
    for row in map(json.loads, open(metrics_path)):
        for k, v in row.items():
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                out[(k, row["step"])] = float(v)
    return out


def test_every_tracker_holds_what_metrics_jsonl_holds(write_config, tiny_model_dir, sft_data, tmp_path):
    cfg = write_config(tiny_model_dir, sft_data, data__eval=str(sft_data), train__eval_every=2, train__max_steps=4,
                       report_to=["tensorboard", "wandb", "mlflow", "trackio"], report_project="llmft-test")
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONFIG_DIR": str(tmp_path / "wbc"),
           "WANDB_CACHE_DIR": str(tmp_path / "wbc"), "TRACKIO_DIR": str(tmp_path / "trackio"),
           "MLFLOW_TRACKING_URI": ""}
    env.pop("MLFLOW_TRACKING_URI")
    done = subprocess.run([sys.executable, "-m", "llmft", "sft", str(cfg)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    run = tmp_path / "run"
    expected = numbers(run / "metrics.jsonl")
    assert ("eval/loss", 4) in expected and ("loss", 1) in expected
    for name, got in (("tensorboard", tensorboard_scalars(run)), ("wandb", wandb_history(run)),
                      ("mlflow", mlflow_metrics(run)), ("trackio", trackio_logs(tmp_path / "trackio", run))):
        assert got.keys() >= expected.keys(), (name, sorted(expected.keys() - got.keys())[:5])
        for key, value in expected.items():
            assert got[key] == pytest.approx(value, rel=1e-6), (name, key)


def tensorboard_scalars(run) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    return {(tag, e.step): e.value for tag in acc.Tags()["scalars"] for e in acc.Scalars(tag)}


def wandb_history(run) -> dict:
    """The history records of the offline run's transaction log (W&B's LevelDB-style log of protobuf records)."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = glob.glob(str(run / "wandb" / "offline-run-*" / "run-*.wandb"))
    out = {}
    for raw in leveldb_records(open(path, "rb").read()):
        record = pb.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
            out.update({(k, items["_step"]): float(v) for k, v in items.items() if not k.startswith("_")})
    return out


def leveldb_records(data: bytes, block: int = 32768):
    """The records of a W&B transaction log: a 7-byte header (":W&B", magic, version), then 32 KiB blocks of chunks,
    each (crc32, length, type: 1 full, 2 first, 3 middle, 4 last) and its bytes."""
    assert data[:4] == b":W&B"
    pos, parts = 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 1:
            yield chunk
        elif kind == 2:
            parts = chunk
        elif kind == 3:
            parts += chunk
        elif kind == 4:
            yield parts + chunk


def mlflow_metrics(run) -> dict:
    from mlflow.tracking import MlflowClient

    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # as the run set it for itself
    client = MlflowClient(tracking_uri=(run / "mlruns").resolve().as_uri())
    (found,) = client.search_runs([client.get_experiment_by_name("llmft-test").experiment_id])
    assert found.info.run_name == "run" and found.data.params["train.max_steps"] == "4"
    return {(k, m.step): m.value for k in found.data.metrics for m in client.get_metric_history(found.info.run_id, k)}


def trackio_logs(directory, run) -> dict:
    name = json.loads((run / "report_ids.json").read_text())["trackio"]
    assert name.startswith("run-")  # the output_dir's name and the time it started
    code = ("import json, sys; from trackio.sqlite_storage import SQLiteStorage; "
            f"print(json.dumps(SQLiteStorage.get_logs('llmft-test', {name!r})))")  # TRACKIO_DIR is read at import
    done = subprocess.run([sys.executable, "-c", code], env={**os.environ, "TRACKIO_DIR": str(directory)},
                          capture_output=True, text=True, timeout=120, check=True)
    rows = json.loads(done.stdout.strip().splitlines()[-1])
    return {(k, row["step"]): float(v) for row in rows for k, v in row.items()
            if k not in ("step", "timestamp") and isinstance(v, (int, float))}


def test_a_missing_tracker_is_one_line_naming_its_extra(write_config, tiny_model_dir, sft_data, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    cfg = load_config("sft", write_config(tiny_model_dir, sft_data, report_to=["wandb"]))
    with pytest.raises(ConfigError, match=r"^report_to: wandb needs the wandb package, which is not installed: "
                                          r"pip install 'llmft\[wandb\]'$"):
        sft.run(cfg)


def test_an_unknown_tracker_is_refused_by_the_schema(write_config, tiny_model_dir, sft_data):
    with pytest.raises(ConfigError, match="report_to"):
        load_config("sft", write_config(tiny_model_dir, sft_data, report_to=["neptune"]))
