"""The step plan: the same steps as drawing every epoch up front, made only when asked for, so that a plan of any
length (train.max_steps up to 2³¹ − 1) costs nothing until it runs."""

from __future__ import annotations

import math
import time

import pytest
import torch

from llmft.run.plan import plan_steps


def eager(n, batch_size, grad_accum, epochs, max_steps, seed, min_batch=1):
    """Every epoch's permutation drawn up front (how the plan was built until 2026-12-06)."""
    micro_per_epoch = n // batch_size + (n % batch_size >= min_batch)
    per_epoch = math.ceil(micro_per_epoch / grad_accum)
    steps = []
    for epoch in range(math.ceil(max_steps / per_epoch) if max_steps else epochs):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        micro = [order[i:i + batch_size] for i in range(0, n, batch_size)][:micro_per_epoch]
        steps += [micro[i:i + grad_accum] for i in range(0, len(micro), grad_accum)]
    return steps[:max_steps] if max_steps else steps


@pytest.mark.parametrize("args", [(10, 3, 1, 2, None, 0), (10, 3, 2, 3, None, 1), (10, 3, 2, 1, 7, 5),
                                  (9, 2, 3, 4, None, 0, 2), (8, 4, 1, 1, 1, 3), (5, 2, 2, 2, 11, 0, 2)])
def test_the_plan_is_the_plan_drawn_up_front(args):
    plan = plan_steps(*args)
    assert list(plan.steps) == eager(*args) and plan.num_steps == len(eager(*args))
    assert plan.steps[-1] == eager(*args)[-1] and plan.steps[1:3] == eager(*args)[1:3]
    with pytest.raises(IndexError):
        plan.steps[plan.num_steps]


def test_a_plan_of_two_billion_steps_costs_nothing_until_it_runs():
    start = time.perf_counter()
    plan = plan_steps(2, 1, 1, 1, 2**31 - 1, 0)
    last = plan.steps[plan.num_steps - 1]
    assert plan.num_steps == 2**31 - 1 and len(last) == 1 and time.perf_counter() - start < 1.0
    assert last == eager(2, 1, 1, 1, 3, 2**30 - 1)[0]  # step 2³¹ − 2 is the first of epoch 2³⁰ − 1
