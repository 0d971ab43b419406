"""Loss maths against values worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from llmft.maths.losses import (
    dpo_hinge,
    dpo_robust,
    dpo_sigmoid,
    ipo_loss,
    kto_loss,
    kto_reference_point,
    orpo_loss,
    pairwise_accuracy,
    ppo_policy_loss,
    ppo_value_loss,
    preference_loss,
    reward_loss,
    sft_loss,
    simpo_loss,
    token_logps,
)


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


DELTA = torch.tensor([1.0, -2.0])  # with β = 0.5: βΔ = 0.5 and −1


@pytest.mark.parametrize("fn, expected", [
    (lambda: dpo_sigmoid(DELTA, 0.5), [0.474077, 1.313262]),  # log(1+e^-0.5), log(1+e^1)
    (lambda: dpo_sigmoid(DELTA, 0.5, 0.1), [0.9 * 0.474077 + 0.1 * 0.974077, 0.9 * 1.313262 + 0.1 * 0.313262]),
    (lambda: dpo_robust(DELTA, 0.5, 0.1), [(0.9 * 0.474077 - 0.1 * 0.974077) / 0.8,
                                           (0.9 * 1.313262 - 0.1 * 0.313262) / 0.8]),
    (lambda: dpo_hinge(DELTA, 0.5), [0.5, 2.0]),  # max(0, 1 − βΔ)
    (lambda: ipo_loss(DELTA, 0.5), [0.0, 9.0]),  # (Δ̄ − 1/(2β))² with 1/(2β) = 1
    (lambda: simpo_loss(torch.tensor([-1.0]), torch.tensor([-2.0]), 2.0, 0.5), [0.201413]),  # log(1+e^-1.5)
    # p_c = 1/2 → log odds 0; p_r = 1/4 → log odds −log 3; −log σ(log 3) = log(4/3)
    (lambda: orpo_loss(torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)]), 0.1),
     [math.log(2) + 0.1 * math.log(4 / 3)]),
])
def test_each_loss_matches_hand_derived_values(fn, expected):
    assert fn().tolist() == pytest.approx(expected, abs=1e-5)


def test_rpo_adds_the_chosen_per_token_nll():
    from llmft.maths.losses import with_chosen_nll

    # chosen log-prob −6 over 3 tokens → NLL 2 per token; α = 0.5 adds 1
    assert with_chosen_nll(torch.tensor([0.3]), torch.tensor([-6.0]), torch.tensor([3.0]), 0.5).item() == \
        pytest.approx(1.3)


def test_dispatch_uses_summed_ratios_or_per_token_averages():
    logps, ref = torch.tensor([[-4.0], [-6.0]]), torch.tensor([[-6.0], [-4.0]])  # ρ_c = 2, ρ_r = −2
    counts = torch.tensor([[2.0], [4.0]])
    assert preference_loss("sigmoid", logps, ref, counts, 0.5).item() == pytest.approx(math.log1p(math.exp(-2)))
    # IPO: per-token ratios 2/2 = 1 and −2/4 = −0.5 → Δ̄ = 1.5; (1.5 − 1)² = 0.25
    assert preference_loss("ipo", logps, ref, counts, 0.5).item() == pytest.approx(0.25)
    # SimPO ignores the reference: averages −2 and −1.5 → β·(−0.5) − γ
    expected = math.log1p(math.exp(-(2.0 * -0.5 - 0.5)))
    assert preference_loss("simpo", logps, None, counts, 2.0, gamma=0.5).item() == pytest.approx(expected)


R_C, R_R = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 1.0])  # pair 1 ranked right (+2), pair 2 wrong (-1)


@pytest.mark.parametrize("kind, margin, center, expected", [
    ("bradley_terry", 0.0, 0.0, (0.126928 + 1.313262) / 2),  # log(1+e^-2), log(1+e^1)
    ("bradley_terry", 1.0, 0.0, (0.313262 + 2.126928) / 2),  # log(1+e^-1), log(1+e^2)
    ("bradley_terry", 0.0, 0.01, (0.126928 + 1.313262) / 2 + 0.01 * (4 + 1) / 2),  # + c·(r_c + r_r)²
    ("hinge", 1.0, 0.0, (0.0 + 2.0) / 2),  # max(0, 1 - 2), max(0, 1 + 1)
])
def test_reward_loss_matches_hand_derived_values(kind, margin, center, expected):
    assert reward_loss(R_C, R_R, 2, kind, margin, center).item() == pytest.approx(expected, abs=1e-5)


def test_per_pair_margins_and_accumulation_over_micro_batches():
    m = torch.tensor([1.0, 0.0])  # only pair 1 carries a margin
    full = reward_loss(R_C, R_R, 2, margin=m)
    assert full.item() == pytest.approx((0.313262 + 1.313262) / 2, abs=1e-5)
    halves = reward_loss(R_C[:1], R_R[:1], 2, margin=m[:1]) + reward_loss(R_C[1:], R_R[1:], 2, margin=m[1:])
    assert halves.item() == pytest.approx(full.item(), abs=1e-7)


def test_pairwise_accuracy_counts_ties_as_wrong():
    assert pairwise_accuracy(R_C, R_R) == 0.5
    assert pairwise_accuracy(torch.tensor([1.0, 1.0]), torch.tensor([1.0, 0.0])) == 0.5


def test_kto_loss_by_hand():
    r, z0 = torch.tensor([0.5, -0.2, 1.0]), torch.tensor(0.3)
    desirable = torch.tensor([True, False, False])
    # desirable: 1 − σ(0.1·(0.5 − 0.3)) = 1 − σ(0.02) = 0.4950002; undesirable, λ_U = 2:
    # 2·(1 − σ(0.1·(0.3 + 0.2))) = 2·(1 − σ(0.05)) = 0.9750052 and 2·(1 − σ(0.1·(0.3 − 1.0))) = 2·(1 − σ(−0.07))
    # = 1.0349857
    losses = kto_loss(r, z0, desirable, beta=0.1, desirable_weight=1.0, undesirable_weight=2.0)
    torch.testing.assert_close(losses, torch.tensor([0.4950002, 0.9750052, 1.0349857]))
    assert float(kto_reference_point(torch.tensor(0.9), 3)) == pytest.approx(0.3)
    assert float(kto_reference_point(torch.tensor(-0.6), 3)) == 0.0  # an estimate below 0 is no KL: clamped


def test_clipped_policy_loss_by_hand():
    # ratios e^0 = 1 and e^{0.5} = 1.6487 with ε = 0.2; advantages 1 and 2
    logps, old = torch.tensor([[0.0, 0.5]]), torch.zeros(1, 2)
    loss, st = ppo_policy_loss(logps, old, torch.tensor([[1.0, 2.0]]), torch.ones(1, 2), 2, 0.2)
    # token 1: max(−1·1, −1·1) = −1; token 2: max(−2·1.6487, −2·1.2) = −2.4 (clipped) → mean −1.7
    assert loss.item() == pytest.approx(-1.7)
    assert st["clip_ratio/region"] == pytest.approx(0.5)
    assert st["approx_kl"] == pytest.approx(0.5 * 0.25 / 2)


def test_clipped_value_loss_by_hand():
    values, old, returns = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    loss, clipfrac = ppo_value_loss(values, old, returns, torch.ones(1, 2), 2, 0.2)
    # token 1: V clipped to 0.2: max(1², 0.2²) = 1; token 2: unchanged: 1 → 0.5 · (1 + 1) / 2
    assert loss.item() == pytest.approx(0.5)
    assert clipfrac == 0.0
