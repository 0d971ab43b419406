"""The SFT stage end to end on a tiny model: accumulation, LoRA-only updates, learning, resume, outputs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llmft.checkpoint import content_hash
from llmft.config import load_config
from llmft.data.examples import collate
from llmft.errors import RunError, TrainingAborted
from llmft.run import loop
from llmft.stages import sft
from tests.helpers.runs import train_in_process


def run(path, *overrides):
    return sft.run(load_config("sft", path, list(overrides)))


def losses(run_dir) -> list[float]:
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def adapter(run_dir) -> dict[str, torch.Tensor]:
    return load_file(Path(run_dir) / "adapter_model.safetensors")


def test_accumulation_matches_one_big_batch(tiny_model_dir, sft_data, write_config):
    # batch 4 × accum 1 and batch 1 × accum 4 hold the same 4 examples; the token mean over the whole
    # accumulated batch makes their loss and gradients equal although the completions differ in length
    cfg = load_config("sft", write_config(tiny_model_dir, sft_data))
    s = sft.setup(cfg)
    model = sft.add_lora(sft.load_model(s.source, s.dtype, s.device, cfg.model), cfg.lora)
    torch.manual_seed(0)  # independent of which tests ran before
    for p in model.parameters():  # LoRA B starts at 0, which would leave A without gradient
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.1)
    examples, pad = s.train.examples[:4], s.chat.pad_id
    assert len({len(e.input_ids) for e in examples}) > 1

    def gradients(micro_batches):
        model.zero_grad()
        loss, _ = sft.accumulate(model, [collate(mb, pad) for mb in micro_batches], s.device, s.dtype)
        return loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    loss_big, big = gradients([examples])
    loss_small, small = gradients([[e] for e in examples])
    assert loss_small == pytest.approx(loss_big, rel=1e-6)
    for name in big:
        torch.testing.assert_close(small[name], big[name], rtol=1e-4, atol=1e-7)
    # the mean of per-micro-batch means is a different number: the test can tell the two apart
    means = [sft.accumulate(model, [collate([e], pad)], s.device, s.dtype)[0] for e in examples]
    counts = [sum(t != -100 for t in e.labels[1:]) for e in examples]
    assert loss_big == pytest.approx(sum(m * n for m, n in zip(means, counts, strict=True)) / sum(counts), rel=1e-6)
    assert abs(sum(means) / 4 - loss_big) > 10 * 1e-6 * loss_big  # 10× the tolerance used above


def test_only_lora_parameters_change_and_loss_goes_down(tiny_model_dir, sft_data, write_config):
    cfg = load_config("sft", write_config(tiny_model_dir, sft_data, train__epochs=15,
                                          data__eval=str(sft_data), train__eval_every=4))
    model, before, _ = train_in_process(sft, cfg)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed)
    assert {n for n in before if "lora_B" in n} <= changed  # every adapter learned (B starts at 0)
    curve = losses(cfg.output_dir)
    assert sum(curve[-3:]) / 3 < 0.7 * sum(curve[:3]) / 3
    rows = [json.loads(x) for x in open(Path(cfg.output_dir) / "metrics.jsonl") if "eval" in x]
    assert [r["step"] for r in rows] == [*range(0, 30, 4), 30]  # before training, every 4 steps, at the end
    assert rows[-1]["eval/loss"] < rows[0]["eval/loss"]


def test_resume_reproduces_the_uninterrupted_run(tiny_model_dir, sft_data, write_config, tmp_path,
                                                 monkeypatch):
    settings = dict(train__batch_size=2, train__epochs=2, lora__dropout=0.1, train__save_every=3)
    straight = write_config(tiny_model_dir, sft_data, output_dir=str(tmp_path / "a"), **settings)
    run(straight)

    interrupted = write_config(tiny_model_dir, sft_data, output_dir=str(tmp_path / "b"), **settings)
    real_step, calls = loop.optimizer_step, []

    def crash_at_step_5(*args):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt  # a kill between checkpoint-3 and checkpoint-6
        return real_step(*args)

    monkeypatch.setattr(loop, "optimizer_step", crash_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        run(interrupted)
    monkeypatch.setattr(loop, "optimizer_step", real_step)
    assert (tmp_path / "b" / "checkpoint-3").is_dir() and not (tmp_path / "b" / "llmft.json").exists()
    with pytest.raises(RunError, match="already holds a run"):
        run(interrupted)
    run(interrupted, "resume=auto")
    assert losses(tmp_path / "b") == losses(tmp_path / "a")  # dropout RNG, data order, optimizer restored
    a, b = adapter(tmp_path / "a"), adapter(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_output_loads_with_plain_peft_and_manifest_is_complete(tiny_model_dir, sft_data, write_config):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = write_config(tiny_model_dir, sft_data, train__max_steps=2)
    run(cfg)
    out = Path(load_config("sft", cfg).output_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out)
    tok = AutoTokenizer.from_pretrained(out)
    enc = tok.apply_chat_template([{"role": "user", "content": "hello"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    generated = model.generate(**enc, max_new_tokens=4, do_sample=False)
    assert generated.shape[1] > enc["input_ids"].shape[1]
    assert tok.chat_template and tok.pad_token == tok.eos_token

    m = json.loads((out / "llmft.json").read_text())
    assert m["stage"] == "sft" and m["model"]["kind"] == "local" and m["parent"] is None
    assert m["data"][0]["sha256"] and m["config"]["train"]["max_steps"] == 2
    assert {"loss", "lr", "grad_norm"} <= set(m["metrics"])
    assert {"torch", "transformers", "peft", "llmft"} <= set(m["versions"])
    assert m["adapter_sha256"] == content_hash(out)
    assert (out / "config.yaml").is_file() and not list(out.glob(".tmp-*"))


def test_stage_output_as_model_merges_its_adapter(tiny_model_dir, sft_data, write_config, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    first = tmp_path / "first"
    run(write_config(tiny_model_dir, sft_data, output_dir=str(first), train__max_steps=3))
    second = write_config(first, sft_data, output_dir=str(tmp_path / "second"), train__max_steps=1)
    s = sft.setup(load_config("sft", second))
    assert s.source.kind == "stage"
    merged = sft.load_model(s.source, torch.float32, torch.device("cpu"), load_config("sft", second).model)
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), first)
    ids = torch.tensor([[1, 5, 9, 14, 3]])
    torch.testing.assert_close(merged(ids).logits, reference(ids).logits, rtol=1e-4, atol=1e-5)
    run(second)
    m = json.loads((tmp_path / "second" / "llmft.json").read_text())
    assert m["parent"]["sha256"] == content_hash(first) and m["model"]["root"] == str(tiny_model_dir)


def test_non_finite_loss_stops_with_the_step_and_keeps_the_checkpoint(tiny_model_dir, sft_data, write_config,
                                                                       monkeypatch):
    cfg = write_config(tiny_model_dir, sft_data, train__batch_size=2, train__save_every=2)
    real, calls = sft.sft_loss, []

    def nan_on_step_3(*args):
        calls.append(1)
        loss = real(*args)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(sft, "sft_loss", nan_on_step_3)
    with pytest.raises(TrainingAborted, match=r"non-finite loss \(nan\) at step 3.*checkpoint-2"):
        run(cfg)
    out = Path(load_config("sft", cfg).output_dir)
    assert (out / "checkpoint-2").is_dir() and not (out / "adapter_model.safetensors").exists()


def test_output_dir_policy(tiny_model_dir, sft_data, write_config, tmp_path):
    cfg = write_config(tiny_model_dir, sft_data, train__max_steps=1)
    run(cfg)
    assert run(cfg, "resume=auto") is None  # finished: nothing to do
    with pytest.raises(RunError, match="differs from the run .* in train.learning_rate"):
        run(cfg, "resume=auto", "train.learning_rate=0.5")
    assert run(cfg, "overwrite=true")["loss"] > 0
    stranger = tmp_path / "someone-elses"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("keep me")
    with pytest.raises(RunError, match="not an llmft run"):
        run(cfg, f"output_dir={stranger}", "overwrite=true")
    assert (stranger / "notes.txt").exists()


def test_gradient_checkpointing_and_bf16_weights_train(tiny_model_dir, sft_data, write_config, tmp_path):
    plain = write_config(tiny_model_dir, sft_data, output_dir=str(tmp_path / "plain"), train__max_steps=2)
    ckpt = write_config(tiny_model_dir, sft_data, output_dir=str(tmp_path / "gc"), train__max_steps=2,
                        train__gradient_checkpointing=True)
    run(plain), run(ckpt)
    assert losses(tmp_path / "gc") == pytest.approx(losses(tmp_path / "plain"), rel=1e-5)
    bf16 = write_config(tiny_model_dir, sft_data, output_dir=str(tmp_path / "bf16"), train__max_steps=2,
                        model__dtype="bfloat16")
    run(bf16)  # bf16 weights, fp32 adapters and fp32 loss
    assert losses(tmp_path / "bf16") == pytest.approx(losses(tmp_path / "plain"), rel=2e-2)


def test_resume_path_into_an_empty_output_dir_is_refused(tiny_model_dir, sft_data, write_config, tmp_path):
    cfg = write_config(tiny_model_dir, sft_data, resume=str(tmp_path / "elsewhere" / "checkpoint-2"))
    with pytest.raises(RunError, match="is empty"):
        run(cfg)


def test_schedule_warmup_then_cosine_to_zero(tiny_model_dir, sft_data, write_config):
    cfg = write_config(tiny_model_dir, sft_data, train__batch_size=1, train__epochs=1, train__warmup_ratio=0.25)
    run(cfg)  # 8 steps: 2 of linear warmup, then cosine decay; the logged lr is the one each step used
    rows = [json.loads(x) for x in (Path(load_config("sft", cfg).output_dir) / "metrics.jsonl").open()]
    lrs = [r["lr"] for r in rows if "lr" in r]
    peak = 1e-2
    expected = [peak / 3, 2 * peak / 3] + [peak * 0.5 * (1 + math.cos(math.pi * k / 6)) for k in range(6)]
    assert lrs == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("fmt", ["messages", "text", "csv"])
def test_every_row_format_trains_end_to_end(fmt, tiny_model_dir, write_config, tmp_path):
    if fmt == "csv":
        data = tmp_path / "d.csv"
        data.write_text("prompt,completion\nhello,the sea\nwrite two words,deep blue\n")
    else:
        rows = ([{"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"},
                               {"role": "assistant", "content": "the sea"}]}] * 3 if fmt == "messages"
                else [{"text": "the quick brown fox"}, {"text": "a lighthouse guides ships"}])
        data = tmp_path / "d.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    metrics = run(write_config(tiny_model_dir, data, train__max_steps=2, data__eval_fraction=0.34))
    assert metrics["loss"] > 0 and metrics["eval/loss"] > 0
    assert json.loads((tmp_path / "run" / "llmft.json").read_text())["data"][0]["sha256"]


def test_a_non_finite_gradient_stops_the_run_before_the_weights_move(tiny_model_dir, sft_data, write_config,
                                                                     monkeypatch):
    from llmft.run import optim
    cfg = write_config(tiny_model_dir, sft_data, train__batch_size=2, train__save_every=2)
    real_clip, clips = torch.nn.utils.clip_grad_norm_, []
    real_step, steps = torch.optim.AdamW.step, []

    def clip(params, max_norm):
        clips.append(1)
        norm = real_clip(params, max_norm)
        return norm * float("nan") if len(clips) == 3 else norm

    monkeypatch.setattr(optim.torch.nn.utils, "clip_grad_norm_", clip)
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, *a, **k: steps.append(1) or real_step(self, *a, **k))
    with pytest.raises(TrainingAborted, match=r"non-finite grad_norm \(nan\) at step 3.*checkpoint-2"):
        run(cfg)
    assert len(steps) == 2  # steps 1 and 2 updated the weights; step 3 did not
