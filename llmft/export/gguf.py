"""A merged causal LM as one GGUF file for llama.cpp and Ollama, through the `gguf` package.

    architectures   llama (Llama-3, SmolLM2, ...) and qwen2 (Qwen2 / Qwen2.5), without rope scaling
    tensor names    the gguf package's own map from transformers names (`gguf.get_tensor_name_map`)
    rotary layout   llama.cpp's llama graph rotates adjacent pairs of each head's query/key dimensions, transformers
                    rotates the two halves: Q and K rows are reordered per head (the inverse of what transformers'
                    GGUF loader undoes); Qwen2 keeps the halves layout (NEOX rope), nothing is reordered
    types           matrices in f16 or q8_0 (blocks of 32 along a row; a row that is not a whole number of blocks
                    stays f16), vectors (norms, biases) in f32
    tokenizer       byte-level BPE ("gpt2" in GGUF): tokens, types, merges, special ids; EOS is the chat template's
                    turn terminator (llama.cpp stops there), the chat template itself is carried
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from llmft.data.chat import Chat
from llmft.errors import ConfigError, ModelError

ARCHES = {"llama": "LLAMA", "qwen2": "QWEN2"}
PRE_TOKENIZERS = {("llama", 128256): "llama-bpe", ("llama", 49152): "smollm", ("qwen2", None): "qwen2"}


def write_gguf(model, chat: Chat, path: Path, quant: str) -> dict:
    import gguf

    config = model.config
    check_exportable(config, quant)
    arch = getattr(gguf.MODEL_ARCH, ARCHES[config.model_type])
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[arch])
    write_hparams(writer, config, quant)
    write_tokenizer(writer, chat, config)
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ModelError(f"GGUF export: no GGUF name for tensor {hf_name} of {config.model_type}")
        data, dtype = encode(rope_layout(hf_name, tensor.float(), config), quant)
        writer.add_tensor(name, data, raw_dtype=dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"class": "gguf", "file": path.name, "quantization": quant, "architecture": config.model_type}


def check_exportable(config, quant: str) -> None:
    if config.model_type not in ARCHES:
        raise ModelError(f"GGUF export supports {' and '.join(ARCHES)} models; this one is {config.model_type} "
                         f"(export it with --format hf and convert it with llama.cpp's convert_hf_to_gguf.py)")
    scaling = getattr(config, "rope_scaling", None) or {}
    if scaling.get("rope_type", scaling.get("type", "default")) not in ("default", None):
        raise ModelError(f"GGUF export: rope scaling {scaling.get('rope_type') or scaling.get('type')} is not "
                         f"written by llmft (export with --format hf and convert with llama.cpp)")
    head_dim = getattr(config, "head_dim", None)
    if head_dim and head_dim * config.num_attention_heads != config.hidden_size:
        raise ModelError(f"GGUF export: head_dim {head_dim} × {config.num_attention_heads} heads ≠ hidden size "
                         f"{config.hidden_size} is not written by llmft (export with --format hf and convert with "
                         f"llama.cpp)")
    if pre_tokenizer(config) is None:
        raise ModelError(f"GGUF export: llmft knows llama.cpp's pre-tokenizer for SmolLM2 (vocabulary 49,152), Llama-3 "
                         f"(128,256) and Qwen2, not for this {config.model_type} vocabulary of {config.vocab_size}: "
                         f"llama.cpp would split text differently (export with --format hf and convert with llama.cpp)")
    if quant not in ("f16", "q8_0"):
        raise ConfigError(f"--quant {quant}: choose f16 or q8_0")


def write_hparams(writer, config, quant: str) -> None:
    import gguf

    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_name(getattr(config, "_name_or_path", "") or config.model_type)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(rope_theta(config)))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if quant == "q8_0" else gguf.LlamaFileType.MOSTLY_F16)


def rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    return params.get("rope_theta") or getattr(config, "rope_theta", 10000.0)


def write_tokenizer(writer, chat: Chat, config) -> None:
    """Byte-level BPE only: the vocabulary in id order (padded to the model's rows), merges, special ids."""
    import gguf

    tok = chat.tokenizer
    spec = json.loads(tok.backend_tokenizer.to_str()) if hasattr(tok, "backend_tokenizer") else {}
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or "ByteLevel" not in json.dumps(spec.get("pre_tokenizer")):
        raise ModelError("GGUF export supports byte-level BPE tokenizers (Llama-3, Qwen2, SmolLM2); this one is "
                         f"{model.get('type')}: export with --format hf and convert with llama.cpp")
    added = tok.added_tokens_decoder
    tokens, types = [], []
    for i in range(config.vocab_size):
        token = tok.convert_ids_to_tokens(i) if i < len(tok) else None
        tokens.append(token if token is not None else f"[PAD{i}]")
        kind = gguf.TokenType.UNUSED if token is None else gguf.TokenType.NORMAL
        if i in added:
            kind = gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED
        types.append(kind)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer(config))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])])
    special_ids(writer, chat)
    if tok.chat_template:
        writer.add_chat_template(tok.chat_template)


def pre_tokenizer(config) -> str | None:
    """llama.cpp's name for the model's pre-tokenizer (how text is split before BPE), where llmft knows it."""
    arch = config.model_type
    return PRE_TOKENIZERS.get((arch, config.vocab_size)) or PRE_TOKENIZERS.get((arch, None))


def special_ids(writer, chat: Chat) -> None:
    tok = chat.tokenizer
    end = chat.end_ids[0]
    writer.add_eos_token_id(end)  # llama.cpp stops at EOS and EOT: the turn terminator
    writer.add_eot_token_id(end)
    if tok.bos_token_id is not None:
        writer.add_bos_token_id(tok.bos_token_id)
    writer.add_add_bos_token(bool(tok.bos_token_id is not None and tok("a")["input_ids"][:1] == [tok.bos_token_id]))
    if tok.pad_token_id is not None:
        writer.add_pad_token_id(tok.pad_token_id)
    if tok.unk_token_id is not None:
        writer.add_unk_token_id(tok.unk_token_id)


def rope_layout(name: str, w: torch.Tensor, config) -> torch.Tensor:
    """llama.cpp's llama graph pairs dimension 2i with 2i + 1 of each head, transformers i with i + d/2: the rows
    of W_q and W_k are reordered per head to match. Qwen2 (NEOX rope in llama.cpp) keeps the halves."""
    if config.model_type != "llama" or not name.endswith(("q_proj.weight", "k_proj.weight", "q_proj.bias",
                                                          "k_proj.bias")):
        return w
    heads = config.num_attention_heads if ".q_proj." in name else config.num_key_value_heads
    rows = w.shape[0] // heads
    return w.reshape(heads, 2, rows // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def encode(w: torch.Tensor, quant: str) -> tuple[np.ndarray, object]:
    """(data, GGML type): vectors in f32, matrices in f16, or in q8_0 when each row is whole blocks of 32."""
    import gguf

    x = w.detach().cpu().numpy().astype(np.float32)
    if x.ndim == 1:
        return x, gguf.GGMLQuantizationType.F32
    if quant == "q8_0" and x.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0:
        return gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
    return x.astype(np.float16), gguf.GGMLQuantizationType.F16
