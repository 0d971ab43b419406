"""How a conversation becomes tokens, and where an answer ends: one rule for every stage and command.

    prompt    the chat template rendered through its generation prompt, tokenised with no special tokens added
              (what `apply_chat_template(..., add_generation_prompt=True, tokenize=True)` gives)
    answer    what the template writes for an assistant turn after that prompt: its lead-in (Mistral's space, Qwen3's
              empty think block), the content (trimmed where the template trims), and the turn's terminator
              (`<|im_end|>`, `<|eot_id|>`, `<end_of_turn>`, `</s>`, `<|end|>`, or ` </s>` with its space); nothing
              after the terminator
    stop set  the tokenizer's EOS ∪ the checkpoint's `generation_config.json` EOS ids ∪ the terminator

Answer stops at the first id of the stop set and keeps it, so a sampled answer ends the way a trained one
does: sft supervises the terminator, reward and dpo answers end with it, the reward model reads its score on it,
ppo samples up to it. A template whose turns end in plain text (no special token) gets the tokenizer's EOS
appended to each answer; since it never writes that EOS between turns, such a template takes single-answer rows
only.

Without a chat template (a base model; `model.chat_template` gives it one), the turns of a conversation are the
messages' texts, each assistant turn followed by EOS, joined by TEXT_SEPARATOR; a prompt ends with the separator
(the answer starts on its own paragraph), and an answer is its text followed by EOS.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from llmft.errors import DataError, ModelError

TEXT_SEPARATOR = "\n\n"
PROBE = [{"role": "user", "content": "Hi"}]
CORE, PADDED = "Sure", "  Sure  "  # two probe answers: the padding tells whether the template trims each side


@dataclass(frozen=True)
class AnswerFrame:
    """What a chat template writes around an answer's content."""

    lead: str  # between the generation prompt and the content
    lstrip: bool  # the content's leading whitespace is trimmed
    rstrip: bool  # ... and its trailing whitespace
    end: str  # the terminator: optional whitespace, then one added token's text; "" = EOS appended as an id


class Chat:
    """A tokenizer with its chat template's rules: prompts, answers, conversations, the stop set, cutting."""

    def __init__(self, tokenizer, eos_ids: list[int] | tuple[int, ...] = (), added_ids: list[int] | tuple = ()):
        self.tokenizer = tokenizer
        self.added_ids = list(added_ids)  # tokens this run added (model.chat_template): their rows are trained
        self.templated = bool(tokenizer.chat_template)
        if tokenizer.eos_token_id is None:
            raise ModelError("the tokenizer has no EOS token, so no answer could ever end: give it one "
                             "(tokenizer.eos_token) before training")
        eos = tokenizer.eos_token or ""
        self.frame = answer_frame(tokenizer) if self.templated else AnswerFrame("", False, False, eos)
        end_token = self.frame.end.lstrip()
        self.end_ids = [tokenizer.convert_tokens_to_ids(end_token)] if end_token else [tokenizer.eos_token_id]
        self.stop_ids = sorted({tokenizer.eos_token_id, *eos_ids, *self.end_ids} - {None})

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id

    def ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def generation_ids(self) -> dict:
        """The ids a generation config needs: the stop set as EOS, pad, BOS."""
        return {"eos_token_id": self.stop_ids, "pad_token_id": self.pad_id, "bos_token_id": self.tokenizer.bos_token_id}

    # ------------------------------------------------------------------------------------------ text
    def prompt_text(self, messages: list[dict], where: str = "prompt", tools: list[dict] | None = None) -> str:
        """The prompt as text, through the generation prompt (`tools`: JSON schemas for the template's `tools`)."""
        if self.templated:
            return render(self.tokenizer, messages, True, where, tools)
        return TEXT_SEPARATOR.join(m["content"] + (self.frame.end if m["role"] == "assistant" else "")
                                   for m in messages) + TEXT_SEPARATOR

    def answer_text(self, content: str) -> str:
        """An answer as the template writes it after the generation prompt, through its terminator."""
        f = self.frame
        content = content.lstrip() if f.lstrip else content
        return f.lead + (content.rstrip() if f.rstrip else content) + f.end

    # ----------------------------------------------------------------------------------------- tokens
    def prompt_ids(self, messages: list[dict], where: str = "prompt") -> list[int]:
        return self.text_ids(self.prompt_text(messages, where))

    def text_ids(self, text: str) -> list[int]:
        """A prompt's text as ids: a templated one as it is, plain text with the tokenizer's BOS."""
        return self.ids(text) if self.templated else self.tokenizer(text)["input_ids"]

    def encode(self, prompt: list[dict], answer: str, where: str = "prompt") -> tuple[list[int], list[int]]:
        """(prompt ids, answer ids): the answer tokenised in the context of its prompt, ending with the terminator."""
        prompt_ids = self.prompt_ids(prompt, where)
        return prompt_ids, self.answer_ids(self.prompt_text(prompt, where), prompt_ids, answer)

    def answer_ids(self, before: str, before_ids: list[int], content: str) -> list[int]:
        """An answer's ids after the text `before` (tokenised as `before_ids`), through the terminator."""
        ids = self.following(before, before_ids, self.answer_text(content))
        return ids if self.frame.end else ids + [self.tokenizer.eos_token_id]

    def following(self, before: str, before_ids: list[int], text: str) -> list[int]:
        """The ids of `text` as they follow `before` in one tokenisation (`before_ids` its prefix there). Where the two
        merge across the boundary, `text` is tokenised as a continuation: after a special token, so that a
        SentencePiece tokenizer adds no word-start marker of its own."""
        joint = self.tokenizer(before + text, add_special_tokens=not self.templated)["input_ids"]
        if joint[:len(before_ids)] == before_ids:
            return joint[len(before_ids):]
        anchor = self.tokenizer.eos_token or ""
        ids = self.ids(anchor + text)
        return ids[1:] if anchor and ids[:1] == [self.tokenizer.eos_token_id] else self.ids(text)

    def conversation(self, messages: list[dict], where: str, tools: list[dict] | None = None
                     ) -> list[tuple[list[int], bool]]:
        """Token pieces (ids, is_answer) of a conversation, through its last assistant turn: each assistant turn is an
        answer (lead-in, content, terminator), everything before it context, each context exactly the prompt
        generation would be given at that turn (with `tools` offered, as an environment's rollout gives them)."""
        answers = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if len(answers) > 1 and self.templated and not self.frame.end:
            raise DataError(f"{where}: the chat template ends turns in plain text, so an answer's end is EOS, which "
                            f"the template never writes between turns; give one row per answer")
        pieces, text, ids = [], "", []
        for i in answers:
            context = self.prompt_text(messages[:i], where, tools)
            if not context.startswith(text):
                raise DataError(f"{where}: the chat template renders earlier turns differently once later ones exist "
                                f"(Qwen3 drops earlier think blocks; Mistral moves the system message to the last user "
                                f"turn), so this conversation cannot be one training sequence; give one row per answer")
            context_ids = self.following(text, ids, context[len(text):]) if text else self.text_ids(context)
            answer_ids = self.answer_ids(context, ids + context_ids, messages[i]["content"])
            pieces += [(context_ids, False), (answer_ids, True)]
            text, ids = context + self.answer_text(messages[i]["content"]), ids + context_ids + answer_ids
        return pieces

    # ------------------------------------------------------------------------------------- generation
    def cut(self, ids: list[int]) -> tuple[list[int], bool]:
        """A generated response up to and including its first stop id; (ids, finished)."""
        stops = set(self.stop_ids)
        for i, t in enumerate(ids):
            if t in stops:
                return ids[:i + 1], True
        return ids, False

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()


def tokenizer_difference(a, b) -> str | None:
    """What differs between two tokenizers in how a conversation becomes tokens ("tokenizer", "chat template"),
    or None."""
    if a.get_vocab() != b.get_vocab():
        return "tokenizer"
    if a.chat_template != b.chat_template:
        return "chat template"
    return None


def render(tok, messages: list[dict], generation_prompt: bool, where: str, tools: list[dict] | None = None) -> str:
    try:
        return tok.apply_chat_template(messages, tools=tools or None, tokenize=False,
                                       add_generation_prompt=generation_prompt)
    except Exception as e:  # noqa: BLE001 - templates raise anything (jinja errors, role checks)
        raise DataError(f"{where}: the chat template rejects this conversation: {e}") from None


def answer_frame(tok) -> AnswerFrame:
    """Learn from two probe answers what the template writes around an answer: lead-in, trimming, terminator."""
    prompt = render(tok, PROBE, True, "the chat template")

    def rest(answer: str) -> str:
        full = render(tok, PROBE + [{"role": "assistant", "content": answer}], False, "the chat template")
        if not full.startswith(prompt) or CORE not in full[len(prompt):]:
            raise ModelError("the chat template does not write an assistant turn after its generation prompt "
                             "(rendering [user, assistant] does not start with [user] + generation prompt)")
        return full[len(prompt):]

    plain = rest(CORE)
    start = plain.index(CORE)
    lead, after = plain[:start], plain[start + len(CORE):]
    padded = rest(PADDED)
    content = padded[len(lead):len(padded) - len(after)] if padded.startswith(lead) else PADDED
    return AnswerFrame(lead, not content.startswith(" "), not content.endswith(" "), terminator(tok, after))


def terminator(tok, after: str) -> str:
    """The start of what follows an answer's content, when it is whitespace then one added token (the turn's end)."""
    space = re.match(r"[ \t]*", after).group()
    for token in sorted(tok.get_added_vocab(), key=len, reverse=True):
        if token and after[len(space):].startswith(token):
            return space + token
    return ""
