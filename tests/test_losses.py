"""Loss maths against values worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from llmft.maths.losses import sft_loss, token_logps


def test_token_logps_by_hand():
    # two positions over a 3-token vocabulary: log(1/3) and log(e²/(e²+2)); at T = 2, log(e/(e+2))
    logits = torch.tensor([[0.0, 0.0, 0.0], [2.0, 0.0, 0.0]])
    targets = torch.tensor([1, 0])
    expected = [-math.log(3), 2 - math.log(math.exp(2) + 2)]
    assert token_logps(logits, targets).tolist() == pytest.approx(expected, rel=1e-6)
    assert float(token_logps(logits, targets, 2.0)[1]) == pytest.approx(1 - math.log(math.e + 2), rel=1e-6)


def test_sft_loss_is_token_mean_over_the_accumulated_batch():
    # micro-batch A has 1 token, B has 3; the step's mean weights all 4 tokens equally
    a = torch.tensor([-math.log(2)])  # log-probs of A's token: nll ln 2
    b = torch.tensor([-math.log(2)] * 3)  # nll 3 ln 2
    total = sft_loss(a, 4) + sft_loss(b, 4)
    assert math.isclose(float(total), math.log(2), rel_tol=1e-6)
    # the mean of micro-batch means would also be ln 2 here; make the tokens differ to tell them apart
    b = torch.tensor([math.log(3 / 4)] * 3)  # p = 3/4 → nll ln(4/3) each
    total = sft_loss(a, 4) + sft_loss(b, 4)
    assert math.isclose(float(total), (math.log(2) + 3 * math.log(4 / 3)) / 4, rel_tol=1e-6)
    wrong = (math.log(2) + math.log(4 / 3)) / 2
    assert not math.isclose(float(total), wrong, rel_tol=1e-3)


def test_loss_is_fp32_even_for_bf16_logits():
    logits = torch.randn(5, 7).to(torch.bfloat16)
    assert token_logps(logits, torch.zeros(5, dtype=torch.long)).dtype == torch.float32


def test_log1mexp_is_accurate_where_one_minus_exp_cancels():
    from llmft.maths.losses import log1mexp, orpo_loss

    x = torch.tensor([-1e-9, -1e-6, -0.5, -0.7, -5.0, -50.0], dtype=torch.float64)
    expected = [math.log(-math.expm1(v)) for v in x.tolist()]
    assert log1mexp(x.float()).double().tolist() == pytest.approx(expected, rel=1e-5)
    # the old clamp at 1 − 1e-7 made every p ≥ 1 − 1e-7 the same: −16.1 instead of log(1e-9) = −20.7
    assert log1mexp(torch.tensor([-1e-9])).item() == pytest.approx(math.log(1e-9), rel=1e-5)
    certain = torch.tensor([0.0], requires_grad=True)  # avg log-prob 0: the model is certain of its answer
    loss = orpo_loss(certain, torch.tensor([-1.0]), 0.1)
    loss.backward()
    assert torch.isfinite(loss).all() and torch.isfinite(certain.grad).all()
