"""The PPO stage: GAE, whitening, KL rewards and losses by hand; ratio 1 and KL 0 at the start; adapters;
resume; reward sources and their errors."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from llmft.config import load_config
from llmft.errors import ConfigError, ModelError, TrainingAborted
from llmft.maths.losses import ppo_policy_loss, ppo_value_loss
from llmft.maths.rl import KLController, RunningMoments, gae, kl_per_token, shaped_rewards, whiten
from llmft.rl.stage import sample, score_rollout
from llmft.stages import ppo, reward
from tests.conftest import ROWS, build_tokenizer, crash_then_resume, save_config, set_keys

MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])


def close(t: torch.Tensor, expected, atol: float = 1e-6) -> None:
    torch.testing.assert_close(t, torch.as_tensor(expected, dtype=t.dtype), atol=atol, rtol=0)


# ----------------------------------------------------------------------------------------------- maths
def test_gae_matches_a_hand_computed_example():
    # one response of 3 tokens, γ = 1, λ = 0.5; rewards (0, 0, 1), values (0.5, 0.25, 0.5)
    rewards, values = torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([[0.5, 0.25, 0.5]])
    adv, ret = gae(rewards, values, torch.ones(1, 3), gamma=1.0, lam=0.5)
    # δ = (0 + 0.25 − 0.5, 0 + 0.5 − 0.25, 1 + 0 − 0.5) = (−0.25, 0.25, 0.5)
    # A_2 = 0.5; A_1 = 0.25 + 0.5·0.5 = 0.5; A_0 = −0.25 + 0.5·0.5 = 0
    close(adv, [[0.0, 0.5, 0.5]])
    close(ret, [[0.5, 0.75, 1.0]])


def naive_gae(rewards, values, length, gamma, lam):
    adv = [0.0] * length
    for t in range(length):  # A_t = Σ_l (γλ)^l δ_{t+l}, written out
        for k in range(t, length):
            v_next = values[k + 1] if k + 1 < length else 0.0
            adv[t] += (gamma * lam) ** (k - t) * (rewards[k] + gamma * v_next - values[k])
    return adv


def test_gae_matches_a_naive_loop_and_ignores_padding():
    torch.manual_seed(0)
    rewards, values = torch.randn(2, 3), torch.randn(2, 3)
    adv, ret = gae(rewards, values, MASK, gamma=0.9, lam=0.8)
    for row, length in ((0, 3), (1, 2)):
        expected = naive_gae(rewards[row].tolist(), values[row].tolist(), length, 0.9, 0.8)
        assert adv[row, :length].tolist() == pytest.approx(expected, abs=1e-6)
    assert adv[1, 2] == 0 and ret[1, 2] == 0
    close(ret, adv + values * MASK)


def test_whitening_uses_valid_tokens_only():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 100.0]])  # 100 sits on padding
    w = whiten(x, MASK)
    valid = w[MASK.bool()]
    assert float(valid.mean()) == pytest.approx(0.0, abs=1e-6)
    assert float(valid.std()) == pytest.approx(1.0, abs=1e-4)
    assert w[1, 2] == 0


def test_kl_reward_puts_the_score_at_the_last_real_token_only():
    kl = torch.tensor([[0.5, -0.5, 1.0], [1.0, 2.0, 9.0]])
    r = shaped_rewards(torch.tensor([3.0, 5.0]), kl, MASK, beta=0.1)
    close(r, [[-0.05, 0.05, -0.1 + 3.0], [-0.1, -0.2 + 5.0, 0.0]])


def test_kl_estimators():
    logp, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    assert kl_per_token(logp, ref, "k1").item() == pytest.approx(math.log(2))
    assert kl_per_token(logp, ref, "k3").item() == pytest.approx((0.5 - 1) - math.log(0.5))  # r = 1/2


def test_k3_as_a_reward_is_refused_and_adaptive_beta_cannot_start_at_zero(ppo_config):
    with pytest.raises(ConfigError, match="only k1 .* gives the gradient of KL"):
        ppo.setup(ppo_config(ppo__kl_estimator="k3"))
    with pytest.raises(ConfigError, match="a β that starts at 0 stays 0"):
        ppo.setup(ppo_config(ppo__kl_target=6.0, ppo__kl_coef=0.0))


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


# -------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def reward_dir(tiny_model_dir, tmp_path_factory):
    """A tiny reward model (2 steps) on the tiny base."""
    import yaml

    from tests.conftest import PAIRS

    d = tmp_path_factory.mktemp("rm")
    (d / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in PAIRS))
    (d / "r.yaml").write_text(yaml.safe_dump({
        "model": {"name": str(tiny_model_dir)}, "data": {"train": str(d / "pairs.jsonl"), "max_length": 64},
        "lora": {"r": 4, "alpha": 8}, "train": {"batch_size": 4, "max_steps": 2, "learning_rate": 1e-2},
        "output_dir": str(d / "rm"), "seed": 0}))
    reward.run(load_config("reward", d / "r.yaml"))
    return d / "rm"


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({**r, "constraints": [{"type": "lowercase"}]}) + "\n" for r in ROWS))
    return path


@pytest.fixture
def ppo_config(tiny_model_dir, reward_dir, prompts, tmp_path):
    def write(**overrides):
        cfg = {"model": {"name": str(tiny_model_dir)}, "data": {"train": str(prompts)},
               "lora": {"r": 4, "alpha": 8}, "rollout": {"max_new_tokens": 6, "temperature": 0.7},
               "reward": {"model": str(reward_dir)},
               "train": {"batch_size": 2, "max_steps": 2, "learning_rate": 1e-2, "save_every": 1},
               "ppo": {"num_minibatches": 2, "epochs": 2}, "output_dir": str(tmp_path / "ppo"), "seed": 0,
               "samples_every": 1}
        return load_config("ppo", save_config(tmp_path, "ppo", set_keys(cfg, overrides)))

    return write


# ----------------------------------------------------------------------------------------- the stage
def test_first_minibatch_has_ratio_one_and_kl_is_zero_at_step_zero(ppo_config):
    s = ppo.setup(ppo_config())
    model = ppo.build_model(s)
    assert s.share_reward  # trained on the same base: one copy, four roles
    exp = sample(model, s, s.train.ids[:4], 0)
    ppo.role_forwards(model, s, exp)
    assert torch.equal(exp.old_logps, exp.ref_logps)  # a new adapter starts as the identity: policy == reference
    assert exp.logprob_gap()[0] < 1e-4  # the trainer recomputes what the sampler drew from
    exp.put(advantages=whiten(torch.randn_like(exp.old_logps), exp.mask), returns=exp.values)
    calls = []
    stats = ppo.update_epochs(model, s, exp, lambda loss: calls.append(loss) or 0.0, step=1)
    first = stats[0]
    assert first["ratio"] == pytest.approx(1.0, abs=1e-6) and first["approx_kl"] == pytest.approx(0.0, abs=1e-10)
    assert first["clip_ratio/region"] == 0.0 and first["value_clipfrac"] == 0.0
    assert len(calls) == len(stats) == 4  # 2 epochs × 2 minibatches


def test_only_the_policy_and_value_adapters_and_value_head_change(ppo_config):
    from tests.conftest import train_in_process

    cfg = ppo_config()
    model, before, final = train_in_process(ppo, cfg)
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}
    assert changed and all(("lora_" in n and (".default." in n or ".value." in n)) or n.startswith("value_head.")
                           for n in changed), sorted(changed)[:5]
    assert any(".value." in n for n in changed) and any(".default." in n for n in changed)
    assert "value_head.weight" in changed
    for key in ("reward", "objective/kl", "entropy", "clip_ratio/region_mean", "policy/approxkl_avg",
                "val/explained_variance", "time/generation"):
        assert math.isfinite(final[key]), key


def test_resume_equals_uninterrupted_and_output_loads_as_a_policy(ppo_config, monkeypatch, tmp_path):
    full = ppo_config(output_dir=str(tmp_path / "full"))
    ppo.run(full)
    crashed = ppo_config(output_dir=str(tmp_path / "crashed"))
    crash_then_resume(ppo.run, crashed, monkeypatch, at_step=6)  # inside step 2 (4 optimizer steps per step)
    for name in ("adapter_model.safetensors", "value/adapter_model.safetensors", "value_head.safetensors"):
        a, b = load_file(tmp_path / "full" / name), load_file(tmp_path / "crashed" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    rows = [json.loads(x) for x in (tmp_path / "crashed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    samples = [json.loads(x) for x in (tmp_path / "crashed" / "samples.jsonl").read_text().splitlines()]
    assert {r["step"] for r in samples} == {1, 2} and "reward_model" in samples[0]
    from llmft.models.loading import load_model
    from llmft.models.sources import resolve_source

    src = resolve_source(str(tmp_path / "full"))
    assert src.manifest["stage"] == "ppo"
    load_model(src, torch.float32, torch.device("cpu"), full.model)  # merges the policy adapter


def test_judges_alone_can_be_the_reward(ppo_config, tmp_path, monkeypatch):
    (tmp_path / "myjudge.py").write_text("def short(prompts, responses, rows):\n"
                                         "    return [-len(r) / 10 for r in responses]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    final = ppo.run(ppo_config(reward__model=None, reward__judges={"constraints": 1.0, "myjudge:short": 0.5},
                               reward__normalize=True, reward__clip=3.0, train__max_steps=1))
    assert "rewards/constraints/mean" in final and "rewards/myjudge:short/mean" in final
    assert "rewards/reward_model/mean" not in final


@pytest.mark.parametrize("body, message", [
    ("    raise RuntimeError('boom')", "judge 'badjudge:fn' raised RuntimeError: boom"),
    ("    return [1.0]", "judge 'badjudge:fn' must return one finite number per answer"),
    ("    return [float('nan')] * len(responses)", "must return one finite number per answer"),
])
def test_a_reward_function_that_fails_gives_a_clear_error(ppo_config, tmp_path, monkeypatch, body, message):
    import sys

    (tmp_path / "badjudge.py").write_text(f"def fn(prompts, responses, rows):\n{body}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "badjudge", raising=False)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ppo.run(ppo_config(reward__judges={"badjudge:fn": 1.0}, train__max_steps=1))


def test_a_non_finite_score_aborts_naming_the_step(ppo_config, monkeypatch):
    monkeypatch.setattr(ppo.ActorCritic, "rewards", lambda self, ids, mask: torch.full((ids.shape[0],), math.nan))
    with pytest.raises(TrainingAborted, match="non-finite score at step 1"):
        ppo.run(ppo_config())


def test_config_errors(ppo_config):
    with pytest.raises(ConfigError, match="name a reward model"):
        ppo.setup(ppo_config(reward__model=None))
    with pytest.raises(ConfigError, match="rollout.temperature must be > 0"):
        ppo.setup(ppo_config(rollout__temperature=0.0))
    with pytest.raises(ConfigError, match="lora.dropout"):
        ppo.setup(ppo_config(lora__dropout=0.1))
    with pytest.raises(ConfigError, match="reward.judges"):
        ppo_config(reward__judges=["constraints"])


def test_reward_model_with_another_tokenizer_or_template_is_refused(ppo_config, reward_dir, tmp_path):
    import shutil

    for name in ("vocab", "template"):
        other = tmp_path / f"rm-{name}"
        shutil.copytree(reward_dir, other)
        t = build_tokenizer()
        if name == "vocab":
            t.add_tokens(["<extra>"])
        else:
            t.chat_template = "{{ messages[0]['content'] }}"
        t.save_pretrained(other)
        with pytest.raises(ModelError, match="another (tokenizer|chat template) than policy"):
            ppo.setup(ppo_config(reward__model=str(other)))


def test_a_reward_model_on_other_base_weights_is_loaded_separately(ppo_config, tmp_path, tiny_model_dir):
    import shutil

    from tests.conftest import build_model

    other_base = tmp_path / "other-base"  # same architecture and tokenizer, other weights
    shutil.copytree(tiny_model_dir, other_base)
    build_model(len(build_tokenizer()), seed=1).save_pretrained(other_base)
    s = ppo.setup(ppo_config(model__name=str(other_base)))
    assert not s.share_reward
    model = ppo.build_model(s)
    assert s.external_reward is not None and "reward" not in model.lm.peft_config
    exp = sample(model, s, s.train.ids[:2], 0)
    _, score = score_rollout(model, s, exp, [s.train.records[i].row for i in (0, 1)])
    assert torch.isfinite(score).all()


def test_minibatch_statistics_weigh_micro_batches_by_their_own_tokens():
    # the denominator is these micro-batches' tokens, not the (global) count the losses are divided by
    parts = [{"clipfrac": 0.5, "value_loss": 2.0, "tokens": 30.0}, {"clipfrac": 0.0, "value_loss": 4.0, "tokens": 10.0}]
    assert ppo.token_weighted(parts) == {"clipfrac": pytest.approx(0.375), "value_loss": pytest.approx(2.5)}


def ppo_grads(ppo_config, checkpointing: bool) -> dict[str, torch.Tensor]:
    """The gradients of one PPO micro-batch (policy loss, then value loss), from the same rollout and targets."""
    s = ppo.setup(ppo_config(train__gradient_checkpointing=checkpointing))
    torch.manual_seed(0)
    model = ppo.build_model(s)
    exp = sample(model, s, s.train.ids[:4], 0)
    ppo.role_forwards(model, s, exp)
    g = torch.Generator().manual_seed(1)
    exp.put(advantages=torch.randn(exp.mask.shape, generator=g) * exp.mask.cpu(),
            returns=torch.randn(exp.mask.shape, generator=g) * exp.mask.cpu())
    model.train()
    ppo.micro_update(model, s, exp, [0, 1, 2, 3], float(exp.mask.sum()))
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_gradient_checkpointing_gives_every_adapter_its_own_gradients(ppo_config):
    # with checkpointing, backward recomputes each layer's forward under the adapter active *then*: the value loss's
    # backward must run under the value adapter (it ran under the policy one, and the value LoRA-A got zero gradient)
    plain, checkpointed = ppo_grads(ppo_config, False), ppo_grads(ppo_config, True)
    assert plain.keys() == checkpointed.keys()
    value_a = [n for n in plain if ".value." in n and "lora_A" in n]
    assert value_a and all(plain[n].abs().sum() > 0 for n in value_a)
    assert any(".default." in n for n in plain) and "value_head.weight" in plain
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-4, atol=1e-6, msg=name)
