"""Writing configs and running stages in the test process: crash-and-resume, training with the parameters before."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from llmft.stages import grpo


def set_keys(cfg: dict, overrides: dict) -> dict:
    """Set nested keys written with double underscores (train__max_steps=2 → cfg["train"]["max_steps"])."""
    for key, value in overrides.items():
        node = cfg
        *parents, leaf = key.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return cfg


def save_config(folder: Path, prefix: str, cfg: dict) -> Path:
    """Write `cfg` as the next unused PREFIX-N.yaml in `folder` and return its path."""
    import yaml

    path = folder / f"{prefix}-{len(list(folder.glob(f'{prefix}-*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def crash_at(run, cfg, monkeypatch, at_step: int) -> None:
    """Run a stage and kill it (KeyboardInterrupt) inside optimizer step `at_step`."""
    from llmft.run import loop

    real_step, calls = loop.optimizer_step, []

    def crash(*args):
        calls.append(1)
        if len(calls) == at_step:
            raise KeyboardInterrupt
        return real_step(*args)

    monkeypatch.setattr(loop, "optimizer_step", crash)
    with pytest.raises(KeyboardInterrupt):
        run(cfg)
    monkeypatch.setattr(loop, "optimizer_step", real_step)


def crash_then_resume(run, cfg, monkeypatch, at_step: int = 5) -> None:
    """Run a stage, kill it inside optimizer step `at_step`, then resume it to the end."""
    crash_at(run, cfg, monkeypatch, at_step)
    cfg.resume = "auto"
    run(cfg)


def train_in_process(stage, cfg):
    """Set up and train a stage module in this process: (model, its parameters before training, final metrics)."""
    from llmft.run import loop, optim, rundir
    s = stage.setup(cfg)
    model = stage.build_model(s)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    rundir.prepare_output_dir(cfg, stage.__name__.rsplit(".", 1)[-1], loop.data_files(cfg))
    opt = optim.make_optimizer(model, cfg.train)
    scheduler = optim.make_scheduler(opt, cfg.train, s.plan.num_steps)
    final = loop.fit(stage.stage(s, model), model, opt, scheduler, None, None)
    return model, before, final


def first_update(grpo_config, **overrides):
    s = grpo.setup(grpo_config(**overrides))
    model = grpo.build_model(s)
    groups, _ = grpo.rollout(model, s, [0, 1], step=1)
    exp = grpo.pack([a for g in groups for a in g.answers], s.chat.pad_id, s.device)
    exp.put(scores=torch.cat([g.scores for g in groups]))
    exp.put(advantages=grpo.advantages(exp.scores, s.cfg)[:, None] * exp.mask)
    grpo.role_forwards(model, s, exp)
    losses = []
    kept = torch.ones(exp.size, dtype=torch.bool)
    stats, _ = grpo.update_passes(model, s, exp, kept, lambda loss: losses.append(loss) or 0.0, 1)
    return s, exp, stats, losses
