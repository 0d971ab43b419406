"""Checkpoints: atomic writes, resumable training state, the final stage output and its manifest.

A stage's output directory is a standard PEFT adapter (loadable with `PeftModel.from_pretrained` and
nothing from llmft), its tokenizer, the resolved `config.yaml`, `metrics.jsonl`, the manifest `llmft.json`
(`llmft.manifest`), and periodic `checkpoint-N/` folders. Every folder and file is written under a temporary name
and renamed into place, so a kill at any moment leaves either the old state or the new one, never half of one.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
TMP_PREFIX = ".tmp-"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
HEAD_FILE = "reward_head.safetensors"  # a reward model's scalar head, next to its adapter


@contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a temporary folder next to `target`; on success it is renamed to `target`, on failure removed."""
    tmp = target.with_name(f"{TMP_PREFIX}{target.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a full disk, a kill: nothing half-written stays behind
        raise
    for f in tmp.rglob("*"):
        if f.is_file():
            fsync_file(f)
    if target.exists():
        shutil.rmtree(target)
    os.rename(tmp, target)
    fsync_dir(target.parent)


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_failure(e: OSError, what: Path, last_good: Path | None) -> str:
    """One line for a write that failed (a full disk, a lost mount, permissions), naming what is still safe."""
    kept = f"the last good checkpoint is {last_good}" if last_good else "no checkpoint was written yet"
    if e.errno == errno.ENOSPC:
        return f"no space left on the device while writing {what}; {kept} (free space and rerun with resume: auto)"
    return f"cannot write {what}: {e.strerror or e}; {kept}"


def fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_stale_tmp(run_dir: Path) -> None:
    """Drop what a killed run left half-written."""
    for p in run_dir.glob(f"{TMP_PREFIX}*"):
        shutil.rmtree(p) if p.is_dir() else p.unlink()


# ------------------------------------------------------------------------------ resumable checkpoints
def list_checkpoints(run_dir: Path) -> list[Path]:
    found = [(int(m.group(1)), p) for p in run_dir.glob("checkpoint-*") if (m := CHECKPOINT_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def save_checkpoint(run_dir: Path, step: int, model, optimizer, scheduler, state: dict, keep: int) -> Path:
    """Write checkpoint-`step`/: adapter weights, optimizer, scheduler, RNG and loop state."""
    target = run_dir / f"checkpoint-{step}"
    with atomic_dir(target) as tmp:
        save_adapter(model, tmp)
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(rng_state(), tmp / "rng.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step, **state}, indent=1))
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old)
    return target


def save_adapter(model, directory: Path, **kwargs) -> None:
    """The adapter(s) of a PEFT model, or of a model holding one (`save_pretrained` of the reward model, the actor-
    critic). Never whole embedding matrices: rows a chat template added are in the trainable-token weights, and the
    next stage grows its base to `embedding_rows` before loading them (peft would save every row otherwise)."""
    if hasattr(model, "peft_config"):
        model.save_pretrained(directory, save_embedding_layers=False, **kwargs)
    else:
        model.save_pretrained(directory)


def load_checkpoint(path: Path, model, optimizer, scheduler) -> dict:
    """Restore what `save_checkpoint` wrote into live objects; return the loop state."""
    if hasattr(model, "load_trained"):  # a model with more than an adapter (e.g. a reward head)
        model.load_trained(path)
    else:
        load_adapter(path, model)
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    set_rng_state(torch.load(path / "rng.pt", weights_only=True))
    return json.loads((path / "state.json").read_text())


def load_adapter(path: Path, model, adapter_name: str = "default") -> None:
    """Put the adapter weights saved in `path` into the adapter `adapter_name` of a live PEFT model."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = load_file(Path(path) / "adapter_model.safetensors", device=str(next(model.parameters()).device))
    set_peft_model_state_dict(model, weights, adapter_name=adapter_name)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------- final output
def save_final(run_dir: Path, model, tokenizer, generation_config: dict,
               before_move: Callable[[list[str]], None] | None = None) -> list[str]:
    """Write the adapter, tokenizer and generation_config.json into `run_dir` (each file renamed into place) and
    return their names; `before_move(names)` learns them first. The manifest (`llmft.manifest.write`) comes after."""
    tmp = run_dir / f"{TMP_PREFIX}final"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_adapter(model, tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "generation_config.json").write_text(json.dumps(generation_config, indent=1))
    names = sorted(f.name for f in tmp.iterdir())  # what overwrite may delete again
    if before_move:
        before_move(names)
    for f in tmp.iterdir():  # files, and folders such as PPO's value/
        for g in [f] if f.is_file() else [g for g in f.rglob("*") if g.is_file()]:
            fsync_file(g)
        if f.is_dir() and (run_dir / f.name).exists():
            shutil.rmtree(run_dir / f.name)
        os.replace(f, run_dir / f.name)
    tmp.rmdir()
    return names


def content_hash(folder: Path) -> str:
    """sha256 over the weight files of a stage output or checkpoint (names and bytes)."""
    h = hashlib.sha256()
    for name in ADAPTER_FILES + ((HEAD_FILE,) if (Path(folder) / HEAD_FILE).is_file() else ()):
        h.update(name.encode())
        with open(Path(folder) / name, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
    return h.hexdigest()
