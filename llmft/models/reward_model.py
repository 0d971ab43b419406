"""The reward model, and the scoring API that `llmft eval` (and PPO) use.

    r(x, y) = w · h(x ⊕ y)[last real token] + b        computed in fp32
    w ~ N(0, σ = 1/sqrt(d + 1)), b = 0 at initialisation (σ is the standard deviation)

`h` is the last hidden state of the causal LM body (the LM head is never run). A reward checkpoint is a
PEFT adapter plus `reward_head.safetensors` in the same folder; loading one whose head is missing or does
not fit the model is an error, never a freshly initialised head.

Scoring:

    from llmft.models.reward_model import RewardScorer
    scorer = RewardScorer.load("runs/reward")                     # device="auto" | "cpu" | "cuda"
    scorer.score(["Describe a lighthouse."], ["A lighthouse is a tall tower ..."])   # tensor [1]

Prompts are strings or chat messages; answers are finished (they end with the chat template's turn
terminator, as in training: `llmft.data.chat`). `score_ids` takes token ids directly (the tokenizer must be the
reward model's own).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from llmft.checkpoint import HEAD_FILE, load_adapter, save_adapter
from llmft.config import ModelConfig
from llmft.data.examples import Example, collate
from llmft.errors import ModelError
from llmft.models.adapters import disable_dropout, unwrap
from llmft.models.forward import hidden_states, last_token_index
from llmft.models.loading import load_chat, load_model, merged_adapter, resolve_device, resolve_dtype
from llmft.models.sources import resolve_source


class RewardModel(nn.Module):
    """A causal LM (usually with a LoRA adapter) and a scalar head on the last real token's hidden state."""

    def __init__(self, lm, packed: bool = False):
        super().__init__()
        self.lm, self.packed = lm, packed  # packed: padding-free forwards (`forward.packed_states`)
        self.head = scalar_head(unwrap(lm).config.hidden_size, next(lm.parameters()).device)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Rewards [B] (fp32) of right- or left-padded sequences."""
        hidden = hidden_states(self.lm, input_ids, attention_mask, packed=self.packed)
        return last_token_scores(self.head, hidden, attention_mask)

    def pair_scores(self, batch: dict) -> torch.Tensor:
        """Rewards [2B] (chosen first) of pairs packed with each prompt once (`llmft.models.pairpack`)."""
        from llmft.models.pairpack import pair_states

        last = pair_states(self.lm, batch)[batch["tree_last"]]  # [2B, d]
        with torch.autocast(last.device.type, enabled=False):
            return self.head(last.float()).squeeze(-1)

    def save_pretrained(self, directory: Path) -> None:
        save_adapter(self.lm, directory)
        save_head(self.head, Path(directory) / HEAD_FILE)

    def load_trained(self, directory: Path) -> None:
        """Adapter and head from a checkpoint or stage output (for resuming)."""
        load_adapter(Path(directory), self.lm)
        self.load_head(Path(directory))

    def load_head(self, directory: Path) -> None:
        load_head(self.head, Path(directory) / HEAD_FILE)


def scalar_head(d: int, device) -> nn.Linear:
    """A fresh fp32 head d → 1: weights N(0, σ = 1/sqrt(d + 1)), bias 0."""
    head = nn.Linear(d, 1, dtype=torch.float32, device=device)
    nn.init.normal_(head.weight, std=1 / math.sqrt(d + 1))
    nn.init.zeros_(head.bias)
    return head


def last_token_scores(head: nn.Linear, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The head (fp32) on each row's last real token: hidden [B, T, d] → [B]."""
    last = hidden[torch.arange(hidden.shape[0], device=hidden.device), last_token_index(attention_mask)]
    with torch.autocast(hidden.device.type, enabled=False):
        return head(last.float()).squeeze(-1)


def save_head(head: nn.Linear, path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous().cpu() for k, v in head.state_dict().items()}, str(path),
              metadata={"hidden_size": str(head.in_features)})


def load_head(head: nn.Linear, path: Path) -> None:
    """Weights saved by `save_head` into `head`; a missing file or a shape mismatch is an error, never a
    silently re-initialised head."""
    from safetensors.torch import load_file

    if not path.is_file():
        raise ModelError(f"{path.parent} has no {path.name}: it is not a complete reward model (refusing to "
                         f"score with a randomly initialised head)")
    weights = load_file(str(path), device=str(head.weight.device))
    expected = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in weights.items()}
    if found != expected:
        raise ModelError(f"{path}: the head does not fit this model (found {found}, expected {expected})")
    head.load_state_dict(weights)


def load_reward_model(source, dtype: torch.dtype, device, model_cfg: ModelConfig) -> RewardModel:
    """A reward run (stage output `source`) as a RewardModel: its base with the run's adapter merged, and its head;
    dropout off."""
    model = RewardModel(merged_adapter(load_model(source.base, dtype, device, model_cfg), source))
    model.load_head(Path(source.path))
    disable_dropout(model)
    return model


class RewardScorer:
    """A trained reward model, ready to score (prompt, answer) batches; no gradients, dropout off."""

    def __init__(self, model: RewardModel, chat, batch_size: int = 16, path: str = ""):
        self.model, self.chat, self.batch_size, self.path = model.eval(), chat, batch_size, path
        self.device = next(model.parameters()).device

    @classmethod
    def load(cls, path: str, device: str = "auto", dtype: str = "auto", batch_size: int = 16) -> RewardScorer:
        source = resolve_source(path)
        if source.kind != "stage" or source.manifest.get("stage") != "reward":
            stage = source.manifest.get("stage") if source.manifest else None
            raise ModelError(f"{path} is not a reward model (an llmft reward output); "
                             f"it is {f'an llmft {stage} output' if stage else f'a {source.kind} model'}")
        dev = resolve_device(device)
        # pickled weights: the user's call; a QLoRA run is scored on its base de-quantised (`merged_adapter`)
        model_cfg = ModelConfig(**{**source.manifest["config"]["model"], "allow_pickle": False, "quantization": None})
        return cls(load_reward_model(source, resolve_dtype(dtype, dev), dev, model_cfg), load_chat(source),
                   batch_size, path)

    @torch.no_grad()
    def score_ids(self, sequences: list[list[int]]) -> torch.Tensor:
        """Rewards [N] (fp32, on CPU) of token-id sequences (prompt + answer, as the model saw them)."""
        out = []
        for i in range(0, len(sequences), self.batch_size):
            batch = collate([Example(s, s) for s in sequences[i:i + self.batch_size]], self.chat.pad_id)
            out.append(self.model(batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)))
        return torch.cat(out).float().cpu() if out else torch.zeros(0)

    def score(self, prompts: list[str | list[dict]], answers: list[str]) -> torch.Tensor:
        """Rewards [N] of finished answers to prompts (strings or chat messages)."""
        if len(prompts) != len(answers):
            raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
        seqs = []
        for p, r in zip(prompts, answers, strict=True):
            prompt_ids, answer_ids = self.chat.encode([{"role": "user", "content": p}] if isinstance(p, str) else p, r)
            seqs.append(prompt_ids + answer_ids)
        return self.score_ids(seqs)

