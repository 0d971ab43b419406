"""Which examples each optimizer step sees: the step plan, a pure function of the config (resume needs only
the step number), and the chunking of a batch into micro-batches."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from llmft import distributed


@dataclass
class StepPlan:
    """Which examples every optimizer step sees: steps[s] = micro-batches, each a list of example indices.

    The order of epoch e is a permutation drawn from `seed + e`, so the plan is a pure function of the
    config: a resumed run picks it up at step s with nothing more than s. Steps are made when asked for (an epoch at
    a time), so a plan of any length costs nothing until it runs.
    """

    steps: Steps
    steps_per_epoch: int

    @property
    def num_steps(self) -> int:
        return len(self.steps)

    def epoch_of(self, step: int) -> float:
        return step / self.steps_per_epoch


@dataclass(frozen=True)
class Steps(Sequence):
    """The plan's steps as a sequence: step s of epoch s // per_epoch, its order drawn from seed + epoch."""

    n: int  # examples
    batch_size: int  # examples per micro-batch
    grad_accum: int  # micro-batches per step
    micro_per_epoch: int
    per_epoch: int  # steps per epoch
    length: int  # steps in all
    seed: int

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, s):
        if isinstance(s, slice):
            return [self[i] for i in range(*s.indices(self.length))]
        if not -self.length <= s < self.length:
            raise IndexError(f"step {s} of a plan of {self.length}")
        epoch, k = divmod(s % self.length, self.per_epoch)
        return self.epoch(epoch)[k * self.grad_accum:(k + 1) * self.grad_accum]

    @functools.lru_cache(maxsize=2)  # noqa: B019 — a frozen value object: its cache lives as long as it does
    def epoch(self, e: int) -> list[list[int]]:
        """The micro-batches of epoch e."""
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + e)).tolist()
        return [order[i:i + self.batch_size] for i in range(0, self.n, self.batch_size)][:self.micro_per_epoch]


def plan_steps(n: int, batch_size: int, grad_accum: int, epochs: int, max_steps: int | None,
               seed: int, min_batch: int = 1) -> StepPlan:
    """`batch_size` is the global micro-batch (per process × processes). An epoch's last micro-batch with
    fewer than `min_batch` examples (the number of processes: each must get one) is dropped."""
    micro_per_epoch = n // batch_size + (n % batch_size >= min_batch)
    per_epoch = math.ceil(micro_per_epoch / grad_accum)
    length = (max_steps if max_steps else epochs * per_epoch) if per_epoch else 0
    return StepPlan(Steps(n, batch_size, grad_accum, micro_per_epoch, per_epoch, length, seed), per_epoch)


def plan_for(cfg: Any, n: int, min_rows: int = 1) -> StepPlan:
    """The step plan of a stage config over `n` training examples; a micro-batch of the plan is
    train.batch_size on each of the data-parallel processes (an epoch's last one kept when each gets `min_rows`)."""
    tr, procs = cfg.train, distributed.world().size
    return plan_steps(n, tr.batch_size * procs, tr.grad_accum, tr.epochs, tr.max_steps, cfg.seed, procs * min_rows)


def chunks(seq, size: int) -> list[list[int]]:
    seq = list(seq)
    return [seq[i:i + size] for i in range(0, len(seq), size)]
