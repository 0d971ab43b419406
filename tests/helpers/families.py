"""Tiny random-init models shaped like the families users train, with tokenizers that behave like the real ones.

Each family has its real architecture class (with what sets it apart: Gemma-2's logit soft-capping and sliding
window, Qwen2's QKV bias, Qwen3's head_dim and QK-norm, Phi-3's fused projections, Llama-3's rope scaling), a small
BPE vocabulary with the family's special tokens (byte-level like Llama-3 and Qwen, or SentencePiece-style spaces
like Gemma, Mistral and Phi-3), its BOS behaviour (added by the tokenizer or not), its pad token (absent, equal to
EOS, or its own), a chat template written to behave like the real one for system/user/assistant chats (turn
terminator, generation prompt, system handling, trimming, role names, alternation checks), and a
generation_config.json with the real checkpoint's EOS list and sampling defaults.

The templates are written here from the families' documented behaviour, not copied: rendering matches the real
templates for plain chats (Llama-3-8B-Instruct's first release, whose tokenizer EOS was <|end_of_text|> while turns
end with <|eot_id|>; Qwen2.5 with its default system prompt; Qwen3's think block on the final answer; Gemma-2
refusing a system message; Gemma-3 folding it into the first user turn; Mistral v0.3 attaching it to the last user
turn and ignoring add_generation_prompt; Phi-3's <|end|> with EOS after the last turn).
"""

from __future__ import annotations

import json
import string
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from llmft.models.sources import resolve_source

CORPUS = ["the quick brown fox jumps over the lazy dog", "a lighthouse guides ships at night",
          "paris is the capital of france", "water boils at one hundred degrees", "write three words about the sea",
          "answer in lowercase please", "hello world", "the sea is deep and wide", "you are a helpful assistant",
          "you are qwen created by alibaba cloud", "sure here is the answer", "be brief"] * 20

LLAMA3 = ("{% for m in messages %}{% if loop.first %}{{ bos_token }}{% endif %}"
          "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content'] | trim + '<|eot_id|>' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
          "{% endif %}")
QWEN25 = ("{% if messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}"
          "{% endif %}{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
QWEN3 = ("{% set ns = namespace(last_user=-1) %}{% for m in messages %}{% if m['role'] == 'user' %}"
         "{% set ns.last_user = loop.index0 %}{% endif %}{% endfor %}"
         "{% for m in messages %}{% if m['role'] == 'assistant' %}{% set content = m['content'] %}"
         "{% set reasoning = '' %}{% if '</think>' in content %}"
         "{% set reasoning = content.split('</think>')[0].split('<think>')[-1].strip('\n') %}"
         "{% set content = content.split('</think>')[-1].lstrip('\n') %}{% endif %}"
         "{% if loop.index0 > ns.last_user and (loop.last or reasoning) %}"
         "{{ '<|im_start|>assistant\n<think>\n' + reasoning + '\n</think>\n\n' + content + '<|im_end|>\n' }}"
         "{% else %}{{ '<|im_start|>assistant\n' + content + '<|im_end|>\n' }}{% endif %}"
         "{% else %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endif %}{% endfor %}"
         "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
         "{% if enable_thinking is defined and enable_thinking is false %}{{ '<think>\n\n</think>\n\n' }}{% endif %}"
         "{% endif %}")
ALTERNATE = ("{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
             "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}")
GEMMA2 = ("{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
          "{% endif %}{% for m in messages %}" + ALTERNATE +
          "{{ '<start_of_turn>' + ('model' if m['role'] == 'assistant' else m['role']) + '\n' + m['content'] | trim"
          " + '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}")
GEMMA3 = ("{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set prefix = messages[0]['content'] + '\n\n' %}"
          "{% set turns = messages[1:] %}{% else %}{% set prefix = '' %}{% set turns = messages %}{% endif %}"
          "{% for m in turns %}" + ALTERNATE.replace("messages", "turns") +
          "{{ '<start_of_turn>' + ('model' if m['role'] == 'assistant' else m['role']) + '\n'"
          " + (prefix if loop.first else '') + m['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}")
MISTRAL = ("{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
           "{% set turns = messages[1:] %}{% else %}{% set turns = messages %}{% endif %}{{ bos_token }}"
           "{% for m in turns %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception("
           "'After the optional system message, conversation roles must alternate user/assistant/user/assistant/...')"
           " }}{% endif %}{% if m['role'] == 'user' %}{% if loop.last and system is defined %}"
           "{{ '[INST] ' + system + '\n\n' + m['content'] + '[/INST]' }}{% else %}"
           "{{ '[INST] ' + m['content'] + '[/INST]' }}{% endif %}{% else %}"
           "{{ ' ' + m['content'] | trim + eos_token }}{% endif %}{% endfor %}")
PHI3 = ("{% for m in messages %}{% if m['role'] in ['system', 'user', 'assistant'] %}"
        "{{ '<|' + m['role'] + '|>\n' + m['content'] + '<|end|>\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}")

# Tool-using variants, written from each family's documented tool format: Llama-3.1 (system "Environment: ipython",
# the tools' JSON in the first user turn, calls as {"name", "parameters"}, results in "ipython" turns), Qwen2.5 (its
# default system prompt with the tools in <tools></tools>, calls in <tool_call>, consecutive results in one user turn
# of <tool_response> blocks), Mistral v0.3 ([AVAILABLE_TOOLS] before the last user turn, [TOOL_CALLS], results in
# [TOOL_RESULTS]: not prefix-preserving once a later user turn exists).
LLAMA31_TOOLS = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] | trim %}"
    "{% set turns = messages[1:] %}{% else %}{% set system = '' %}{% set turns = messages %}{% endif %}"
    "{{ '<|start_header_id|>system<|end_header_id|>\n\n' }}{% if tools %}{{ 'Environment: ipython\n' }}{% endif %}"
    "{{ 'Cutting Knowledge Date: December 2023\n\n' + system + '<|eot_id|>' }}"
    "{% for m in turns %}{% if loop.first and tools and m['role'] == 'user' %}"
    "{{ '<|start_header_id|>user<|end_header_id|>\n\nGiven the following functions, please respond with a JSON for "
    "a function call with its proper arguments that best answers the given prompt.\n\nRespond in the format "
    "{\"name\": function name, \"parameters\": dictionary of argument name and its value}.Do not use variables.\n\n' }}"
    "{% for t in tools %}{{ t | tojson(indent=4) + '\n\n' }}{% endfor %}{{ m['content'] | trim + '<|eot_id|>' }}"
    "{% elif m['role'] in ['tool', 'ipython'] %}"
    "{{ '<|start_header_id|>ipython<|end_header_id|>\n\n' + m['content'] + '<|eot_id|>' }}"
    "{% else %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content'] | trim + '<|eot_id|>' }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}")
QWEN25_TOOLS = (
    "{% if tools %}{{ '<|im_start|>system\n' + (messages[0]['content'] if messages[0]['role'] == 'system' else "
    "'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.') + '\n\n# Tools\n\nYou may call one or "
    "more functions to assist with the user query.\n\nYou are provided with function signatures within "
    "<tools></tools> XML tags:\n<tools>' }}{% for t in tools %}{{ '\n' + t | tojson }}{% endfor %}"
    "{{ '\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
    "<args-json-object>}\n</tool_call><|im_end|>\n' }}{% elif messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}"
    "{% endif %}{% for m in messages %}{% if m['role'] == 'system' and loop.first and tools %}"
    "{% elif m['role'] == 'tool' %}"
    "{% if messages[loop.index0 - 1]['role'] != 'tool' %}{{ '<|im_start|>user' }}{% endif %}"
    "{{ '\n<tool_response>\n' + m['content'] + '\n</tool_response>' }}"
    "{% if loop.last or messages[loop.index0 + 1]['role'] != 'tool' %}{{ '<|im_end|>\n' }}{% endif %}"
    "{% else %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
MISTRAL_TOOLS = (
    "{% set users = messages | selectattr('role', 'equalto', 'user') | list %}{{ bos_token }}"
    "{% for m in messages %}{% if m['role'] == 'user' %}{% if tools and m == users[-1] %}"
    "{{ '[AVAILABLE_TOOLS] ' + tools | tojson + '[/AVAILABLE_TOOLS]' }}{% endif %}"
    "{{ '[INST] ' + m['content'] + '[/INST]' }}{% elif m['role'] == 'tool' %}"
    "{{ '[TOOL_RESULTS] {\"content\": ' + m['content'] | tojson + '}[/TOOL_RESULTS]' }}"
    "{% elif m['role'] == 'assistant' and m['tool_calls'] is defined %}"
    "{{ '[TOOL_CALLS] ' + m['tool_calls'] | map(attribute='function') | list | tojson + eos_token }}"
    "{% elif m['role'] == 'assistant' %}{{ ' ' + m['content'] | trim + eos_token }}{% endif %}{% endfor %}")
MISTRAL_TOOL_TOKENS = ("[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_CALLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]")


@dataclass(frozen=True)
class Family:
    name: str
    arch: str  # transformers config class: "llama", "qwen2", ...
    specials: tuple[str, ...]  # special tokens, in id order after the base vocabulary
    bos: str | None
    eos: str
    pad: str | None
    turn_end: str  # the token the template ends an assistant turn with
    template: str
    generation: dict  # generation_config.json, token names in eos_token_id resolved to ids
    add_bos: bool = False  # the tokenizer prepends BOS (tokenizer.json TemplateProcessing)
    spaces: str = "bytelevel"  # or "metaspace" (SentencePiece-style ▁ spaces)
    rstrip: tuple[str, ...] = ()  # added tokens that swallow the whitespace after them (Phi-3)
    plain: tuple[str, ...] = ()  # added tokens that are not special (Qwen3's <think>)
    system: str = "native"  # native | folded | refused | last_user
    arch_kwargs: dict = field(default_factory=dict)
    corpus: tuple[str, ...] = ()  # more text the BPE vocabulary is trained on (a tool template's phrases)
    vocab: int = 320


FAMILIES = [
    Family("llama3", "llama", ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                               "<|eot_id|>"),
           "<|begin_of_text|>", "<|end_of_text|>", None, "<|eot_id|>", LLAMA3,
           {"eos_token_id": ["<|end_of_text|>", "<|eot_id|>"], "do_sample": True, "temperature": 0.6, "top_p": 0.9},
           add_bos=True, arch_kwargs={"rope_theta": 500000.0, "tie_word_embeddings": False, "rope_scaling": {
               "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}}),
    Family("qwen2.5", "qwen2", ("<|endoftext|>", "<|im_start|>", "<|im_end|>"), None, "<|im_end|>", "<|endoftext|>",
           "<|im_end|>", QWEN25,
           {"eos_token_id": ["<|im_end|>", "<|endoftext|>"], "do_sample": True, "repetition_penalty": 1.1,
            "temperature": 0.7, "top_p": 0.8, "top_k": 20}, arch_kwargs={"tie_word_embeddings": True}),
    Family("qwen3", "qwen3", ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"), None,
           "<|im_end|>", "<|endoftext|>", "<|im_end|>", QWEN3,
           {"eos_token_id": ["<|im_end|>", "<|endoftext|>"], "do_sample": True, "temperature": 0.6, "top_k": 20,
            "top_p": 0.95}, plain=("<think>", "</think>"), arch_kwargs={"head_dim": 16, "tie_word_embeddings": True}),
    Family("gemma2", "gemma2", ("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"), "<bos>",
           "<eos>", "<pad>", "<end_of_turn>", GEMMA2,
           {"eos_token_id": ["<eos>", "<end_of_turn>"], "cache_implementation": "hybrid"}, add_bos=True,
           spaces="metaspace", system="refused",
           # soft-capping at 3 (30 in the real model, whose logits are ~10x a tiny model's): it changes every log-prob
           arch_kwargs={"final_logit_softcapping": 3.0, "attn_logit_softcapping": 50.0, "query_pre_attn_scalar": 8,
                        "sliding_window": 16, "head_dim": 8, "hidden_activation": "gelu_pytorch_tanh"}),
    Family("gemma3", "gemma3_text", ("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"), "<bos>",
           "<eos>", "<pad>", "<end_of_turn>", GEMMA3,
           {"eos_token_id": ["<eos>", "<end_of_turn>"], "cache_implementation": "hybrid", "do_sample": True,
            "top_k": 64, "top_p": 0.95}, add_bos=True, spaces="metaspace", system="folded",
           arch_kwargs={"query_pre_attn_scalar": 8, "sliding_window": 16, "head_dim": 8,
                        "hidden_activation": "gelu_pytorch_tanh"}),
    Family("mistral", "mistral", ("<unk>", "<s>", "</s>", "[INST]", "[/INST]"), "<s>", "</s>", None, "</s>", MISTRAL,
           {"eos_token_id": "</s>"}, add_bos=True, spaces="metaspace", system="last_user",
           arch_kwargs={"sliding_window": None, "tie_word_embeddings": False}),
    Family("phi3", "phi3", ("<unk>", "<s>", "<|endoftext|>", "<|assistant|>", "<|system|>", "<|end|>", "<|user|>"),
           "<s>", "<|endoftext|>", "<|endoftext|>", "<|end|>", PHI3,
           {"eos_token_id": ["<|endoftext|>", "<|assistant|>", "<|end|>"]}, spaces="metaspace",
           rstrip=("<|assistant|>", "<|system|>", "<|end|>", "<|user|>"),
           arch_kwargs={"tie_word_embeddings": False, "sliding_window": None}),
]
BY_NAME = {f.name: f for f in FAMILIES}
# the families whose templates have tools, as their tool-using releases write them
def tool_family(name: str, template: str, specials: tuple[str, ...] = ()) -> Family:
    """A family with its tool template, its vocabulary trained on that template's text and on JSON calls too (as a
    real tokenizer has words for them): prompts of a few hundred tokens, not thousands of single characters."""
    f = BY_NAME[name]
    phrases = (template.replace("{{", " ").replace("}}", " "), '{"name": "add", "arguments": {"a": 1, "b": 2}}',
               '{"name": "add", "parameters": {"a": 3, "b": 4}}', '"type": "function", "function": "description": '
               '"Add two integers." "properties": "integer" "required": "object" "The first." "The second."')
    return replace(f, template=template, specials=f.specials + specials, corpus=phrases, vocab=1200,
                   arch_kwargs={**f.arch_kwargs, "max_position_embeddings": 1024})


TOOL_FAMILIES = {"llama3.1": tool_family("llama3", LLAMA31_TOOLS), "qwen2.5": tool_family("qwen2.5", QWEN25_TOOLS),
                 "mistral": tool_family("mistral", MISTRAL_TOOLS, MISTRAL_TOOL_TOKENS)}


def build_tokenizer(f: Family):
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    if f.spaces == "metaspace":  # SentencePiece-style: spaces become ▁, one is prepended to the first word
        raw.normalizer = normalizers.Replace(Regex(" "), "▁")
        raw.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
        raw.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first", split=True)
        alphabet = sorted(set(string.printable.replace(" ", "")) | {"▁"})
    else:
        raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        raw.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    raw.train_from_iterator(CORPUS + list(f.corpus) * 20, trainers.BpeTrainer(vocab_size=f.vocab,
                                                                               initial_alphabet=alphabet,
                                                                               special_tokens=[]))
    raw.add_special_tokens([AddedToken(t, special=t not in f.plain, rstrip=t in f.rstrip, normalized=False)
                            for t in f.specials])
    if f.add_bos:
        bos_id = raw.token_to_id(f.bos)
        raw.post_processor = processors.TemplateProcessing(single=f"{f.bos} $A", pair=f"{f.bos} $A {f.bos} $B",
                                                           special_tokens=[(f.bos, bos_id)])
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token=f.bos, eos_token=f.eos, pad_token=f.pad,
                                  unk_token="<unk>" if "<unk>" in f.specials else None)
    tok.chat_template = f.template
    return tok


def build_config(f: Family, tok):
    import transformers

    ids = {name: tok.convert_tokens_to_ids(name) for name in (f.bos, f.eos, f.pad) if name}
    # no pad_token_id in the model config: its padding_idx row would start at zero and, where pad is EOS (Phi-3), a
    # random-init model could never emit it (real checkpoints have that row trained)
    common = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.2,
                  bos_token_id=ids.get(f.bos), eos_token_id=ids[f.eos], pad_token_id=None)
    classes = {"llama": "LlamaConfig", "qwen2": "Qwen2Config", "qwen3": "Qwen3Config", "gemma2": "Gemma2Config",
               "gemma3_text": "Gemma3TextConfig", "mistral": "MistralConfig", "phi3": "Phi3Config"}
    return getattr(transformers, classes[f.arch])(**{**common, **f.arch_kwargs})


def generation_config(f: Family, tok) -> dict:
    eos = f.generation["eos_token_id"]
    ids = [tok.convert_tokens_to_ids(e) for e in eos] if isinstance(eos, list) else tok.convert_tokens_to_ids(eos)
    extra = {"pad_token_id": tok.convert_tokens_to_ids(f.pad)} if f.pad else {}
    bos = {"bos_token_id": tok.convert_tokens_to_ids(f.bos)} if f.bos else {}
    return {**bos, **extra, **f.generation, "eos_token_id": ids}


def build(f: Family, path: Path, seed: int = 0) -> Path:
    """Write the family's tiny model, tokenizer and generation_config.json into `path`."""
    import torch
    from transformers import AutoModelForCausalLM

    tok = build_tokenizer(f)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(build_config(f, tok))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    (path / "generation_config.json").write_text(json.dumps(generation_config(f, tok), indent=1))
    return path


def lora_model(path: Path, gradient_checkpointing: bool = False):
    from llmft.config import LoraConfig, ModelConfig
    from llmft.models.adapters import add_lora, disable_dropout
    from llmft.models.loading import load_model

    model = load_model(resolve_source(str(path)), torch.float32, torch.device("cpu"), ModelConfig(name=str(path)))
    torch.manual_seed(1)
    lm = add_lora(model, LoraConfig(r=4, alpha=8, dropout=0.0), gradient_checkpointing)
    for name, p in lm.named_parameters():
        if "lora_B" in name:  # B = 0 would hide a wrong gradient through the prompt's keys and values
            p.data.normal_(0, 0.3)
    disable_dropout(lm)
    return lm
