"""The GRPO stage on the tiny model: its config errors, the first update (ratio 1, the loss by hand), RLOO with two
answers, only the policy adapter changing, dynamic sampling, resume equal to the uninterrupted run, the outputs."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from llmft.errors import ConfigError
from llmft.stages import grpo
from tests.helpers.runs import crash_then_resume, first_update


def test_config_errors(grpo_config):
    with pytest.raises(ConfigError, match="'grpo.num_generations' must be >= 2"):
        grpo_config(grpo__num_generations=1)
    with pytest.raises(ConfigError, match="6 answers per process per step is not a whole number of groups of "
                                          "grpo.num_generations = 4"):
        grpo.setup(grpo_config(train__batch_size=3))
    with pytest.raises(ConfigError, match="rollout.top_p must be 1.0"):
        grpo.setup(grpo_config(rollout__top_p=0.9))
    with pytest.raises(ConfigError, match="rollout.temperature must be > 0"):
        grpo.setup(grpo_config(rollout__temperature=0.0))
    with pytest.raises(ConfigError, match="scale_rewards applies to advantage: group"):
        grpo.setup(grpo_config(grpo__advantage="rloo", grpo__scale_rewards="none"))
    with pytest.raises(ConfigError, match="fewer than one step's"):
        grpo.setup(grpo_config(train__batch_size=32))




def test_the_first_update_has_ratio_one_and_the_hand_computed_loss(grpo_config):
    s, exp, stats, losses = first_update(grpo_config, grpo__num_minibatches=1, train__grad_accum=2,
                                         train__batch_size=4)
    assert exp.size == 8 and len(stats) == 1 and stats[0]["ratio"] == pytest.approx(1.0, abs=1e-6)
    assert stats[0]["clip_ratio/region"] == 0.0
    # at ratio 1 the loss is −Σ_i A_i |y_i| / Σ_i |y_i| (token mean), whatever the micro-batches
    lengths = exp.mask.sum(-1)
    expected = -float((exp.advantages[:, 0] * lengths).sum() / lengths.sum())
    assert losses[0] == pytest.approx(expected, abs=1e-5)
    assert exp.logprob_gap()[0] < 1e-4  # the update's own forward equals the sampler's log-probs


def test_rloo_with_two_answers_is_the_pairwise_difference_in_the_stage(grpo_config):
    s, exp, _, _ = first_update(grpo_config, grpo__num_generations=2, grpo__advantage="rloo")
    scores = exp.scores.view(-1, 2)
    torch.testing.assert_close(exp.advantages[:, 0].view(-1, 2),
                               torch.stack([scores[:, 0] - scores[:, 1], scores[:, 1] - scores[:, 0]], -1))


def test_only_the_policy_adapter_changes(grpo_config):
    from tests.helpers.runs import train_in_process

    model, before, final = train_in_process(grpo, grpo_config())
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}
    assert changed and all("lora_" in n and ".default." in n for n in changed), sorted(changed)[:5]
    assert model.value_head is None and "value" not in model.lm.peft_config  # no critic
    for key in ("reward", "reward_std", "frac_reward_zero_std", "completions/mean_length", "clip_ratio/region_mean",
                "entropy", "logprob_gap", "time/generation", "rewards/lenjudge:fn/mean"):
        assert math.isfinite(final[key]), key


@pytest.mark.parametrize("mode", ["skip", "refill"])
def test_dynamic_sampling(grpo_config, mode):
    # prompts asking for "two" words always score 1.0: their groups carry no signal
    cfg = grpo_config(reward__judges={"flatjudge:fn": 1.0}, grpo__dynamic_sampling=mode, grpo__max_refills=3,
                      train__max_steps=1)
    s = grpo.setup(cfg)
    model = grpo.build_model(s)
    flat = [i for i, r in enumerate(s.train.records) if "two" in r.row["prompt"]]
    metrics, _ = grpo.grpo_step(model, s, flat + [i for i in range(8) if i not in flat][:1], lambda loss: 0.0, 1)
    if mode == "skip":
        assert metrics["frac_reward_zero_std"] == 0.5 and metrics["refilled_groups"] == 0
    else:  # every flat group was replaced by one of fresh prompts, most likely carrying signal
        assert metrics["refilled_groups"] >= 1 and metrics["frac_reward_zero_std"] < 0.5


def masked_update(s, model, kept, scramble=False):
    """One μ = 1 update of a fresh rollout of prompts 0 and 1 with only the `kept` answers in the loss; returns the
    losses the optimizer saw and the LoRA gradients at each."""
    groups, _ = grpo.rollout(model, s, [0, 1], step=1)
    exp = grpo.pack([a for g in groups for a in g.answers], s.chat.pad_id, s.device)
    exp.put(scores=torch.cat([g.scores for g in groups]))
    exp.put(advantages=grpo.advantages(exp.scores, s.cfg)[:, None] * exp.mask)
    if scramble:  # whatever the answers left out carry must not reach the loss
        exp.advantages[~kept] = 100.0 * torch.randn_like(exp.advantages[~kept])
    losses, grads = [], []

    def update(loss):
        losses.append(loss)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        model.zero_grad(set_to_none=True)
        return 0.0

    stats, _ = grpo.update_passes(model, s, exp, kept, update, 1)
    model.zero_grad(set_to_none=True)
    return exp, stats, losses, grads


def test_masked_groups_weigh_nothing_and_an_all_flat_step_takes_no_step(grpo_config):
    s = grpo.setup(grpo_config(grpo__num_minibatches=1, train__grad_accum=2))
    model = grpo.build_model(s)
    kept = torch.tensor([True] * 4 + [False] * 4)
    exp, _, losses, grads = masked_update(s, model, kept)
    _, _, losses2, grads2 = masked_update(s, model, kept, scramble=True)
    lengths = exp.mask.sum(-1)[:4]  # token mean over the kept answers only
    assert losses[0] == pytest.approx(-float((exp.advantages[:4, 0] * lengths).sum() / lengths.sum()), abs=1e-5)
    assert losses2[0] == pytest.approx(losses[0], abs=1e-6) and grads[0].keys() == grads2[0].keys()
    assert all(torch.allclose(grads[0][n], grads2[0][n], atol=1e-6) for n in grads[0])
    _, stats, losses, _ = masked_update(s, model, torch.zeros(8, dtype=torch.bool))
    assert losses == [] and stats[0]["grad_norm"] == 0.0  # nothing kept: the optimizer takes no step
    assert all(p.grad is None for p in model.parameters())


def test_resume_equals_uninterrupted_and_the_output_loads_as_a_policy(grpo_config, monkeypatch, tmp_path):
    settings = dict(train__max_steps=3, grpo__dynamic_sampling="refill", grpo__iterations=2)
    grpo.run(grpo_config(output_dir=str(tmp_path / "full"), **settings))
    crashed = grpo_config(output_dir=str(tmp_path / "crashed"), **settings)
    crash_then_resume(grpo.run, crashed, monkeypatch, at_step=7)  # inside step 2 (4 optimizer steps per step)
    a, b = load_file(tmp_path / "full" / "adapter_model.safetensors"), load_file(tmp_path / "crashed" /
                                                                                  "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = [json.loads(x) for x in (tmp_path / "crashed" / "metrics.jsonl").read_text().splitlines()]
    full = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and [r["loss"] for r in rows] == [r["loss"] for r in full]
    from llmft.models.loading import load_model
    from llmft.models.sources import resolve_source

    src = resolve_source(str(tmp_path / "full"))
    assert src.manifest["stage"] == "grpo" and not (tmp_path / "full" / "value").exists()
    load_model(src, torch.float32, torch.device("cpu"), crashed.model)
