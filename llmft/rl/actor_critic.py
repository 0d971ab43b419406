"""The RL stages' roles on one copy of the base weights: several LoRA adapters on one PEFT model.

    policy    = base + adapter "default" (new, trained)       → what RL optimises, saved as the stage output
    value     = base + adapter "value" + value head (trained)  ← initialised from the reward model (PPO's critic;
                                                                  none with critic=False, for GRPO)
    reward    = base + adapter "reward" + reward head (frozen) ← the reward checkpoint, when it shares the base
    reference = base with every adapter disabled               = the SFT model the policy starts from

The base is the policy's source with its own adapter merged (e.g. the SFT output), so "adapters disabled" is
exactly the SFT model. A reward model trained on other base weights cannot share them; the PPO stage then
scores with a separate `RewardScorer` and only the value adapter and head are initialised from it.

Saved layout (a stage output or checkpoint): the policy adapter at the top level — a plain PEFT adapter that
the next stage or `llmft eval` loads like any other — and, with a critic, `value/` (adapter) plus
`value_head.safetensors`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from llmft.checkpoint import HEAD_FILE, load_adapter, save_adapter
from llmft.errors import ModelError
from llmft.models.adapters import unwrap
from llmft.models.forward import hidden_states
from llmft.models.reward_model import last_token_scores, load_head, save_head, scalar_head

POLICY, VALUE, REWARD, REFERENCE = "default", "value", "reward", "reference"
VALUE_HEAD_FILE = "value_head.safetensors"


class ActorCritic(nn.Module):
    def __init__(self, lm, reward_path: str | None, share_reward: bool, critic: bool = True):
        """lm: a PEFT model whose "default" adapter is the new policy adapter. With a critic and a reward checkpoint,
        the value adapter and head start as copies of its adapter and head; with `share_reward` a frozen copy of
        both scores the answers. A critic without a reward checkpoint starts with a zero head: V = 0 for every
        state, so the first advantages are the (whitened) returns. A random head's values, O(|h|/√d), dwarf a 0/1
        reward: on examples/calculator its step-1 value loss was 2.9 and PPO unlearned the tool (measured)."""
        super().__init__()
        self.lm = lm
        d, device = unwrap(lm).config.hidden_size, next(lm.parameters()).device
        self.value_head = scalar_head(d, device) if critic else None
        self.reward_head = None
        if critic and reward_path:
            self._load_adapter(reward_path, VALUE, trainable=True)
            load_head(self.value_head, Path(reward_path) / HEAD_FILE)
        elif critic:  # no reward model: a fresh critic with the policy's LoRA settings, predicting 0 everywhere
            lm.add_adapter(VALUE, lm.peft_config[POLICY])
            nn.init.zeros_(self.value_head.weight)
        if reward_path and share_reward:
            self._load_adapter(reward_path, REWARD, trainable=False)
            self.reward_head = scalar_head(d, device).requires_grad_(False)
            load_head(self.reward_head, Path(reward_path) / HEAD_FILE)
        self.trainable = (POLICY, VALUE) if critic else (POLICY,)
        self.use(POLICY)

    def _load_adapter(self, path: str, name: str, trainable: bool) -> None:
        try:
            self.lm.load_adapter(path, adapter_name=name, is_trainable=trainable)
        except Exception as e:  # noqa: BLE001
            raise ModelError(f"cannot load the adapter of reward model {path} onto the policy's base: {e}") from None

    # -------------------------------------------------------------------------------------------- roles
    def use(self, role: str) -> None:
        """Make `role`'s adapter the active one; the policy and value adapters stay trainable, the reward one
        frozen (PEFT's set_adapter alone would freeze every inactive adapter)."""
        self.lm.set_adapter(role, inference_mode=True)
        self.lm.set_requires_grad(list(self.trainable), True)

    @contextmanager
    def role(self, role: str) -> Iterator[None]:
        """Inside, the model is `role` (REFERENCE: every adapter off); the policy again after. A loss's backward
        must run inside the same block as its forward: with gradient checkpointing, backward recomputes each layer's
        forward under whatever adapter is active then (PyTorch checks only shapes; peft issue #2832)."""
        if role == REFERENCE:
            with self.lm.disable_adapter():
                yield
            return
        self.use(role)
        try:
            yield
        finally:
            self.use(POLICY)

    def hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, start: int = 0,
               owners: torch.Tensor | None = None) -> torch.Tensor:
        """Last hidden states [B, T − start, d] under the active role (`forward.hidden_states`)."""
        return hidden_states(self.lm, input_ids, attention_mask, start, owners)

    def values(self, hidden: torch.Tensor) -> torch.Tensor:
        """The value head, fp32: [..., d] → [...]."""
        with torch.autocast(hidden.device.type, enabled=False):
            return self.value_head(hidden.float()).squeeze(-1)

    @torch.no_grad()
    def rewards(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The shared reward model's scores [B] at each sequence's last real token."""
        with self.role(REWARD):
            return last_token_scores(self.reward_head, self.hidden(input_ids, attention_mask), attention_mask)

    # --------------------------------------------------------------------------------------------- saving
    def save_pretrained(self, directory: Path) -> None:
        directory = Path(directory)
        save_adapter(self.lm, directory, selected_adapters=[POLICY])  # "default" → the top level
        if self.value_head is not None:
            save_adapter(self.lm, directory, selected_adapters=[VALUE])  # → directory/value/
            save_head(self.value_head, directory / VALUE_HEAD_FILE)

    def load_trained(self, directory: Path) -> None:
        """Policy (and critic: value adapter and head) from a checkpoint, for resuming."""
        directory = Path(directory)
        load_adapter(directory, self.lm)
        if self.value_head is not None:
            load_adapter(directory / VALUE, self.lm, adapter_name=VALUE)
            load_head(self.value_head, directory / VALUE_HEAD_FILE)
