"""The PPO stage: GAE, whitening, KL rewards and losses by hand; ratio 1 and KL 0 at the start; adapters;
resume; reward sources and their errors."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from llmft.errors import ConfigError, ModelError, TrainingAborted
from llmft.maths.rl import whiten
from llmft.rl.stage import sample, score_rollout
from llmft.stages import ppo
from tests.helpers.runs import crash_then_resume
from tests.helpers.tiny import build_tokenizer


def close(t: torch.Tensor, expected, atol: float = 1e-6) -> None:
    torch.testing.assert_close(t, torch.as_tensor(expected, dtype=t.dtype), atol=atol, rtol=0)


# ----------------------------------------------------------------------------------------------- maths












def test_k3_as_a_reward_is_refused_and_adaptive_beta_cannot_start_at_zero(ppo_config):
    with pytest.raises(ConfigError, match="only k1 .* gives the gradient of KL"):
        ppo.setup(ppo_config(ppo__kl_estimator="k3"))
    with pytest.raises(ConfigError, match="a β that starts at 0 stays 0"):
        ppo.setup(ppo_config(ppo__kl_target=6.0, ppo__kl_coef=0.0))










# -------------------------------------------------------------------------------------------- fixtures






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


def test_a_critic_without_a_reward_model_starts_at_zero_and_learns(ppo_config):
    """V = 0 for every state at step 1 (so the advantages are the whitened returns), not a random head's noise."""
    s = ppo.setup(ppo_config(reward__model=None, reward__judges={"constraints": 1.0}))
    model = ppo.build_model(s)
    exp = sample(model, s, s.train.ids[:4], 0)
    ppo.role_forwards(model, s, exp)
    assert torch.equal(exp.values, torch.zeros_like(exp.values))
    exp.put(advantages=whiten(torch.randn_like(exp.old_logps), exp.mask), returns=torch.ones_like(exp.values))
    grads = []
    ppo.update_epochs(model, s, exp, lambda loss: grads.append(model.value_head.weight.grad.abs().sum()) or 0.0, 1)
    assert all(g > 0 for g in grads)  # the zero head still learns: its gradient is (V − R)·h


def test_only_the_policy_and_value_adapters_and_value_head_change(ppo_config):
    from tests.helpers.runs import train_in_process

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

    from tests.helpers.tiny import build_model

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
