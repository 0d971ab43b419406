"""A run's output directory: what llmft may write there, what it may delete, and who owns it.

    new        the folder is missing or empty → created, locked, marked
    resume     the folder holds this run (same config, same data) with a checkpoint → continue after it
    overwrite  `overwrite: true` and the folder holds an llmft run → the run's own entries are deleted, nothing else
    restart    the folder holds an llmft run that never saved anything (no checkpoint, not finished) → start over

An llmft run is recognised by what only llmft writes: the marker `.llmft-run` (written first, when a run starts),
or the manifest `llmft.json` of a finished run. A folder holding anything else (a `config.yaml` of another tool,
say) is never an llmft run, and `overwrite: true` refuses to touch it. Even in a run folder, overwrite deletes only
the entries a run writes (RUN_ENTRIES, checkpoint-N/, .tmp-*, and the files listed in the manifest); whatever else
someone put there stays. The working directory, its parents, `/` and the home directory are never output dirs.

While a run is in progress it holds an exclusive lock on `.llmft-lock` in its folder (released when the process
ends, killed or not), so a second run into the same folder is refused instead of interleaving with it.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from pathlib import Path
from typing import Any

import yaml

from llmft import __version__
from llmft.checkpoint import CHECKPOINT_RE, TMP_PREFIX, atomic_write_text, latest_checkpoint, remove_stale_tmp
from llmft.config import RESUME_NEUTRAL_KEYS
from llmft.errors import RunError
from llmft.schema import differing_keys, to_dict, to_yaml

MARKER = ".llmft-run"  # {"llmft": version, "stage": ..., "created": ..., "data": [{path, sha256}]}
LOCK = ".llmft-lock"
MANIFEST = "llmft.json"
# what a run writes besides its final files (listed in the manifest) and its checkpoint-N/ folders
RUN_ENTRIES = (MARKER, LOCK, "config.yaml", "metrics.jsonl", "samples.jsonl", MANIFEST, "tensorboard")
# the final files of runs written before the manifest listed them
LEGACY_FINAL = ("adapter_config.json", "adapter_model.safetensors", "README.md", "reward_head.safetensors", "value",
                "value_head.safetensors", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                "chat_template.jinja", "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json")

_held: dict[Path, Any] = {}  # run dir → its open lock file, for the life of the process


def run_dir_of(cfg: Any) -> Path:
    return Path(cfg.output_dir).expanduser()


# ---------------------------------------------------------------------------------------------- checks
def check_output_dir(cfg: Any) -> str:
    """Decide what to do with `cfg.output_dir` without touching it: 'new', 'restart', 'overwrite' or 'resume'."""
    run_dir = run_dir_of(cfg)
    refuse_dangerous(run_dir)
    if run_dir.is_file():
        raise RunError(f"output_dir {run_dir} is a file")
    if not (run_dir.is_dir() and any(run_dir.iterdir())):
        if isinstance(cfg.resume, str) and cfg.resume != "auto":
            raise RunError(f"resume: {cfg.resume} continues the run in output_dir, but {run_dir} is empty; "
                           f"set output_dir to the directory that holds that checkpoint")
        return "new"
    if not is_run(run_dir):
        foreign = sorted(p.name for p in run_dir.iterdir())[:3]
        raise RunError(f"output_dir {run_dir} holds files that llmft did not write ({', '.join(foreign)}"
                       f"{', ...' if len(foreign) == 3 else ''}); it is not an llmft run, and llmft never deletes "
                       f"them: choose another output_dir")
    check_unlocked(run_dir)
    if cfg.overwrite:
        return "overwrite"
    saved_something = (run_dir / MANIFEST).is_file() or latest_checkpoint(run_dir) is not None
    if not saved_something:
        return "restart"  # e.g. a run refused or killed before its first checkpoint: nothing to keep
    if cfg.resume:
        check_same_run(cfg, run_dir)
        return "resume"
    raise RunError(f"output_dir {run_dir} already holds a run; set resume: auto to continue it or "
                   f"overwrite: true to replace it (e.g. --set overwrite=true)")


def refuse_dangerous(run_dir: Path) -> None:
    """The root, the home directory, the working directory and its parents are never a run's folder."""
    here, target = Path.cwd().resolve(), run_dir.resolve()
    home = Path.home().resolve()
    if target == Path(target.anchor) or target == home or target == here or target in here.parents:
        what = ("the filesystem root" if target == Path(target.anchor) else "the home directory" if target == home
                else "the working directory" if target == here else "a parent of the working directory")
        raise RunError(f"output_dir {run_dir} is {what}; a run writes (and overwrite deletes) its own files in "
                       f"output_dir, so give it a folder of its own (e.g. runs/sft)")


def is_run(run_dir: Path) -> bool:
    """True when `run_dir` holds what only llmft writes: the run marker, or the manifest of a finished run."""
    if (run_dir / MARKER).is_file():
        return True
    try:
        manifest = json.loads((run_dir / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and "stage" in manifest and "llmft" in (manifest.get("versions") or {})


def check_same_run(cfg: Any, run_dir: Path) -> None:
    """Refuse to resume a run whose saved config differs in a key that changes what is computed."""
    saved = run_dir / "config.yaml"
    try:
        before = yaml.safe_load(saved.read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError) as e:
        raise RunError(f"resume: cannot read the run's config {saved} ({type(e).__name__}); "
                       f"set overwrite: true to start the run again") from None
    if not isinstance(before, dict):
        raise RunError(f"resume: {saved} is empty or not a mapping; set overwrite: true to start the run again")
    changed = differing_keys(before, to_dict(cfg), RESUME_NEUTRAL_KEYS)
    if changed:
        raise RunError(f"resume: the config differs from the run in {run_dir} in {', '.join(changed)}; "
                       f"resume with the same config or set overwrite: true")


def finished_already(cfg: Any) -> bool:
    """True when `resume` is set and output_dir holds this very run, finished."""
    run_dir = run_dir_of(cfg)
    if not (cfg.resume and not cfg.overwrite and (run_dir / MANIFEST).is_file() and is_run(run_dir)):
        return False
    check_same_run(cfg, run_dir)
    return True


# ------------------------------------------------------------------------------------------------ lock
def lock(run_dir: Path) -> None:
    """Hold `run_dir`'s lock until this process ends; refuse when another run holds it."""
    if run_dir in _held:
        return
    f = open(run_dir / LOCK, "a+")  # noqa: SIM115 - held open for the life of the run
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise RunError(in_use(run_dir)) from None
    f.seek(0)
    f.truncate()
    f.write(json.dumps({"pid": os.getpid()}))
    f.flush()
    _held[run_dir] = f


def unlock(run_dir: Path) -> None:
    f = _held.pop(run_dir, None)
    if f is not None:
        f.close()


def check_unlocked(run_dir: Path) -> None:
    """Refuse early, before anything is loaded, when another process holds `run_dir`'s lock."""
    path = run_dir / LOCK
    if run_dir in _held or not path.is_file():
        return
    with open(path) as f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            raise RunError(in_use(run_dir)) from None


def in_use(run_dir: Path) -> str:
    try:
        pid = json.loads((run_dir / LOCK).read_text())["pid"]
    except (OSError, ValueError, KeyError, TypeError):
        pid = "?"
    return (f"output_dir {run_dir} is in use by another llmft run (process {pid}); wait for it to end, or give "
            f"this run another output_dir")


# ------------------------------------------------------------------------------------- prepare, delete
def prepare_output_dir(cfg: Any, stage: str, data: list[dict]) -> Path | None:
    """Create, replace or reopen `cfg.output_dir` and lock it; return the checkpoint to resume from, if any.
    `data`: the run's data files with their hashes (compared on resume)."""
    run_dir, mode = run_dir_of(cfg), check_output_dir(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    lock(run_dir)
    if mode == "resume":
        check_same_data(cfg, run_dir, data)
        remove_stale_tmp(run_dir)
        return resume_point(cfg, run_dir)
    if mode in ("overwrite", "restart"):
        delete_run(run_dir)
    marker = {"llmft": __version__, "stage": stage, "data": data}
    atomic_write_text(run_dir / MARKER, json.dumps(marker, indent=1))
    atomic_write_text(run_dir / "config.yaml", to_yaml(cfg))
    return None


def delete_run(run_dir: Path) -> list[str]:
    """Delete the entries an llmft run wrote in `run_dir` (never anything else); return the names kept."""
    manifest = read_manifest(run_dir)
    final = manifest.get("files", LEGACY_FINAL) if manifest else LEGACY_FINAL
    doomed = set(RUN_ENTRIES) - {LOCK} | set(final)
    for p in run_dir.iterdir():
        if p.name in doomed or p.name.startswith(TMP_PREFIX) or (CHECKPOINT_RE.match(p.name) and p.is_dir()):
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    return sorted(p.name for p in run_dir.iterdir() if p.name != LOCK)


def read_manifest(run_dir: Path) -> dict | None:
    try:
        manifest = json.loads((run_dir / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def resume_point(cfg: Any, run_dir: Path) -> Path | None:
    if isinstance(cfg.resume, str) and cfg.resume != "auto":
        path = Path(cfg.resume).expanduser()
        if not (path / "state.json").is_file():
            raise RunError(f"resume: {path} is not a checkpoint folder (no state.json)")
        return path
    return latest_checkpoint(run_dir)


def check_same_data(cfg: Any, run_dir: Path, data: list[dict]) -> None:
    """Refuse to resume on data files whose content changed since the run started (it would mix two datasets),
    unless `allow_data_change` is set."""
    try:
        before = json.loads((run_dir / MARKER).read_text(encoding="utf-8")).get("data")
    except (OSError, ValueError, AttributeError):
        before = None
    if before is None or getattr(cfg, "allow_data_change", False):
        return
    old = {(d["role"], d["path"]): d["sha256"] for d in before}
    changed = [d["path"] for d in data if old.get((d["role"], d["path"]), d["sha256"]) != d["sha256"]]
    if changed:
        raise RunError(f"resume: {', '.join(changed)} changed since the run in {run_dir} started (its sha256 "
                       f"differs); resuming would train on two datasets. Restore the file, set overwrite: true to "
                       f"start again, or set allow_data_change: true to resume anyway")
