"""Loading a model and its chat rules: the device and dtype, the tokenizer with its stop set, the weights (a
stage output's adapter merged into its base; QLoRA's quantised base; Hub kernels off), and the dry run's skeleton.
What a `model.name` refers to is `llmft.models.sources`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from llmft import distributed
from llmft.data.chat import Chat
from llmft.errors import ModelError
from llmft.models import hub_kernels, quantization
from llmft.models.adapters import add_lora, disable_dropout
from llmft.models.pairpack import check_packing
from llmft.models.sources import ModelSource, resolve_source

hub_kernels.guard_bitsandbytes()  # before peft imports it: without its Hub kernel fetch


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
    check_policy_source(source)
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
    generation_config.json, the template's turn terminator); with `chat_template`, that template
    (`llmft.data.templates`) and the special tokens it adds."""
    from llmft.data import templates
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
    """Load a causal LM; for a stage output, load its base and merge its adapter into it; with `cfg.quantization`,
    its linear layers quantised for QLoRA (`llmft.models.quantization`) as they move to `device`. Under FSDP it stays
    on the CPU: `distributed.shard_model` moves each rank's shard to the device."""
    check_policy_source(source)
    check_quantization(cfg)
    model = load_weights(source, dtype, cfg)
    if cfg.quantization:
        model = quantization.quantize(model, cfg.quantization, dtype)
    return model.to(torch.device("cpu") if distributed.fsdp() else device)


def check_quantization(cfg: Any) -> None:
    """model.quantization needs bitsandbytes, and is refused under FSDP."""
    if not cfg.quantization:
        return
    if distributed.fsdp():
        raise ModelError("model.quantization: FSDP does not shard bitsandbytes' quantised layers; launch without "
                         "--use_fsdp (each process then holds the quantised base, as DDP does)")
    quantization.bitsandbytes(cfg.quantization)


def load_weights(source: ModelSource, dtype: torch.dtype, cfg: Any):
    """The model's weights in `dtype` on the CPU: a stage output's adapter merged into its base (in fp32; pickled base
    weights only with this run's own allow_pickle)."""
    if source.kind == "stage":
        return merged_adapter(load_weights(source.base, torch.float32, cfg), source).to(dtype=dtype)
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": dtype, "trust_remote_code": cfg.trust_remote_code, **hub_kernels.load_kwargs(cfg.kernels)}
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    if source.kind == "hub" and cfg.revision:
        kwargs["revision"] = cfg.revision
    refuse_pickle(source, cfg.allow_pickle)
    try:
        model = AutoModelForCausalLM.from_pretrained(source.path, use_safetensors=None if cfg.allow_pickle else True,
                                                     **kwargs)
    except Exception as e:  # noqa: BLE001
        raise ModelError(f"cannot load model {source.name}: {e}") from None
    return hub_kernels.check_loaded(model, cfg.kernels, source.name)


def check_policy_source(source: ModelSource) -> None:
    """A reward model's output folder is a scorer, never a policy to fine-tune or generate with."""
    if source.kind == "stage" and source.manifest.get("stage") == "reward":
        raise ModelError(f"{source.name} is a reward model (an llmft reward output); name it where a reward model "
                         f"is expected (reward_model), not as a model to generate with or fine-tune")


def refuse_pickle(source: ModelSource, allowed: bool) -> None:
    """Weights are read from safetensors only, unless `model.allow_pickle`: unpickling a file can run its code."""
    if allowed or source.kind == "hub":  # a hub model without safetensors fails in from_pretrained, by name
        return
    folder = Path(source.path)
    pickled = sorted(p.name for p in folder.glob("*") if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    if pickled and not any(folder.glob("*.safetensors")):
        raise ModelError(f"model {source.name} holds only pickled weights ({', '.join(pickled[:2])}); llmft reads "
                         f"safetensors, because unpickling can run code. Convert it once (AutoModelForCausalLM."
                         f"from_pretrained(dir).save_pretrained(dir)) or, for a file you trust, set "
                         f"model.allow_pickle: true")


def dry_build(source: ModelSource, model_cfg: Any, lora: Any, new_tokens: list[int]) -> None:
    """What `--dry-run` checks of the model without reading its weights: the architecture from its config, on the
    meta device, takes the LoRA adapter (target modules) and the tokens a chat template adds."""
    from transformers import AutoConfig, AutoModelForCausalLM

    check_policy_source(source)
    check_quantization(model_cfg)
    root = source.root
    try:
        config = AutoConfig.from_pretrained(root.path, trust_remote_code=model_cfg.trust_remote_code)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=model_cfg.trust_remote_code)
    except Exception as e:  # noqa: BLE001
        raise ModelError(f"cannot build model {source.name} from its config: {e}") from None
    add_lora(model, lora, False, new_tokens)


def merged_adapter(base, source: ModelSource):
    """`base` with the adapter of the stage output `source` merged in (its embedding rows grown first when that stage
    added tokens: `model.chat_template`). An adapter trained on a quantised base (QLoRA) is merged into that base
    de-quantised, the weights it was trained against."""
    from peft import PeftModel

    if trained := quantization.trained_on(source.manifest):
        base = quantization.round_trip(base, *trained)
    rows = source.manifest.get("model", {}).get("embedding_rows")
    if rows and rows > base.get_input_embeddings().num_embeddings:
        base.resize_token_embeddings(rows, mean_resizing=False)
    try:
        return PeftModel.from_pretrained(base, source.path).merge_and_unload()
    except Exception as e:  # noqa: BLE001
        raise ModelError(f"cannot merge the adapter of {source.name} into its base: {e}") from None


def policy_with_reference(s: Any):
    """A stage's model with a fresh LoRA adapter and dropout off: the same weights with the adapter disabled are the
    reference, equal to the policy at step 0 (dpo, kto). `s`: the stage's Setup (data.packing probed first)."""
    base = load_model(s.source, s.dtype, s.device, s.cfg.model)
    if s.cfg.data.packing:
        check_packing(base)
    model = add_lora(base, s.cfg.lora, s.cfg.train.gradient_checkpointing, s.chat.added_ids)
    disable_dropout(model)
    return model
