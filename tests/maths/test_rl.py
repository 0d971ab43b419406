"""The critic-free maths by hand: group-relative and leave-one-out advantages, zero-std groups, the clipped surrogate
with clip-higher, per-token and per-sequence ratios, k3 in the loss, and each loss aggregation."""

from __future__ import annotations

import math

import pytest
import torch

from llmft.maths.losses import clipped_surrogate, grpo_policy_loss
from llmft.maths.rl import (
    KLController,
    RunningMoments,
    gae,
    group_advantages,
    kl_per_token,
    rloo_advantages,
    shaped_rewards,
    turn_rewards,
    whiten,
    zero_std_groups,
)

SCORES = torch.tensor([1.0, 2.0, 3.0, 4.0])  # two groups of two answers


def close(t: torch.Tensor, expected, atol: float = 1e-6) -> None:
    torch.testing.assert_close(t, torch.as_tensor(expected, dtype=t.dtype), atol=atol, rtol=0)


def test_group_advantages_by_hand():
    # each group: mean 1.5 / 3.5, centred ±0.5; its unbiased std √(2 · 0.25 / 1) = 0.70711
    close(group_advantages(SCORES, 2, "group", eps=0.0), [-0.5 / 0.70710678, 0.5 / 0.70710678] * 2)
    close(group_advantages(SCORES, 2, "none"), [-0.5, 0.5, -0.5, 0.5])  # Dr. GRPO: no division
    # the batch's std: √((2.25 + 0.25 + 0.25 + 2.25) / 3) = 1.29099
    close(group_advantages(SCORES, 2, "batch", eps=0.0), [-0.5 / 1.2909944, 0.5 / 1.2909944] * 2)
    with pytest.raises(ValueError, match="unknown advantage scale"):
        group_advantages(SCORES, 2, "bogus")


def test_rloo_with_two_answers_is_the_pairwise_difference():
    close(rloo_advantages(SCORES, 2), [1 - 2, 2 - 1, 3 - 4, 4 - 3])
    # three answers 1, 2, 6: baselines (2+6)/2, (1+6)/2, (1+2)/2 = 4, 3.5, 1.5
    close(rloo_advantages(torch.tensor([1.0, 2.0, 6.0]), 3), [-3.0, -1.5, 4.5])


def test_zero_std_groups():
    assert zero_std_groups(torch.tensor([1.0, 1.0, 2.0, 3.0, 0.5, 0.5]), 2).tolist() == [True, False, True]
    close(group_advantages(torch.tensor([1.0, 1.0]), 2, "group"), [0.0, 0.0])  # no signal, no division by zero


def test_clip_higher_bounds_each_side_separately():
    ratio = torch.tensor([math.exp(0.5), math.exp(-0.5), 1.1])
    adv = torch.tensor([1.0, -1.0, 1.0])
    loss, low, high = clipped_surrogate(ratio, adv, eps_low=0.2, eps_high=0.28)
    # 1.6487 with A = 1: clipped at 1.28 → −1.28; 0.6065 with A = −1: max(0.6065, 0.8) = 0.8; 1.1 inside: −1.1
    close(loss, [-1.28, 0.8, -1.1])
    assert low.tolist() == [False, True, False] and high.tolist() == [True, False, False]


MASK = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
ADV = torch.tensor([[1.0, 1.0, 1.0], [-0.5, -0.5, -0.5]]) * MASK


@pytest.mark.parametrize("aggregation, normaliser, expected", [
    ("token_mean", 3, (-2.0 + 0.5) / 3),  # every token counts the same: row 0 has two, row 1 one
    ("sequence_mean", 2, (-1.0 + 0.5) / 2),  # each answer's mean, then the mean over answers
    ("constant", 2 * 3, (-2.0 + 0.5) / 6),  # Dr. GRPO: a constant, answers × max_new_tokens
])
def test_each_aggregation_at_ratio_one_is_minus_the_mean_advantage(aggregation, normaliser, expected):
    logps = torch.randn(2, 3)
    loss, stats = grpo_policy_loss(logps, logps.clone(), ADV, MASK, normaliser, aggregation=aggregation)
    assert loss.item() == pytest.approx(expected) and stats["ratio"] == pytest.approx(1.0)
    assert stats["clip_ratio/region"] == 0.0


def test_micro_batches_sum_to_the_whole_batch():
    logps, old = torch.randn(2, 3), torch.randn(2, 3) * 0.1
    whole, _ = grpo_policy_loss(logps, old, ADV, MASK, 3.0, aggregation="token_mean")
    parts = sum(grpo_policy_loss(logps[i:i + 1], old[i:i + 1], ADV[i:i + 1], MASK[i:i + 1], 3.0)[0] for i in (0, 1))
    assert whole.item() == pytest.approx(parts.item())


def test_sequence_level_ratio_is_the_mean_token_log_ratio():
    old = torch.zeros(1, 3)
    logps = torch.tensor([[0.02, 0.04, 9.0]])  # the padding position must not count
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    adv = torch.tensor([[1.0, 1.0, 0.0]])
    loss, stats = grpo_policy_loss(logps, old, adv, mask, 2.0, level="sequence")
    assert stats["ratio"] == pytest.approx(math.exp(0.03))  # exp(mean(0.02, 0.04)) on both tokens
    assert loss.item() == pytest.approx(-math.exp(0.03))


def test_k3_to_the_reference_joins_the_loss_with_its_gradient():
    logps = torch.zeros(1, 2, requires_grad=True)
    ref = torch.full((1, 2), math.log(2.0))  # π_ref / π = 2 → k3 = 2 − ln 2 − 1
    mask = torch.ones(1, 2)
    loss, stats = grpo_policy_loss(logps, logps.detach(), torch.zeros(1, 2), mask, 2.0, ref_logps=ref, beta=0.1)
    assert stats["kl"] == pytest.approx(1 - math.log(2)) and loss.item() == pytest.approx(0.1 * (1 - math.log(2)))
    loss.backward()  # d k3 / d log π = 1 − π_ref/π = −1 per token, × β / 2 tokens
    close(logps.grad, [[-0.05, -0.05]])


def test_gae_matches_a_hand_computed_example():
    # one response of 3 tokens, γ = 1, λ = 0.5; rewards (0, 0, 1), values (0.5, 0.25, 0.5)
    rewards, values = torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([[0.5, 0.25, 0.5]])
    adv, ret = gae(rewards, values, torch.ones(1, 3), gamma=1.0, lam=0.5)
    # δ = (0 + 0.25 − 0.5, 0 + 0.5 − 0.25, 1 + 0 − 0.5) = (−0.25, 0.25, 0.5)
    # A_2 = 0.5; A_1 = 0.25 + 0.5·0.5 = 0.5; A_0 = −0.25 + 0.5·0.5 = 0
    close(adv, [[0.0, 0.5, 0.5]])
    close(ret, [[0.5, 0.75, 1.0]])


def test_gae_matches_a_naive_loop_and_ignores_padding():
    torch.manual_seed(0)
    rewards, values = torch.randn(2, 3), torch.randn(2, 3)
    adv, ret = gae(rewards, values, GAE_MASK, gamma=0.9, lam=0.8)
    for row, length in ((0, 3), (1, 2)):
        expected = naive_gae(rewards[row].tolist(), values[row].tolist(), length, 0.9, 0.8)
        assert adv[row, :length].tolist() == pytest.approx(expected, abs=1e-6)
    assert adv[1, 2] == 0 and ret[1, 2] == 0
    close(ret, adv + values * GAE_MASK)


def test_gae_skips_the_environments_tokens_between_two_turns():
    # policy tokens at 0, 1 and 4; the environment's at 2, 3 (mask 0): the same as 3 contiguous policy tokens,
    # γ = 1, λ = 0.5, rewards (0, 0, 1), values (0.5, 0.25, 0.5) on them (by hand above: A = (0, 0.5, 0.5))
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0, 1.0]])
    rewards = torch.tensor([[0.0, 0.0, 7.0, 7.0, 1.0]])  # whatever sits on the environment's tokens is not seen
    values = torch.tensor([[0.5, 0.25, 9.0, 9.0, 0.5]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.5)
    close(adv, [[0.0, 0.5, 0.0, 0.0, 0.5]])
    close(ret, [[0.5, 0.75, 0.0, 0.0, 1.0]])  # the last token of turn 1 bootstraps from turn 2's V = 0.5


def test_turn_rewards_land_where_each_turn_ends_and_sum_to_the_score():
    # trajectory 0: turns ending at 1 and 4, rewards 0.5 and 1; trajectory 1: one turn ending at 2, reward 2
    turn_scores = torch.tensor([[0.5, 1.0], [2.0, 0.0]])
    ends = torch.tensor([[1, 4], [2, 2]])
    scores = torch.tensor([1.5 - 1.0, 2.0])  # trajectory 0 lost 1 for a missing stop id
    close(turn_rewards(turn_scores, ends, scores, 1.0, 5), [[0.0, 0.5, 0.0, 0.0, 0.0], [0.0, 0.0, 2.0, 0.0, 0.0]])
    # normalised by c = 1/2 and shifted: S = (Σ s − μ) · c with μ = 1
    placed = turn_rewards(turn_scores, ends, torch.tensor([0.25, 0.5]), 0.5, 5)
    close(placed, [[0.0, 0.25, 0.0, 0.0, 0.5 - 0.5], [0.0, 0.0, 1.0 - 0.5, 0.0, 0.0]])
    close(placed.sum(-1), [0.25, 0.5])
    mask = torch.tensor([[1.0, 1.0, 0.0, 1.0, 1.0], [1.0, 1.0, 1.0, 0.0, 0.0]])
    close(shaped_rewards(placed, torch.ones(2, 5), mask, 0.1), placed - 0.1 * mask)


def test_whitening_uses_valid_tokens_only():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 100.0]])  # 100 sits on padding
    w = whiten(x, GAE_MASK)
    valid = w[GAE_MASK.bool()]
    assert float(valid.mean()) == pytest.approx(0.0, abs=1e-6)
    assert float(valid.std()) == pytest.approx(1.0, abs=1e-4)
    assert w[1, 2] == 0


def test_kl_reward_puts_the_score_at_the_last_real_token_only():
    kl = torch.tensor([[0.5, -0.5, 1.0], [1.0, 2.0, 9.0]])
    r = shaped_rewards(torch.tensor([3.0, 5.0]), kl, GAE_MASK, beta=0.1)
    close(r, [[-0.05, 0.05, -0.1 + 3.0], [-0.1, -0.2 + 5.0, 0.0]])
    holes = torch.tensor([[1.0, 0.0, 1.0, 0.0]])  # a mask with a hole: the last 1 is at 2, not at sum − 1 = 1
    close(shaped_rewards(torch.tensor([3.0]), torch.zeros(1, 4), holes, beta=0.1), [[0.0, 0.0, 3.0, 0.0]])


def test_kl_estimators():
    logp, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    assert kl_per_token(logp, ref, "k1").item() == pytest.approx(math.log(2))
    assert kl_per_token(logp, ref, "k3").item() == pytest.approx((0.5 - 1) - math.log(0.5))  # r = 1/2


def test_adaptive_kl_controller_follows_ziegler():
    ctl = KLController(0.1, target=6.0, horizon=100)
    ctl.update(kl=12.0, n=10)  # error clipped to 0.2 → β · (1 + 0.2 · 10/100)
    assert ctl.value == pytest.approx(0.1 * 1.02)
    fixed = KLController(0.1)
    fixed.update(kl=12.0, n=10)
    assert fixed.value == 0.1


def test_running_moments_equal_the_moments_of_everything_seen():
    xs = [torch.tensor([1.0, 2.0, 3.0]), torch.tensor([10.0]), torch.tensor([-4.0, 0.5])]
    m = RunningMoments()
    for x in xs:
        m.update(x)
    allx = torch.cat(xs)
    assert m.mean == pytest.approx(float(allx.mean())) and m.std == pytest.approx(float(allx.std(unbiased=False)))


GAE_MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])  # answers of 3 and 2 tokens


def naive_gae(rewards, values, length, gamma, lam):
    adv = [0.0] * length
    for t in range(length):  # A_t = Σ_l (γλ)^l δ_{t+l}, written out
        for k in range(t, length):
            v_next = values[k + 1] if k + 1 < length else 0.0
            adv[t] += (gamma * lam) ** (k - t) * (rewards[k] + gamma * v_next - values[k])
    return adv


def test_rollout_correction_by_hand():
    from llmft.maths.rl import rollout_correction

    old = torch.tensor([[-1.0, -2.0, -0.5], [-3.0, -1.0, 0.0]])
    sampler = torch.tensor([[-1.0, -3.0, -0.5 - math.log(3)], [-2.0, -1.5, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    # w = exp(old − sampler): [[1, e, 3], [e^-1, e^0.5, (padding)]]
    tis = rollout_correction(old, sampler, mask, "tis", 2.0)
    assert torch.allclose(tis, torch.tensor([[1.0, 2.0, 2.0], [math.exp(-1), math.exp(0.5), 0.0]]))
    mis = rollout_correction(old, sampler, mask, "mis", 2.0)
    assert torch.equal(mis, torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0]]))
    assert torch.equal(rollout_correction(old, sampler, mask, "none", 2.0), mask)
    old.requires_grad_(True)
    assert not rollout_correction(old, sampler, mask, "tis", 2.0).requires_grad  # a weight, never differentiated
