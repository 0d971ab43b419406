"""A run's output directory: what llmft may write there, what it may delete, and who owns it.

    new        the folder is missing or empty → created, locked, marked
    resume     the folder holds this run (same config, same data) with a checkpoint → continue after it
    overwrite  `overwrite: true` and the folder holds an llmft run → the run's own entries are deleted, nothing else
    restart    the folder holds an llmft run that never saved anything (no checkpoint, not finished) → start over

An llmft run is recognised by what only llmft writes: the marker `.llmft-run` (written first, when a run starts), the
manifest `llmft.json` of a finished run, or (runs of earlier versions) a run config with `checkpoint-N/state.json`
beside it. A folder holding anything else (a `config.yaml` of another tool, say) is never an llmft run, and
`overwrite: true` refuses to touch it. Even in a run folder, overwrite deletes only the entries a run writes
(RUN_ENTRIES, checkpoint-N/, .tmp-*, and the final files the marker or manifest lists), the marker last; whatever
else someone put there stays. The working directory, its parents, `/` and the home directory are never output
dirs, nor is a folder that holds the run's own model or data.

While a run is in progress it holds an exclusive lock on `.llmft-lock` in its folder (released when the process
ends, killed or not), so a second run into the same folder is refused instead of interleaving with it.
"""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path
from typing import Any

import yaml

from llmft import __version__, manifest
from llmft.checkpoint import (
    CHECKPOINT_RE,
    TMP_PREFIX,
    atomic_write_text,
    latest_checkpoint,
    list_checkpoints,
    remove_stale_tmp,
)
from llmft.config import RESUME_NEUTRAL_KEYS
from llmft.data.records import as_list
from llmft.errors import RunError
from llmft.manifest import MANIFEST
from llmft.schema import differing_keys, to_dict, to_yaml

try:
    import fcntl
except ImportError:  # not POSIX: no lock
    fcntl = None

MARKER = ".llmft-run"  # {"llmft": version, "stage": ..., "data": [{role, path, sha256}], "files": [final files]}
LOCK = ".llmft-lock"
# what a run writes besides its final files (listed in the marker and manifest) and its checkpoint-N/ folders
RUN_ENTRIES = ("config.yaml", "metrics.jsonl", "samples.jsonl", "eval_samples.jsonl", MANIFEST, "tensorboard", "engine",
               "best", "wandb", "mlruns", "report_ids.json")  # report_to's: run.report
# the final files of runs written before the marker listed them
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
    refuse_own_inputs(cfg, run_dir)
    if run_dir.is_file():
        raise RunError(f"output_dir {run_dir} is a file")
    explicit = isinstance(cfg.resume, str) and cfg.resume != "auto"
    if not contents(run_dir):
        if explicit:
            raise RunError(f"resume: {cfg.resume} continues the run in output_dir, but {run_dir} is empty; "
                           f"set output_dir to the directory that holds that checkpoint")
        return "new"
    if not is_run(run_dir):
        foreign = contents(run_dir)[:3]
        raise RunError(f"output_dir {run_dir} holds files that llmft did not write ({', '.join(foreign)}"
                       f"{', ...' if len(foreign) == 3 else ''}); it is not an llmft run, and llmft never deletes "
                       f"them: choose another output_dir")
    check_unlocked(run_dir)
    if cfg.overwrite:
        return "overwrite"
    if not ((run_dir / MANIFEST).is_file() or latest_checkpoint(run_dir)):
        if explicit:
            raise RunError(f"resume: {cfg.resume} names a checkpoint, but {run_dir} holds none")
        return "restart"  # e.g. a run refused or killed before its first checkpoint: nothing to keep
    if cfg.resume:
        check_same_run(cfg, run_dir)
        return "resume"
    raise RunError(f"output_dir {run_dir} already holds a run; set resume: auto to continue it or "
                   f"overwrite: true to replace it (e.g. --set overwrite=true)")


def contents(run_dir: Path) -> list[str]:
    """What a folder holds, its lock file aside (a run that died right after locking left only that)."""
    return sorted(p.name for p in run_dir.iterdir() if p.name != LOCK) if run_dir.is_dir() else []


def refuse_dangerous(run_dir: Path) -> None:
    """The root, the home directory, the working directory and its parents are never a run's folder."""
    here, target = Path.cwd().resolve(), run_dir.resolve()
    home = Path.home().resolve()
    if target == Path(target.anchor) or target == home or target == here or target in here.parents:
        what = ("the filesystem root" if target == Path(target.anchor) else "the home directory" if target == home
                else "the working directory" if target == here else "a parent of the working directory")
        raise RunError(f"output_dir {run_dir} is {what}; a run writes (and overwrite deletes) its own files in "
                       f"output_dir, so give it a folder of its own (e.g. runs/sft)")


def refuse_own_inputs(cfg: Any, run_dir: Path) -> None:
    """A run never writes into (nor overwrite deletes) the folder its own model, reward model or data live in."""
    target = run_dir.resolve()
    data = getattr(cfg, "data", None)
    named = [("model.name", cfg.model.name), ("reward.model", getattr(getattr(cfg, "reward", None), "model", None)),
             *((f"data.{role}", p) for role in ("train", "eval") for p in as_list(getattr(data, role, None)))]
    for key, value in named:
        path = Path(value).expanduser().resolve() if value else None
        if path is not None and path.exists() and (path == target or target in path.parents):
            raise RunError(f"output_dir {run_dir} holds this run's own input ({key}: {value}); give the run an "
                           f"output_dir of its own")


def is_run(run_dir: Path) -> bool:
    """True when `run_dir` holds what only llmft writes."""
    if (run_dir / MARKER).is_file() or manifest.read(run_dir) is not None:
        return True
    try:  # a run of an earlier version, in progress: its config beside its checkpoints
        saved = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError):
        return False
    return isinstance(saved, dict) and {"output_dir", "train"} <= set(saved) and any(
        (p / "state.json").is_file() for p in list_checkpoints(run_dir))


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
    if not (cfg.resume and not cfg.overwrite and manifest.read(run_dir) is not None):
        return False
    check_same_run(cfg, run_dir)
    return True


# ------------------------------------------------------------------------------------------------ lock
def lock(run_dir: Path) -> None:
    """Hold `run_dir`'s lock until this process ends; refuse when another run holds it."""
    if run_dir in _held or fcntl is None:
        return
    try:
        f = open(run_dir / LOCK, "a+")  # noqa: SIM115 - held open for the life of the run
    except OSError as e:
        raise RunError(f"cannot write in output_dir {run_dir}: {e.strerror}") from None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        f.close()
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise RunError(in_use(run_dir)) from None
        raise RunError(f"cannot lock output_dir {run_dir} ({e.strerror}); its file system may not support "
                       f"locks: use a local folder") from None
    f.seek(0)
    f.truncate()
    f.write(json.dumps({"pid": __import__("os").getpid()}))
    f.flush()
    _held[run_dir] = f


def unlock(run_dir: Path) -> None:
    f = _held.pop(run_dir, None)
    if f is not None:
        f.close()


def check_unlocked(run_dir: Path) -> None:
    """Refuse early, before anything is loaded, when another process holds `run_dir`'s lock."""
    path = run_dir / LOCK
    if run_dir in _held or fcntl is None or not path.is_file():
        return
    try:
        with open(path) as f:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
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
    run_dir = run_dir_of(cfg)
    check_output_dir(cfg)  # refuse before creating or locking anything
    run_dir.mkdir(parents=True, exist_ok=True)
    lock(run_dir)
    mode = check_output_dir(cfg)  # again, now that no other run can change the folder
    if mode == "resume":
        check_same_data(cfg, run_dir, data)
        remove_stale_tmp(run_dir)
        return resume_point(cfg, run_dir)
    if mode in ("overwrite", "restart"):
        kept = delete_run(run_dir)
        if kept:
            from llmft.console import console

            console.print(f"kept {len(kept)} entries of {run_dir} that llmft did not write: {', '.join(kept[:5])}")
    atomic_write_text(run_dir / MARKER, json.dumps({"llmft": __version__, "stage": stage, "data": data}, indent=1))
    atomic_write_text(run_dir / "config.yaml", to_yaml(cfg))
    return None


def record_final_files(run_dir: Path, names: list[str]) -> None:
    """Add the final output's file names to the marker before they are moved into the folder, so that overwrite can
    delete them even when a kill came before the manifest."""
    marker = read_marker(run_dir) or {}
    atomic_write_text(run_dir / MARKER, json.dumps({**marker, "files": sorted(names)}, indent=1))


def read_marker(run_dir: Path) -> dict | None:
    try:
        marker = json.loads((run_dir / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def final_files(run_dir: Path) -> list[str]:
    """The final files a run wrote: listed by its manifest or marker; a marker-less run of an earlier version: the
    names such runs wrote."""
    for record in (manifest.read(run_dir), read_marker(run_dir)):
        if record and isinstance(record.get("files"), list):
            return [f for f in record["files"] if isinstance(f, str) and "/" not in f and f not in ("", ".", "..")]
    return [] if (run_dir / MARKER).is_file() else list(LEGACY_FINAL)


def delete_run(run_dir: Path) -> list[str]:
    """Delete the entries an llmft run wrote in `run_dir` (never anything else), the marker last, so that an
    interrupted delete still leaves a folder llmft recognises; return the names kept."""
    doomed = set(RUN_ENTRIES) | set(final_files(run_dir))
    for p in run_dir.iterdir():
        checkpoint = CHECKPOINT_RE.match(p.name.removesuffix(".damaged")) and p.is_dir()
        if p.name == "best" and not (p / MANIFEST).is_file():  # not an RL run's best policy: the user's own
            continue
        if p.name in doomed or p.name.startswith(TMP_PREFIX) or checkpoint:
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    (run_dir / MARKER).unlink(missing_ok=True)
    return contents(run_dir)


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
    before = (read_marker(run_dir) or {}).get("data")
    if not isinstance(before, list) or getattr(cfg, "allow_data_change", False):
        return
    old = {(d.get("role"), d.get("path")): d.get("sha256") for d in before if isinstance(d, dict)}
    changed = [d["path"] for d in data if old.get((d["role"], d["path"]), d["sha256"]) != d["sha256"]]
    if changed:
        raise RunError(f"resume: {', '.join(changed)} changed since the run in {run_dir} started (its sha256 "
                       f"differs); resuming would train on two datasets. Restore the file, set overwrite: true to "
                       f"start again, or set allow_data_change: true to resume anyway")
