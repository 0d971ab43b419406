"""`llmft export RUN_DIR --out DIR`: a run's whole adapter chain merged into one model that needs neither llmft nor
peft.

    policy run (sft, dpo, ppo, grpo)  → AutoModelForCausalLM directory: safetensors in the chosen dtype, the tokenizer
                                         with its chat template, generation_config.json whose EOS ids are the stop set
                                         the stages use; or, with --format gguf, one GGUF file (`llmft.export.gguf`)
    reward run                        → AutoModelForSequenceClassification directory (num_labels 1): the body and the
                                         reward head as `score`, scoring where `RewardScorer` does

The chain (base → sft → dpo ...) is merged the way every stage loads its input (`loading.load_model`: each adapter in
fp32 into the model below it); the result is cast once, at the end. `llmft-export.json` in the output records the
lineage: each run's llmft.json, from the exported run back to the base model.

The output appears whole or not at all (written beside it, then renamed); an existing folder is replaced only with
--overwrite and only when it is an earlier export (it holds llmft-export.json).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from llmft.checkpoint import fsync_dir
from llmft.config import ModelConfig
from llmft.data.chat import Chat
from llmft.errors import ConfigError, ModelError, RunError
from llmft.manifest import MANIFEST
from llmft.models.loading import load_chat, load_model
from llmft.models.sources import ModelSource, resolve_source

RECORD = "llmft-export.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def run_export(run_dir: str, out: str, fmt: str = "hf", dtype: str = "auto", quant: str | None = None,
               overwrite: bool = False) -> Path:
    """The `llmft export` command; returns the folder written."""
    if fmt == "hf" and quant:
        raise ConfigError("--quant applies to --format gguf; a transformers export takes --dtype")
    if fmt == "gguf" and dtype != "auto":
        raise ConfigError("--dtype applies to --format hf; a GGUF export takes --quant f16 or q8_0")
    quant = quant or "f16"
    source = stage_source(run_dir)
    target = Path(out).expanduser().resolve()
    check_target(target, source, overwrite)
    reward = source.manifest.get("stage") == "reward"
    check_format(fmt, reward, run_dir, source, quant)
    chat = load_chat(source)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        if reward:
            extra = write_reward(source, chat, tmp, export_dtype(dtype, source))
        elif fmt == "gguf":
            from llmft.export.gguf import write_gguf

            model = load_model(source, torch.float32, torch.device("cpu"), model_config(source))
            extra = write_gguf(model, chat, tmp / "model.gguf", quant)
        else:
            extra = write_policy(source, chat, tmp, export_dtype(dtype, source))
        record = {"exported_from": str(Path(source.path)), "format": fmt, **extra, "stop_ids": chat.stop_ids,
                  "lineage": lineage(source)}
        (tmp / RECORD).write_text(json.dumps(record, indent=2, default=str))
        replace_dir(tmp, target, source, overwrite)
    except OSError as e:
        raise RunError(f"export to {target} failed ({e.strerror or e}); nothing was written there") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def check_format(fmt: str, reward: bool, run_dir: str, source: ModelSource, quant: str) -> None:
    """What can be refused before minutes of merging: the format, and for GGUF the package and the architecture."""
    if fmt not in ("hf", "gguf"):
        raise ConfigError(f"--format {fmt}: choose hf (a transformers model directory) or gguf")
    if fmt == "hf":
        return
    if reward:
        raise ConfigError(f"{run_dir} is a reward model: it exports as a transformers sequence-classification "
                          f"model (--format hf); GGUF holds causal LMs")
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise ConfigError("--format gguf needs the gguf package: pip install gguf") from None
    from transformers import AutoConfig

    from llmft.export.gguf import check_exportable

    check_exportable(AutoConfig.from_pretrained(source.root.path), quant)


# ------------------------------------------------------------------------------------------ checks
def stage_source(run_dir: str) -> ModelSource:
    path = Path(run_dir).expanduser()
    if path.is_dir() and not (path / MANIFEST).is_file() and not (path / "config.json").is_file():
        raise ModelError(f"{run_dir} is not a finished llmft run (no {MANIFEST}): export reads a stage's output_dir "
                         f"once its run has ended")
    source = resolve_source(run_dir)
    if source.kind != "stage":
        raise ModelError(f"{run_dir} is a {source.kind} model, not an llmft run: there is no adapter to merge")
    return source


def check_target(target: Path, source: ModelSource, overwrite: bool) -> None:
    """Refuse to write into the run itself, or over a folder that is not an earlier export."""
    run = Path(source.path).resolve()
    if target == run or run in target.parents or target in run.parents:
        raise RunError(f"--out {target} overlaps the run {run}: export into a folder of its own")
    if not target.exists() or (target.is_dir() and not any(target.iterdir())):
        return
    if not (target / RECORD).is_file():
        raise RunError(f"--out {target} exists and is not an llmft export: choose a new folder (nothing there is "
                       f"deleted)")
    if not overwrite:
        raise RunError(f"--out {target} holds an earlier export: pass --overwrite to replace it")


def export_dtype(name: str, source: ModelSource) -> torch.dtype:
    """--dtype, or with auto the base model's own dtype (config.json), float32 when it names none."""
    if name == "auto":
        from transformers import AutoConfig

        stored = getattr(AutoConfig.from_pretrained(source.root.path), "dtype", None)
        name = str(stored).removeprefix("torch.") if stored else "float32"
        name = name if name in DTYPES else "float32"
    if name not in DTYPES:
        raise ConfigError(f"--dtype {name}: choose auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def model_config(source: ModelSource) -> ModelConfig:
    """The run's own model settings (trust_remote_code), not its attention kernel (the export may run where that one
    is missing), its Hub kernels (an export only reads and writes weights), its allow_pickle (that is the user's
    call) nor its quantisation (a QLoRA run is merged into its base de-quantised: `loading.merged_adapter`)."""
    return ModelConfig(**{**source.manifest["config"]["model"], "allow_pickle": False, "attn_implementation": None,
                          "quantization": None, "kernels": False})


def lineage(source: ModelSource) -> list[dict]:
    """Each run's llmft.json, from `source` back to the first stage; the base model last."""
    chain = []
    while source.kind == "stage":
        chain.append({"run": source.path, **source.manifest})
        source = source.base
    return [*chain, {"base_model": source.name, "kind": source.kind}]


# ------------------------------------------------------------------------------------------ writers
def write_policy(source: ModelSource, chat: Chat, folder: Path, dtype: torch.dtype) -> dict:
    model = load_model(source, torch.float32, torch.device("cpu"), model_config(source)).to(dtype)
    model.generation_config = generation_config(chat)
    model.save_pretrained(folder, safe_serialization=True)
    chat.tokenizer.save_pretrained(folder)
    return {"class": "AutoModelForCausalLM", "dtype": str(dtype).removeprefix("torch.")}


def generation_config(chat: Chat):
    from transformers import GenerationConfig

    return GenerationConfig(**chat.generation_ids())


def write_reward(source: ModelSource, chat: Chat, folder: Path, dtype: torch.dtype) -> dict:
    """The reward model as AutoModelForSequenceClassification. transformers reads the score at the last token that is
    not `pad_token_id`; where the tokenizer pads with the turn terminator (the token every answer ends with), a
    spare special token becomes the pad, or the score would be read one token early."""
    from transformers import AutoModelForSequenceClassification

    from llmft.models.reward_model import load_reward_model

    rm = load_reward_model(source, torch.float32, torch.device("cpu"), model_config(source))
    lm, pad = rm.lm, spare_pad(chat)
    config = lm.config
    config.num_labels, config.pad_token_id = 1, pad
    config.architectures = [type(lm).__name__.replace("ForCausalLM", "ForSequenceClassification")]
    try:
        classifier = AutoModelForSequenceClassification.from_config(config, dtype=torch.float32)
    except ValueError as e:
        raise ModelError(f"{config.model_type} has no sequence-classification class in transformers: {e}") from None
    body = lm.base_model_prefix
    state = {k: v for k, v in lm.state_dict().items() if k.startswith(f"{body}.")}
    missing, unexpected = classifier.load_state_dict(state, strict=False)
    if unexpected or set(missing) - {"score.weight", "score.bias"}:
        raise ModelError(f"cannot map the reward model onto {type(classifier).__name__}: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}")
    classifier.score.weight.data.copy_(rm.head.weight.data)
    bias = float(rm.head.bias)
    if getattr(classifier.score, "bias", None) is not None:
        classifier.score.bias.data.copy_(rm.head.bias.data)
        bias = 0.0
    classifier.to(dtype).save_pretrained(folder, safe_serialization=True)
    tok = chat.tokenizer
    tok.pad_token = tok.convert_ids_to_tokens(pad)
    tok.save_pretrained(folder)
    return {"class": "AutoModelForSequenceClassification", "dtype": str(dtype).removeprefix("torch."),
            "pad_token_id": pad, "score_offset": bias}


def spare_pad(chat: Chat) -> int:
    """A pad id that no scored sequence ends with: the tokenizer's own unless it is a stop id, else a special token
    that is not one."""
    tok = chat.tokenizer
    if tok.pad_token_id is not None and tok.pad_token_id not in chat.stop_ids:
        return tok.pad_token_id
    specials = [tok.convert_tokens_to_ids(t) for t in [tok.unk_token, *tok.all_special_tokens] if t]
    specials += sorted(i for i, t in tok.added_tokens_decoder.items() if t.special)
    for i in specials:
        if i is not None and i not in chat.stop_ids:
            return i
    raise ModelError("the tokenizer pads with a stop token and has no other special token to pad with: a "
                     "sequence-classification export would read scores one token early")


def replace_dir(tmp: Path, target: Path, source: ModelSource, overwrite: bool) -> None:
    """`tmp` becomes `target`; an earlier export there is moved aside first and deleted after. What is there is
    checked again now, just before the move, not only when the export started."""
    check_target(target, source, overwrite)
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.replace(target, old / "export")
    os.replace(tmp, target)
    fsync_dir(target.parent)
    if old:
        shutil.rmtree(old, ignore_errors=True)
