"""The manifest, `llmft.json`: the record of a finished stage. It is written last, so a folder that has it is
complete, and every later command reads it to find the model, data and settings a run was made from (a later
stage loads the base it names, `llmft export` merges the chain it describes, a rerun knows the run is done).

One writer (`write`, what `describe` returns) and one reader (`read`; `read_stage` where a folder must be a stage
output to load).
"""

from __future__ import annotations

import json
import platform
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from llmft import __version__
from llmft.checkpoint import atomic_write_text, content_hash
from llmft.errors import ModelError
from llmft.schema import to_dict

MANIFEST = "llmft.json"


def describe(stage: str, cfg: Any, source, metrics: dict, data: list[dict]) -> dict[str, Any]:
    """What a finished run records: where its model and data came from, its config and final metrics, the versions
    it ran with. `source`: the run's `sources.ModelSource`."""
    parent = None
    if source.kind == "stage":
        parent = {"path": source.path, "stage": source.manifest.get("stage"),
                  "sha256": content_hash(Path(source.path))}
    return {
        "stage": stage,
        "created": now(),
        "model": {"source": cfg.model.name, "kind": source.kind, "resolved": source.resolved,
                  "root": source.root.name, "kernels": cfg.model.kernels},
        "parent": parent,
        "data": data,
        "config": to_dict(cfg),
        "metrics": metrics,
        "versions": versions(),
    }


def write(run_dir: Path, record: dict[str, Any]) -> None:
    """`record` as the run's manifest, with the hash of the weights now in `run_dir`; atomically, after every other
    final file."""
    record["adapter_sha256"] = content_hash(run_dir)
    atomic_write_text(run_dir / MANIFEST, json.dumps(record, indent=2, default=str))


def read(folder: Path) -> dict | None:
    """The manifest of a finished llmft run in `folder`, or None (missing, unreadable, or not llmft's)."""
    try:
        record = parse(folder)
    except (OSError, ValueError):
        return None
    ok = isinstance(record, dict) and "stage" in record and "llmft" in (record.get("versions") or {})
    return record if ok else None


def read_stage(folder: Path) -> dict:
    """The manifest of a stage output that is to be loaded as a model: it must name its stage and the model it was
    trained on; anything else is one error naming the file."""
    path = Path(folder) / MANIFEST
    try:
        record = parse(folder)
        resolved = record["model"]["resolved"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelError(f"{path} is damaged ({type(e).__name__}: {str(e)[:80]}): {folder} cannot be used as a "
                         f"model; rerun the stage that wrote it (overwrite: true)") from None
    if not isinstance(resolved, str) or not isinstance(record.get("stage"), str):
        raise ModelError(f"{path} is damaged (no stage or base model): {folder} cannot be used as a model")
    return record


def parse(folder: Path):
    return json.loads((Path(folder) / MANIFEST).read_text(encoding="utf-8"))


def versions() -> dict[str, str]:
    import peft
    import torch
    import transformers

    return {"llmft": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__}


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
