"""Loading models and their chat rules, LoRA, and the forward pass that turns a batch into supervised-token logits
(every stage's log-probs go through `lm_logits`). What a `model.name` refers to is `llmft.sources`."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import torch

from llmft import distributed, hub_kernels, quantization
from llmft.chat import Chat
from llmft.errors import ModelError
from llmft.sources import ModelSource, resolve_source, root_source

hub_kernels.import_bitsandbytes()  # before peft imports it: without its Hub kernel fetch


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
    """Load a causal LM; for a stage output, load its base and merge its adapter into it; with `cfg.quantization`,
    its linear layers quantised for QLoRA (`llmft.quantization`) as they move to `device`. Under FSDP it stays on the
    CPU: `distributed.shard_model` moves each rank's shard to the device."""
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
    root = root_source(source)
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


def policy_with_reference(s: Any):
    """A stage's model with a fresh LoRA adapter and dropout off: the same weights with the adapter disabled are the
    reference, equal to the policy at step 0 (dpo, kto). `s`: the stage's Setup (data.packing probed first)."""
    base = load_model(s.source, s.dtype, s.device, s.cfg.model)
    if s.cfg.data.packing:
        check_packing(base)
    model = add_lora(base, s.cfg.lora, s.cfg.train.gradient_checkpointing, s.chat.added_ids)
    disable_dropout(model)
    return model


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
    return trainable, sum(quantization.numel(p) for p in model.parameters())


# ------------------------------------------------------------------------------------------------ forward
def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only, so left- and right-padded rows see the same positions."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def unwrap(model):
    """The transformers model under a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def hidden_states(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, start: int = 0,
                  owners: torch.Tensor | None = None, packed: bool = False,
                  positions: torch.Tensor | None = None) -> torch.Tensor:
    """Last-layer hidden states [B, T − start, d] of columns `start`… of the transformer body, without the LM head;
    positions are counted over real tokens, so left and right padding give the same states. Under FSDP the call goes
    through the whole model (which gathers its sharded weights first), asking for the logits of one position only.

    `owners` [B] (optional) names, for each row, the first row whose columns before `start` are the same (G answers
    to one prompt): those columns then run once per owner, and their keys and values are shared by its rows
    (`shared_prefix_states`). With `packed` the rows' real tokens run as one padding-free sequence
    (`packed_states`; padding positions come back as 0). Either way the states and gradients are the same up to
    float rounding. With `positions` (blocks of several examples: `data.collate_blocks`) each row runs as it is, the
    model keeping attention within each example from where the positions restart."""
    if positions is not None:  # flash kernels find packed examples only in a batch of one row: flatten for them
        if "flash" in str(getattr(unwrap(model).config, "_attn_implementation", "")):
            return packed_states(model, input_ids, attention_mask, positions)[:, start:]
        return body_states(model, input_ids, None, positions)[:, start:]
    if owners is not None and start > 0 and can_share_prefix(model):
        return shared_prefix_states(model, input_ids, attention_mask, start, owners)
    if packed and not bool(attention_mask.all()):
        return packed_states(model, input_ids, attention_mask)[:, start:]
    return body_states(model, input_ids, attention_mask, position_ids(attention_mask))[:, start:]


def body_states(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                positions: torch.Tensor) -> torch.Tensor:
    if distributed.fsdp():
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=False,
                    output_hidden_states=True, logits_to_keep=1)
        return out.hidden_states[-1]
    return model_body(model)(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                             use_cache=False).last_hidden_state


def packed_states(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  positions: torch.Tensor | None = None) -> torch.Tensor:
    """Hidden states [B, T, d] computed without padding: the real tokens of all rows run as one sequence [1, N] whose
    positions restart at each row (or wherever `positions` restart), with no attention mask; transformers then finds
    the rows from the positions and keeps attention within each (its packed-sequence mask). Padding positions are
    0."""
    keep = attention_mask.bool()
    positions = position_ids(attention_mask) if positions is None else positions
    flat = body_states(model, input_ids[keep][None], None, positions[keep][None])[0]  # [N, d]
    return flat.new_zeros(*input_ids.shape, flat.shape[-1]).masked_scatter(keep[..., None], flat)


@torch.no_grad()
def check_packing(model) -> None:
    """Refuse data.packing for a model whose attention does not keep packed rows apart (a model with its own masks,
    remote code): on a probe of two rows, packed and padded states must agree."""
    base = unwrap(model)
    device, training = next(base.parameters()).device, base.training
    vocab = base.config.get_text_config().vocab_size
    ids = (torch.arange(10, device=device).view(2, 5) * 7 + 3) % vocab
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], device=device)
    base.eval()
    try:
        from llmft.pairpack import pair_probe

        padded, packed = hidden_states(model, ids, mask), packed_states(model, ids, mask)
        pairs = pair_probe(model, ids)
    finally:
        base.train(training)
    gap, scale = float((padded - packed)[mask.bool()].abs().max()), float(padded.abs().max())
    if max(gap, pairs) > probe_tolerance(base) * (1 + scale):
        raise ModelError(f"data.packing: this model's attention crosses packed rows (largest difference "
                         f"{max(gap, pairs):.3g} on a probe); set data.packing: false")


def probe_tolerance(base) -> float:
    """How far two ways of computing the same outputs may differ: fp32 rounding, or 16-bit's."""
    return 1e-3 if next(base.parameters()).dtype == torch.float32 else 2e-2


def shared_prefix_states(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, start: int,
                         owners: torch.Tensor) -> torch.Tensor:
    """Hidden states of columns `start`… [B, T − start, d], with columns …start − 1 run once per distinct owner
    (`prefix_cache`) and the suffix forward attending to their keys and values. For G answers to one prompt the
    prompt is encoded once instead of G times, in training and in the old/reference log-prob passes alike."""
    body, key = model_body(model), cache_kwarg(model_body(model))
    cache = prefix_cache(model, input_ids, attention_mask, start, owners)
    positions = position_ids(attention_mask)[:, start:]
    return body(input_ids=input_ids[:, start:], attention_mask=attention_mask, position_ids=positions,
                use_cache=True, **{key: cache}).last_hidden_state


def prefix_cache(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, start: int, owners: torch.Tensor):
    """The KV cache of columns …start − 1 for every row, computed on the owners' rows only: each row then takes
    its owner's keys and values (an index, so under autograd their gradients are summed back)."""
    from transformers import DynamicCache

    body, heads = model_body(model), torch.unique(owners)  # heads: the owner rows, sorted
    mask = attention_mask[heads, :start]
    try:
        cache = DynamicCache(config=body.config)  # given, not left to the model: some make none in train mode
    except TypeError:  # an older transformers
        cache = DynamicCache()
    body(input_ids=input_ids[heads, :start], attention_mask=mask, position_ids=position_ids(mask), use_cache=True,
         **{cache_kwarg(body): cache})
    if cache.get_seq_length() != start:
        raise ModelError(f"{type(body).__name__} did not fill the KV cache it was given ({cache.get_seq_length()} of "
                         f"{start} positions): the prompt cannot be shared. Please report it with `llmft env`")
    select_rows(cache, torch.searchsorted(heads, owners))  # row i ← its owner's keys and values
    return cache


def select_rows(cache, rows: torch.Tensor) -> None:
    """Row i of every layer's keys and values ← row rows[i], by `index_select`: its gradient sums the rows of each
    owner in a fixed order. (The cache's own `batch_select_indices` indexes, and the gradient of indexing with
    repeated rows accumulates in parallel on a CPU, in an order that changes from run to run: GRPO was not bitwise
    reproducible.) Layers of another kind select their own way."""
    try:
        from transformers.cache_utils import DynamicLayer
    except ImportError:  # an older transformers: no layer objects
        cache.batch_select_indices(rows)
        return
    for layer in cache.layers:
        if type(layer).batch_select_indices is DynamicLayer.batch_select_indices:
            layer.keys, layer.values = layer.keys.index_select(0, rows), layer.values.index_select(0, rows)
        else:
            layer.batch_select_indices(rows)


def prompt_owners(prompts: torch.Tensor, attention: torch.Tensor) -> torch.Tensor | None:
    """[B] for each row, the first row with the same (left-padded) prompt, or None when no two rows share one."""
    _, which = torch.unique(torch.cat([prompts, attention], 1), dim=0, return_inverse=True)  # [B] class ids
    if int(which.max()) + 1 == len(which):
        return None
    rows = torch.arange(len(which), device=which.device)
    first = torch.full_like(which, len(which)).scatter_reduce(0, which, rows, "amin")  # class → its first row
    return first[which]


def model_body(model):
    """The transformer body (embeddings and decoder layers, no LM head) under a PEFT wrapper or not."""
    base = unwrap(model)
    return getattr(base, base.base_model_prefix)


def cache_kwarg(body) -> str:
    """The name transformers gives the KV cache in forward and generate: `cache` from 5.x, `past_key_values`
    before."""
    return forward_cache_name(type(body))


@functools.cache
def forward_cache_name(cls) -> str:
    import inspect

    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


def can_share_prefix(model) -> bool:
    """Whether a prefix's KV cache can be shared: not under FSDP (the call goes through the wrapped model), and not
    while gradient checkpointing recomputes layers (transformers drops the cache of a checkpointed layer)."""
    if distributed.fsdp():
        return False
    body = model_body(model)
    checkpointed = any(getattr(m, "gradient_checkpointing", False) for m in body.modules())
    return not (checkpointed and (torch.is_grad_enabled() or body.training))


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


def lm_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """The LM head on hidden states, in fp32, as the model's own forward computes it: [..., d] → [..., V].
    Every stage's log-probs come through here, so that a model's final transform (Gemma-2's soft-capping
    c·tanh(z/c)) is never forgotten in one of them."""
    base = unwrap(model)
    logits = base.get_output_embeddings()(hidden).float()
    config = base.config.get_text_config()
    if scale := getattr(config, "logit_scale", None):  # Cohere
        logits = logits * scale
    if scaling := getattr(config, "logits_scaling", None):  # Granite
        logits = logits / scaling
    softcap = getattr(config, "final_logit_softcapping", None)  # Gemma-2
    return torch.tanh(logits / softcap) * softcap if softcap else logits


@torch.no_grad()
def check_lm_head(model) -> None:
    """Refuse an architecture whose forward transforms its logits in a way `lm_logits` does not: on a few tokens,
    the model's own logits and lm_logits(hidden states) must agree, or every stage would train (and PPO sample and
    score) different distributions."""
    base = unwrap(model)
    device, training = next(base.parameters()).device, base.training
    ids = torch.arange(4, device=device)[None] % base.config.get_text_config().vocab_size
    mask = torch.ones_like(ids)
    base.eval()  # no dropout: the check must not draw from the random stream training uses
    try:
        own = base(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=False).logits.float()
        ours = lm_logits(model, hidden_states(model, ids, mask))
    finally:
        base.train(training)
    gap, scale = float((own - ours).abs().max()), float(own.abs().max())
    if gap > probe_tolerance(base) * (1 + scale):
        raise ModelError(f"this model's forward transforms its logits in a way llmft does not apply (largest "
                         f"difference {gap:.3g} on a probe): its log-probs would not be the model's. Please report it "
                         f"with `llmft env` and the model's config.json")
