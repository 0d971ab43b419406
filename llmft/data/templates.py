"""Chat templates to give a model that has none (a base model), or to replace its own: `model.chat_template`.

A named template brings the special tokens it needs; a Jinja file names them in `model.special_tokens`. Tokens
the tokenizer lacks are added as special tokens, their embedding rows (and LM-head rows) start at the mean of the
existing ones and are trained with the adapter (peft's trainable tokens), and the template and tokens are saved with
the run's tokenizer, so every later stage, `llmft generate` and `llmft eval` use them.
"""

from __future__ import annotations

from pathlib import Path

from llmft.errors import ConfigError

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
LLAMA3 = ("{{ bos_token or '' }}{% for m in messages %}"
          "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content'] | trim + '<|eot_id|>' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
          "{% endif %}")
GEMMA = ("{{ bos_token or '' }}{% if messages[0]['role'] == 'system' %}"
         "{% set system = messages[0]['content'] + '\n\n' %}{% set turns = messages[1:] %}"
         "{% else %}{% set system = '' %}{% set turns = messages %}{% endif %}"
         "{% for m in turns %}{{ '<start_of_turn>' + ('model' if m['role'] == 'assistant' else m['role']) + '\n'"
         " + (system if loop.first else '') + m['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
         "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}")
TOOLS_HEADER = ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with "
                "function signatures within <tools></tools> XML tags:\n<tools>")
TOOLS_FOOTER = ("\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
                "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
                "<args-json-object>}\n</tool_call>")
# ChatML with tools as Qwen2.5 offers them (its documented format, written here): the tools' schemas in the system
# turn, calls as <tool_call> JSON blocks in the assistant's text, consecutive tool results in one user turn
HERMES = ("{% if tools %}{{ '<|im_start|>system\n' }}{% if messages[0]['role'] == 'system' %}"
          "{{ messages[0]['content'] + '\n\n' }}{% endif %}{{ '" + TOOLS_HEADER.replace("\n", "\\n") + "' }}"
          "{% for tool in tools %}{{ '\n' }}{{ tool | tojson }}{% endfor %}"
          "{{ '" + TOOLS_FOOTER.replace("\n", "\\n") + "<|im_end|>\n' }}"
          "{% elif messages[0]['role'] == 'system' %}{{ '<|im_start|>system\n' + messages[0]['content'] + "
          "'<|im_end|>\n' }}{% endif %}"
          "{% for m in messages %}{% if m['role'] == 'system' and loop.first %}"
          "{% elif m['role'] == 'tool' %}"
          "{% if loop.first or messages[loop.index0 - 1]['role'] != 'tool' %}{{ '<|im_start|>user' }}{% endif %}"
          "{{ '\n<tool_response>\n' + m['content'] + '\n</tool_response>' }}"
          "{% if loop.last or messages[loop.index0 + 1]['role'] != 'tool' %}{{ '<|im_end|>\n' }}{% endif %}"
          "{% else %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endif %}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

NAMED: dict[str, tuple[str, tuple[str, ...]]] = {
    "chatml": (CHATML, ("<|im_start|>", "<|im_end|>")),
    "hermes": (HERMES, ("<|im_start|>", "<|im_end|>")),
    "llama3": (LLAMA3, ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")),
    "gemma": (GEMMA, ("<start_of_turn>", "<end_of_turn>")),
}


def resolve(name: str, special_tokens: list[str] | tuple[str, ...] = ()) -> tuple[str, tuple[str, ...]]:
    """(template text, the special tokens it needs) for `model.chat_template`: a name or a Jinja file."""
    if name in NAMED:
        template, tokens = NAMED[name]
        return template, tuple(dict.fromkeys([*tokens, *special_tokens]))
    path = Path(name).expanduser()
    if not path.is_file():
        raise ConfigError(f"model.chat_template: '{name}' is neither a named template ({', '.join(NAMED)}) nor a "
                          f"Jinja file")
    try:
        return path.read_text(encoding="utf-8"), tuple(special_tokens)
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"model.chat_template: cannot read {path}: {e}") from None


def apply(tok, name: str, special_tokens: list[str] | tuple[str, ...] = ()) -> list[int]:
    """Set the template on `tok` and add the special tokens it lacks; return the ids of the added tokens."""
    template, tokens = resolve(name, special_tokens)
    vocab = tok.get_vocab()
    missing = [t for t in tokens if t not in vocab]
    if missing:
        tok.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    tok.chat_template = template
    return tok.convert_tokens_to_ids(missing)
