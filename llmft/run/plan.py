"""Which examples each optimizer step sees: the step plan, a pure function of the config (resume needs only
the step number), and the chunking of a batch into micro-batches."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from llmft import distributed


@dataclass
class StepPlan:
    """Which examples every optimizer step sees: steps[s] = micro-batches, each a list of example indices.

    The order of epoch e is a permutation drawn from `seed + e`, so the plan is a pure function of the
    config: a resumed run picks it up at step s with nothing more than s.
    """

    steps: list[list[list[int]]]
    steps_per_epoch: int

    @property
    def num_steps(self) -> int:
        return len(self.steps)

    def epoch_of(self, step: int) -> float:
        return step / self.steps_per_epoch


def plan_steps(n: int, batch_size: int, grad_accum: int, epochs: int, max_steps: int | None,
               seed: int, min_batch: int = 1) -> StepPlan:
    """`batch_size` is the global micro-batch (per process × processes). An epoch's last micro-batch with
    fewer than `min_batch` examples (the number of processes: each must get one) is dropped."""
    micro_per_epoch = n // batch_size + (n % batch_size >= min_batch)
    per_epoch = math.ceil(micro_per_epoch / grad_accum)
    n_epochs = math.ceil(max_steps / per_epoch) if max_steps else epochs
    steps = []
    for epoch in range(n_epochs):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        micro = [order[i:i + batch_size] for i in range(0, n, batch_size)][:micro_per_epoch]
        steps += [micro[i:i + grad_accum] for i in range(0, len(micro), grad_accum)]
    return StepPlan(steps[:max_steps] if max_steps else steps, per_epoch)


def plan_for(cfg: Any, n: int, min_rows: int = 1) -> StepPlan:
    """The step plan of a stage config over `n` training examples; a micro-batch of the plan is
    train.batch_size on each of the data-parallel processes (an epoch's last one kept when each gets `min_rows`)."""
    tr, procs = cfg.train, distributed.world().size
    return plan_steps(n, tr.batch_size * procs, tr.grad_accum, tr.epochs, tr.max_steps, cfg.seed, procs * min_rows)


def chunks(seq, size: int) -> list[list[int]]:
    seq = list(seq)
    return [seq[i:i + size] for i in range(0, len(seq), size)]
