"""Data parallelism over the processes that `torchrun` or `accelerate launch` starts: nothing of its own to
launch, only what a stage needs to run unchanged on N processes.

    global batch = batch_size × grad_accum × N       each step's micro-batches are dealt out across ranks
    loss of a rank = Σ its examples' losses / (the step's count over all ranks)
    gradients: Σ over ranks, once per optimizer step (so N × B per rank ≡ 1 × N·B in one process)
    metrics: "loss" is summed over ranks (each holds its share), others averaged, counts summed
    rank 0 alone writes logs, progress and checkpoints

LoRA gradients are small (a few MB), so one flat all-reduce per optimizer step costs little, and it works for
every stage alike, PPO's adapter switching and generation included, which a `DistributedDataParallel`
wrapper (whose hooks fire on every backward and which needs every call to go through its forward) does not.

The process group is started from the environment the launchers set (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR/PORT): NCCL on GPUs, gloo on CPU. A single process (no WORLD_SIZE) never touches
torch.distributed.

FSDP (`accelerate launch --use_fsdp`, or ACCELERATE_USE_FSDP=true under torchrun): the frozen base weights are
sharded across ranks with torch's `fully_shard` (one unit per decoder layer, plus the model), so each GPU holds
1/N of them; the LoRA adapters and heads stay whole on every rank and are synchronised as above, so their
optimizer state, clipping and checkpoints are the same as in one process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from llmft.errors import ConfigError


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


_world = World()


def world() -> World:
    return _world


def launched() -> bool:
    """True when a launcher started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init() -> World:
    """Join the process group the launcher prepared (idempotent); a single process stays World()."""
    global _world
    if not launched():
        return _world
    import torch.distributed as dist

    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        raise ConfigError("DeepSpeed is not supported: launch without a DeepSpeed config (DDP) or with "
                          "--use_fsdp (see docs/distributed.md)")
    if not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo")
    _world = World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    return _world


def fsdp() -> bool:
    """True when the launcher asked for FSDP (accelerate sets ACCELERATE_USE_FSDP from --use_fsdp or its config)."""
    return launched() and os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"


def refuse_fsdp(what: str, why: str = "", other: str = "") -> None:
    """One clear error for a feature not offered under FSDP (DDP is fine), before anything is loaded."""
    if fsdp():
        raise ConfigError(f"{what} is not offered under FSDP yet{f' ({why})' if why else ''}; launch without "
                          f"--use_fsdp (DDP){f', or {other}' if other else ''}")


def shard_model(model: torch.nn.Module, lm: torch.nn.Module, device: torch.device) -> int:
    """Under FSDP, shard the frozen weights of `lm` (the transformers model inside `model`) across ranks and move
    what stays whole (adapters, heads) to `device`; otherwise nothing. Every forward must then go through
    `lm` itself (models.forward.hidden_states does), which gathers a unit's shards just before it runs.
    Returns the number of FSDP units (0 when not sharded)."""
    if not fsdp():
        return 0
    from torch.distributed.fsdp import fully_shard

    whole = {p for n, p in model.named_parameters() if p.requires_grad or "lora_" in n}
    layer_types = tuple(getattr(lm, "_no_split_modules", None) or ())
    layers = [m for m in lm.modules() if type(m).__name__ in layer_types]
    for module in layers:
        fully_shard(module, ignored_params=whole)
    fully_shard(lm, ignored_params=whole)
    model.to(device)
    return len(layers) + 1


def device_for(device: torch.device) -> torch.device:
    """The device of this rank: cuda:LOCAL_RANK when the stage runs on CUDA."""
    if device.type == "cuda" and launched():
        return torch.device("cuda", _world.local_rank)
    return device


def shard(micro_batches: list[list[int]]) -> list[list[int]]:
    """This rank's part of one step: every global micro-batch dealt out round-robin (rank r takes r, r+N, ...).
    The plan guarantees each global micro-batch holds at least N examples."""
    w = _world
    return [mb[w.rank::w.size] for mb in micro_batches] if w.size > 1 else micro_batches


def global_sum(x: float | int) -> float | int:
    """Σ over ranks of a number (a count, a partial sum): what every rank divides by."""
    if _world.size == 1:
        return x
    import torch.distributed as dist

    t = torch.tensor([float(x)], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t)
    return float(t.item()) if isinstance(x, float) else int(t.item())


def global_max(x: float) -> float:
    """The largest value of a number over ranks."""
    if _world.size == 1:
        return x
    import torch.distributed as dist

    t = torch.tensor([float(x)], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def global_sum_tensor(t: torch.Tensor) -> torch.Tensor:
    """Σ over ranks of a tensor (same shape on every rank), as a new tensor."""
    if _world.size == 1:
        return t
    import torch.distributed as dist

    out = t.detach().to(_comm_device(), copy=True)
    dist.all_reduce(out)
    return out.to(t.device)


def sync_grads(params: list[torch.nn.Parameter]) -> None:
    """Σ the gradients of `params` over ranks in one flat all-reduce (a rank that saw no example contributes 0)."""
    if _world.size == 1:
        return
    import torch.distributed as dist

    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads]).to(_comm_device())  # NCCL needs it on the GPU
    dist.all_reduce(flat)
    offset = 0
    for p, g in zip(params, grads, strict=True):
        n = g.numel()
        p.grad = flat[offset:offset + n].view_as(g).to(device=g.device, dtype=g.dtype)
        offset += n


def reduce_metrics(metrics: dict[str, float], counts: dict[str, int]) -> tuple[dict[str, float], dict[str, int]]:
    """Every rank's step metrics into the global ones: "loss" summed (each rank's loss is its share of the
    global mean), other metrics averaged, counts summed."""
    if _world.size == 1:
        return metrics, counts
    keys, ckeys = sorted(metrics), sorted(counts)
    t = global_sum_tensor(torch.tensor([metrics[k] for k in keys] + [counts[k] for k in ckeys], dtype=torch.float64,
                                device=_comm_device()))
    n = _world.size
    out = {k: float(t[i]) if k == "loss" else float(t[i]) / n for i, k in enumerate(keys)}
    return out, {k: int(t[len(keys) + i]) for i, k in enumerate(ckeys)}


def on_main(fn):
    """fn() on rank 0 alone; its result on every rank, or the llmft error it raised, raised again on every rank (so
    that no rank is left waiting at the next collective)."""
    if _world.size == 1:
        return fn()
    from llmft import errors
    outcome = None
    if _world.main:
        try:
            outcome = ("ok", fn())
        except errors.LlmftError as e:
            outcome = ("error", type(e).__name__, str(e))
    outcome = broadcast(outcome)
    if outcome[0] == "error":
        raise getattr(errors, outcome[1], errors.LlmftError)(outcome[2])
    return outcome[1]


def broadcast(obj):
    """Rank 0's value of a picklable object, on every rank."""
    if _world.size == 1:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _comm_device() -> torch.device:
    import torch.distributed as dist

    return torch.device("cuda", _world.local_rank) if dist.get_backend() == "nccl" else torch.device("cpu")


def gather(t: torch.Tensor) -> torch.Tensor:
    """Every rank's 1-D tensor (sizes may differ), concatenated in rank order, on every rank."""
    if _world.size == 1:
        return t
    import torch.distributed as dist

    parts = [None] * _world.size
    dist.all_gather_object(parts, t.detach().cpu())
    return torch.cat(parts).to(t.device)


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is true on any: a decision (abort, stop) all ranks must take together."""
    return global_sum(int(flag)) > 0 if _world.size > 1 else flag


def finish() -> None:
    """Wait for every process, then leave the process group (a clean exit under the launchers)."""
    global _world
    if _world.size > 1:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
        _world = World()
