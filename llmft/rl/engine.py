"""The RL stages' rollout engine: what samples the policy's answers (rollout.engine), and for vLLM the proof that
it samples the policy being trained.

    engine = rollout_engine(s, model)          # hf: llmft's sampler on the model itself; vllm: its own process
    answers = engine.sample(model, prompts, sampling, logprobs=True)

The vLLM engine holds a full-precision copy of the policy's base (`engine_model.engine_model_dir`; for QLoRA the
dequantised base the trainer computes with). Before each rollout whose policy differs from the engine's (a digest of
the policy's LoRA tensors changed: every optimizer step), the adapter is written to output_dir/engine/ and reaches
the engine as rollout.vllm.sync says: merged (the engine reloads base + s·B·A in place; the trainer's 4-bit weights
are never touched) or as an adapter under a new id. Then the engine's log-probs of a probe sequence (the longest of
the first training prompts) must equal the trainer's within the log-prob tolerance, or the run stops: an engine
sampling a stale policy (LoRA weights that never reached it) cannot go unnoticed.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import torch

from llmft import distributed
from llmft.checkpoint import save_adapter
from llmft.errors import ConfigError, TrainingAborted
from llmft.rl.actor_critic import POLICY, ActorCritic
from llmft.rollout.engine_model import engine_model_dir
from llmft.rollout.generation import Answer, generate
from llmft.rollout.vllm_engine import VLLMEngine


class HFEngine:
    name = "hf"

    def __init__(self, chat):
        self.chat = chat

    def sample(self, model: ActorCritic, prompts: list[list[int]], sampling, logprobs: bool = False) -> list[Answer]:
        model.use(POLICY)
        return generate(model.lm, self.chat, prompts, sampling, logprobs=logprobs)

    def metrics(self) -> dict:
        return {}

    def close(self) -> None:
        pass


class VLLMPolicyEngine:
    name = "vllm"

    def __init__(self, engine: VLLMEngine, directory: Path, probe_ids: list[int], tolerance: float, merged: bool):
        self.engine, self.directory, self.probe_ids, self.tolerance = engine, directory, probe_ids, tolerance
        self.merged, self.version, self.digest, self.adapter, self.probe_gap = merged, 0, None, None, 0.0

    def sample(self, model: ActorCritic, prompts: list[list[int]], sampling, logprobs: bool = False) -> list[Answer]:
        self.sync(model)
        return self.engine.generate(prompts, sampling, logprobs, self.adapter)

    def sync(self, model: ActorCritic) -> None:
        """Give the engine the policy when it changed since the last sync (merged into its weights, or as an adapter),
        and check that it took it."""
        digest = lora_digest(model)
        if not distributed.any_rank(digest != self.digest):
            return
        self.version += 1
        path = self.directory / f"adapter-{self.version}"
        save_adapter(model.lm, path, selected_adapters=[POLICY])
        if self.merged:
            self.engine.merge(path)
        else:
            self.adapter = (f"policy-{self.version}", self.version, str(path))
        self.check(model)
        self.digest = digest
        for old in self.directory.glob("adapter-*"):
            if old != path:
                shutil.rmtree(old, ignore_errors=True)

    def check(self, model: ActorCritic) -> None:
        """The engine's log-probs of the probe against the trainer's, for this version of the policy."""
        engine = self.engine.probe(self.probe_ids, self.adapter)
        trainer = probe_logps(model, self.probe_ids)
        self.probe_gap = float((engine - trainer).abs().max())
        if self.probe_gap > self.tolerance:
            raise TrainingAborted(
                f"the policy's weights did not reach the vLLM engine: after sync {self.version} its log-probs of a "
                f"probe sequence differ from the trainer's by up to {self.probe_gap:.3g} per token (tolerance "
                f"{self.tolerance:g}); it would sample another policy than the one trained. Its log: {self.engine.log}")

    def metrics(self) -> dict:
        """engine/probe_gap: the largest per-token gap of the last sync's probe (the weights reached the engine)."""
        return {"engine/probe_gap": self.probe_gap, "engine/syncs": float(self.version)}

    def close(self) -> None:
        self.engine.close()


def lora_digest(model: ActorCritic) -> str:
    """sha256 of the policy adapter's LoRA tensors (names and bytes), on the host."""
    h = hashlib.sha256()
    for name, p in model.lm.named_parameters():
        if f".{POLICY}." in name and "lora_" in name:
            h.update(name.encode())
            h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


@torch.no_grad()
def probe_logps(model: ActorCritic, ids: list[int]) -> torch.Tensor:
    """The trainer's log p(ids[t] | ids[:t]) for t ≥ 1 under the policy, at temperature 1, fp32 [n − 1]."""
    device = next(model.lm.parameters()).device
    was_training = model.training
    model.eval()
    with model.role(POLICY):
        logits = model.lm(input_ids=torch.tensor([ids], device=device)).logits[0, :-1].float()
    model.train(was_training)
    target = torch.tensor(ids[1:], device=device)
    return torch.log_softmax(logits, -1).gather(-1, target[:, None])[:, 0].double().cpu()


def rollout_engine(s, model: ActorCritic):
    """The engine rollout.engine names, started (vLLM: its process, the policy's base loaded, room for its LoRA)."""
    if s.cfg.rollout.engine == "hf":
        return HFEngine(s.chat)
    check_vllm_config(s)
    rank = distributed.world().rank
    out = Path(s.cfg.output_dir)
    directory = out / "engine" / f"rank{rank}"  # the adapters it is given; its log beside: engine/rank0.log
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    model_dir = engine_model_dir(s.source, s.cfg.model, s.dtype, s.chat.tokenizer)
    answer_room = s.cfg.env.max_tokens if s.cfg.env.name else s.cfg.rollout.max_new_tokens
    max_len = s.cfg.data.max_prompt_length + answer_room + 1
    merged = s.cfg.rollout.vllm.sync == "merged"
    engine = VLLMEngine.start(model_dir, s.chat, s.dtype, s.device, s.cfg.rollout.vllm,
                              out / "engine" / f"rank{rank}.log", max_len, None if merged else s.cfg.lora.r)
    probe = max(s.train.ids[:8], key=len)[:64]
    algo = getattr(s.cfg, "grpo", None) or s.cfg.ppo
    return VLLMPolicyEngine(engine, directory, probe, gap_tolerance(s, algo.logprob_gap_tolerance), merged)


def gap_tolerance(s, configured: float | None) -> float:
    """The configured tolerance, else the default for the device and dtype: exact fp32 on the CPU agrees to ~1e-6
    per token (either engine); TF32 and 16-bit kernels on a GPU differ more."""
    return configured or default_gap_tolerance(s.device, s.dtype)


def default_gap_tolerance(device: torch.device, dtype: torch.dtype) -> float:
    return 1e-3 if device.type == "cpu" and dtype == torch.float32 else 0.05


def check_vllm_config(s) -> None:
    distributed.refuse_fsdp("rollout.engine: vllm", "each process would need the whole adapter", "use engine: hf")
    if s.chat.added_ids:
        raise ConfigError("rollout.engine: vllm cannot hold the embedding rows a chat template added; use engine: hf")
