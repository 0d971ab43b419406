"""Batched generation: prompts → left-padded batches → sampling with the KV cache → answers cut at the first stop id.

This is the rollout primitive that `llmft generate`, `llmft eval`, PPO and GRPO share, behind
`generate(model, chat, prompts, sampling)`, so that another engine can be plugged in later.

What is sampled is exactly softmax(z / T) (optionally cut by top-k and top-p), nothing else: the checkpoint's
`generation_config.json` sampling defaults (repetition_penalty, no_repeat_ngram_size, min_new_tokens, bad_words_ids,
top_k, ...) are not applied, because RL recomputes log-probs as softmax(z / T) and a hidden processor would make
them belong to another distribution. Only its EOS ids count (in `Chat.stop_ids`). Asked for, the sampler returns its
own log-prob of every token it drew, under the distribution it drew it from, so the trainer can check its
recomputation against it.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from llmft.config import SamplingConfig
from llmft.data.chat import Chat
from llmft.data.examples import Example, collate
from llmft.errors import ModelError
from llmft.models.adapters import unwrap
from llmft.models.forward import cache_kwarg, can_share_prefix, model_body, prefix_cache, prompt_owners


@dataclass
class Answer:
    prompt_ids: list[int]
    answer_ids: list[int]  # through the first stop id (included) when there is one
    text: str  # the answer decoded without special tokens
    finished: bool  # ended with a stop id rather than running into max_new_tokens
    logprobs: list[float] | None = None  # the sampler's log-prob of each answer token (when asked)
    mask: list[int] | None = None  # multi-turn: 1 on the policy's tokens, 0 on the environment's; None = all 1


@torch.no_grad()
def generate(model, chat: Chat, prompts: list[list[int]], sampling: SamplingConfig,
             logprobs: bool = False) -> list[Answer]:
    """Generate one answer per prompt, in batches of similar length, returned in the prompts' order; with
    `logprobs`, each comes with the sampler's own log-prob of every answer token."""
    model.eval()
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # less padding per batch
    draw = TokenDraw(sampling.seed, sampling.temperature > 0, logprobs, sampling.draw)
    if sampling.draw == "multinomial":
        torch.manual_seed(sampling.seed)  # transformers' sampling draws from the global generator
    results: dict[int, Answer] = {}
    with neutral_generation_config(unwrap(model), chat):
        for start in range(0, len(order), sampling.batch_size):
            idx = order[start:start + sampling.batch_size]
            batch = collate([Example(prompts[i], prompts[i]) for i in idx], chat.pad_id, side="left")
            width = batch["input_ids"].shape[1]
            ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
            out = model.generate(input_ids=ids, attention_mask=mask, **shared_prompts(model, ids, mask),
                                 **generate_kwargs(chat, sampling, draw))
            lps = draw.result().tolist() if logprobs else None
            for row, i in enumerate(idx):
                ids, finished = chat.cut(out[row, width:].tolist())
                results[i] = Answer(prompts[i], ids, chat.decode(ids), finished,
                                        lps[row][:len(ids)] if lps else None)
    return [results[i] for i in range(len(prompts))]


def shared_prompts(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict:
    """generate's cache argument when prompts repeat in the batch (GRPO's G answers to one prompt): each distinct
    prompt but its last token is encoded once and its keys and values are given to each of its rows, so generate
    only runs the last token and the decoding steps. Nothing when every prompt differs, under FSDP, or for prompts
    of one token."""
    owners = prompt_owners(input_ids, attention_mask)
    if owners is None or input_ids.shape[1] < 2 or not can_share_prefix(model):
        return {}
    cache = prefix_cache(model, input_ids, attention_mask, input_ids.shape[1] - 1, owners)
    return {cache_kwarg(model_body(model)): cache}


@contextmanager
def neutral_generation_config(lm, chat: Chat):
    """While generating, the model's generation config is a blank one with only the stop set: transformers fills
    every unset option from the model's own config, so this is the one way to keep its defaults out."""
    from transformers import GenerationConfig

    saved = lm.generation_config
    lm.generation_config = GenerationConfig(**chat.generation_ids())
    try:
        yield
    finally:
        lm.generation_config = saved


def generate_kwargs(chat: Chat, s: SamplingConfig, draw: TokenDraw) -> dict:
    """Greedy, or pure sampling at temperature T, optionally cut by top-k / top-p.

    transformers appends the warpers it builds itself (temperature, top-k, top-p, min-p, ...) after the processors
    it is given. So the warpers are passed here, as processors, in their usual order, and transformers is asked for
    greedy decoding with nothing else set (it adds no processor of its own): the last processor, `draw`, sees the
    final distribution, draws the token itself and leaves it the only one standing, so greedy takes it."""
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    processors = []
    if s.temperature > 0:
        processors += [TemperatureLogitsWarper(s.temperature)] if s.temperature != 1.0 else []
        processors += [TopKLogitsWarper(s.top_k)] if s.top_k else []
        processors += [TopPLogitsWarper(s.top_p)] if s.top_p < 1.0 else []
    processors += [draw] if draw.sample or draw.record else []
    return {"max_new_tokens": s.max_new_tokens, "do_sample": False, **chat.generation_ids(), "use_cache": True,
            "logits_processor": LogitsProcessorList(processors)}


class TokenDraw:
    """The last logits processor: it draws each step's tokens from the final distribution softmax(scores) by
    inverse CDF — one uniform per row, located in the running sum of the probabilities, which never lands on a
    token of probability 0 — and returns scores in which the drawn token alone is finite, so that transformers'
    greedy step takes it. (torch.multinomial, which transformers' sampling calls, draws an exponential variate
    for every token of the vocabulary: 40 times slower for 16 rows of 49,152 tokens on a CPU.) With `record`, it
    keeps the log-prob of each drawn token (greedy: of the argmax) under that distribution, the sampler's own.
    `method="multinomial"` draws as transformers does instead (torch.multinomial on softmax(scores), the global
    generator), to reproduce samples made that way."""

    def __init__(self, seed: int, sample: bool, record: bool, method: str = "inverse_cdf"):
        self.seed, self.sample, self.record, self.method = seed, sample, record, method
        self.generator, self.drawn = None, []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if not self.sample:
            token = scores.argmax(-1, keepdim=True)  # [B, 1], greedy's own pick
        elif self.method == "multinomial":
            token = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1)
        else:
            token = self.draw(scores)
        if self.record:  # fp32, as the trainer recomputes it
            self.drawn.append(torch.log_softmax(scores.float(), dim=-1).gather(-1, token).squeeze(-1))
        if not self.sample:
            return scores
        return torch.full_like(scores, float("-inf")).scatter_(-1, token, 0.0)

    def draw(self, scores: torch.Tensor) -> torch.Tensor:
        if self.generator is None:  # one stream per call of generate, on the host: the same uniforms on any device
            self.generator = torch.Generator().manual_seed(self.seed)
        u = torch.rand((scores.shape[0], 1), generator=self.generator, dtype=torch.float64)  # [B, 1], steps of 2^-53
        return inverse_cdf(torch.softmax(scores.float(), dim=-1), u.to(scores.device))

    def result(self) -> torch.Tensor:
        """[B, steps] the log-prob of each drawn token (after a sequence finished: of tokens it never keeps),
        and a fresh record for the next batch."""
        drawn, self.drawn = self.drawn, []
        return torch.stack(drawn, 1).cpu() if drawn else torch.zeros(0, 0)


def inverse_cdf(p: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The tokens [B, 1] at which the running sum of the probabilities p [B, V] first exceeds u [B, 1] (float64
    uniforms in [0, 1)) times the total: P(token = i) = p_i / sum(p). The sum runs in float64, so the draw resolves
    2^-53 rather than float32's 2^-24 (which would leave every token below 6e-8 drawn with probability 0 or 6e-8, and
    a total-variation error of about 1e-3 per step on 49k-152k vocabularies); p itself may be fp32 (every token's
    probability within 1e-7 of its own). A float64 scan also never decreases on any device (an fp32 parallel scan
    may wobble by an ulp)."""
    cdf = p.cumsum(-1, dtype=torch.float64)  # [B, V]
    mass = cdf[:, -1:]
    x = torch.minimum(u * mass, torch.nextafter(mass, torch.zeros_like(mass)))  # x < mass: some cdf exceeds it
    token = torch.searchsorted(cdf, x, right=True).clamp(max=p.shape[-1] - 1)  # [B, 1]
    return locate(p, token)


def locate(p: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
    """The drawn tokens [B, 1], each moved to the nearest token at or before it of probability > 0 should the
    search have landed on one of probability 0 (a rounding step of the running sum); scores that are not finite are
    one clear error."""
    bad = ~(p.gather(-1, token) > 0)  # NaN too
    if not bool(bad.any()):  # one host sync a step, as transformers' stopping check already costs
        return token
    if not torch.isfinite(p).all():
        raise ModelError("the model's next-token scores are not finite (NaN or inf): cannot sample from them")
    positions = torch.arange(p.shape[-1], device=p.device).expand_as(p)
    last = torch.where(p > 0, positions, -1).cummax(-1).values  # [B, V] the last positive token at or before
    first = (p > 0).float().argmax(-1, keepdim=True)  # when there is none before: the first positive one
    moved = last.gather(-1, token)
    return torch.where(bad, torch.where(moved >= 0, moved, first), token)
