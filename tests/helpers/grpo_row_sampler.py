"""A GRPO sampler seeded per (prompt, answer), for the test that 2 processes × batch B equal 1 process × 2B: the
real sampler draws a whole batch from one random stream, so the split of a step's prompts over processes changes
which answers are drawn. This one draws each answer token by token from the model (no cache: a tiny model), with
a generator seeded by the prompt, the answer's index in its group and the step, whichever process draws it.

    python -m torch.distributed.run --nproc_per_node 2 tests/helpers/grpo_row_sampler.py CONFIG.yaml
"""

from __future__ import annotations

import sys
import zlib

import torch

from llmft.rl.actor_critic import POLICY
from llmft.rollout.experience import pack
from llmft.rollout.generation import Answer


def sample(model, s, prompts: list[list[int]], seed: int):
    model.use(POLICY)
    return pack(answers(model.lm, s.chat, prompts, s.cfg.rollout, seed), s.chat.pad_id, s.device)


def answers(lm, chat, prompts: list[list[int]], sampling, seed: int) -> list[Answer]:
    lm.eval()
    counts: dict[tuple, int] = {}
    gens = []
    for p in prompts:
        k = counts[tuple(p)] = counts.get(tuple(p), -1) + 1
        g = torch.Generator().manual_seed(zlib.crc32(str(p).encode()) + 1000 * k + seed % 100_000_007)
        ids, logps = list(p), []
        for _ in range(sampling.max_new_tokens):
            with torch.no_grad():
                logits = lm(input_ids=torch.tensor([ids])).logits[0, -1].float() / sampling.temperature
            logp = torch.log_softmax(logits, -1)
            token = int(torch.multinomial(logp.exp(), 1, generator=g))
            ids.append(token)
            logps.append(float(logp[token]))
            if token in chat.stop_ids:
                break
        response = ids[len(p):]
        gens.append(Answer(p, response, chat.decode(response), response[-1] in chat.stop_ids, logps))
    return gens


def engine_sample(self, model, prompts: list[list[int]], sampling, logprobs: bool = False) -> list[Answer]:
    """HFEngine.sample, row-seeded: what a multi-turn rollout samples each turn with (sampling.seed holds the
    step's and the turn's seed)."""
    model.use(POLICY)
    return answers(model.lm, self.chat, prompts, sampling, sampling.seed)


if __name__ == "__main__":
    from llmft.config import load_config
    from llmft.rl import engine
    from llmft.stages import grpo

    grpo.sample = sample
    engine.HFEngine.sample = engine_sample
    grpo.run(load_config("grpo", sys.argv[1]))
