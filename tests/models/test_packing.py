"""data.packing: each micro-batch's rows run as one padding-free sequence. The same per-token losses and gradients as
the padded batch, on every model family, and no token attends across a row boundary."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from llmft.config import load_config
from llmft.models.forward import body_states, packed_states
from llmft.models.loading import load_chat
from llmft.models.logprobs import supervised_logps
from llmft.models.pairpack import check_packing
from llmft.models.sources import resolve_source
from llmft.stages import dpo, reward, sft
from tests.helpers.families import FAMILIES, build
from tests.helpers.tiny import PAIRS, ROWS


@pytest.fixture(scope="module", params=[f.name for f in FAMILIES])
def family_model(request, tmp_path_factory):
    from tests.helpers.families import lora_model

    f = next(f for f in FAMILIES if f.name == request.param)
    path = build(f, tmp_path_factory.mktemp(f.name))
    return load_chat(resolve_source(str(path))), lora_model(path)


def padded_batch(chat):
    """Three chat rows of different lengths, right-padded, labels on the answers."""
    from llmft.data.examples import collate, tokenize_example

    examples = [tokenize_example(chat, [{"role": "user", "content": r["prompt"]},
                                          {"role": "assistant", "content": r["completion"]}], 256, "completion",
                                   f"row {i}")[0] for i, r in enumerate(ROWS[:3])]
    return collate(examples, chat.pad_id)


def test_packed_rows_give_the_same_token_log_probs_and_gradients(family_model):
    chat, lm = family_model
    check_packing(lm)  # the probe agrees on every family (sliding windows, soft-capping included)
    b = padded_batch(chat)
    assert not bool(b["attention_mask"].all())  # there is padding to skip
    results = []
    for packed in (False, True):
        lm.zero_grad()
        logps = supervised_logps(lm, b["input_ids"], b["attention_mask"], b["labels"], 0.9, packed=packed)
        (logps * torch.linspace(0.5, 1.5, len(logps))).sum().backward()
        results.append((logps.detach(), {n: p.grad.clone() for n, p in lm.named_parameters() if p.requires_grad}))
    (plain, plain_grads), (packed, packed_grads) = results
    assert torch.allclose(packed, plain, atol=1e-5)
    scale = max(float(g.abs().max()) for g in plain_grads.values())
    assert all(torch.allclose(packed_grads[n], g, atol=1e-5 * scale) for n, g in plain_grads.items())


def test_best_fit_decreasing_by_hand():
    from llmft.data.examples import Example, collate_blocks, pack_blocks

    # longest first: 6 opens A (room 2), 5 opens B (3), 4 fits neither and opens C (4), 3 fills B, 2 fills A
    assert pack_blocks([5, 3, 4, 2, 6], 8) == [[4, 3], [0, 1], [2]]
    lengths = [(7 * i) % 23 + 1 for i in range(200)]
    blocks = pack_blocks(lengths, 40)
    assert sorted(i for b in blocks for i in b) == list(range(200))
    assert all(sum(lengths[i] for i in b) <= 40 for b in blocks)
    assert len(blocks) <= -(-sum(lengths) // 40) + 3  # within a few blocks of the bound
    # a block's rows: positions restart at each, and no row's first token is a label of the row before it
    b = collate_blocks([[Example([1, 2, 3], [1, 2, 3]), Example([4, 5], [4, 5])], [Example([6], [6])]], 0)
    assert b["labels"].tolist() == [[-100, 2, 3, -100, 5], [-100, -100, -100, -100, -100]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 0, 1, 2, 3]]  # padding: a sequence of its own
    assert b["attention_mask"].tolist() == [[1] * 5, [1, 0, 0, 0, 0]]


def test_sft_in_blocks_steps_over_blocks_with_the_loss_of_their_rows(tiny_model_dir, sft_data, write_config):
    from llmft.data.examples import collate

    s = sft.setup(load_config("sft", write_config(tiny_model_dir, sft_data, data__packing="blocks",
                                                  data__max_length=128, train__batch_size=2)))
    blocks, examples = s.train.blocks, s.train.examples
    assert len(examples) > 2 * len(blocks) and s.plan.steps_per_epoch == -(-len(blocks) // 2)  # 2 blocks a step
    model = sft.build_model(s)
    first = s.plan.steps[0][0]  # the first micro-batch: two block indices
    rows = [examples[i] for b in first for i in blocks[b]]
    in_blocks, tokens = sft.accumulate(model, [sft.micro_batch(s.train, first, s.chat.pad_id)], s.device, s.dtype)
    as_rows, _ = sft.accumulate(model, [collate(rows, s.chat.pad_id)], s.device, s.dtype)
    assert in_blocks == pytest.approx(as_rows, rel=1e-5) and tokens == sum(len(e.input_ids) for e in rows)


def test_blocks_of_rows_give_the_same_token_log_probs_and_gradients(family_model):
    from llmft.data.examples import Example, collate, collate_blocks

    chat, lm = family_model
    b = padded_batch(chat)
    examples = [Example(ids[m.bool()].tolist(), lab[m.bool()].tolist())
                for ids, m, lab in zip(b["input_ids"], b["attention_mask"], b["labels"], strict=True)]
    blocks = collate_blocks([[examples[0], examples[2]], [examples[1]]], chat.pad_id)  # rows 0+2, then 1
    assert blocks["input_ids"].shape[0] == 2 and not bool(blocks["attention_mask"].all())  # one block is padded
    results = []
    for batch, positions in ((collate([examples[i] for i in (0, 2, 1)], chat.pad_id), None),
                             (blocks, blocks["position_ids"])):
        lm.zero_grad()
        logps = supervised_logps(lm, batch["input_ids"], batch["attention_mask"], batch["labels"], 0.9,
                                 positions=positions)
        (logps * torch.linspace(0.5, 1.5, len(logps))).sum().backward()
        results.append((logps.detach(), {n: p.grad.clone() for n, p in lm.named_parameters() if p.requires_grad}))
    (plain, plain_grads), (packed, packed_grads) = results
    assert packed.shape == plain.shape and torch.allclose(packed, plain, atol=1e-5)
    with torch.no_grad():  # as flash-attention runs them: the blocks flattened into one padding-free sequence
        rows = body_states(lm, blocks["input_ids"], None, blocks["position_ids"])
        flat = packed_states(lm, blocks["input_ids"], blocks["attention_mask"], blocks["position_ids"])
    real = blocks["attention_mask"].bool()
    assert torch.allclose(flat[real], rows[real], atol=1e-5)
    scale = max(float(g.abs().max()) for g in plain_grads.values())
    assert all(torch.allclose(packed_grads[n], g, atol=1e-5 * scale) for n, g in plain_grads.items())


@torch.no_grad()
def test_no_token_attends_across_a_row_boundary(family_model):
    chat, lm = family_model
    b = padded_batch(chat)
    ids, mask = b["input_ids"], b["attention_mask"]
    before = packed_states(lm, ids, mask)
    changed = ids.clone()
    changed[0, 2:int(mask[0].sum())] = (changed[0, 2:int(mask[0].sum())] + 1) % lm.config.vocab_size
    after = packed_states(lm, changed, mask)  # row 0 changed: it comes first in the packed sequence
    assert not torch.equal(before[0], after[0])
    assert torch.equal(before[1:], after[1:])  # rows 1 and 2 see nothing of row 0


def test_the_stages_train_the_same_with_packing(tiny_model_dir, tmp_path):
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in PAIRS))

    def losses(stage, module, data, packing):
        out = tmp_path / f"{stage}-{packing}"
        cfg = {"model": {"name": str(tiny_model_dir)}, "data": {"train": str(tmp_path / data), "max_length": 64,
                                                                "packing": packing},
               "lora": {"r": 4, "alpha": 8, "dropout": 0.0}, "output_dir": str(out), "seed": 0,
               "train": {"batch_size": 4, "max_steps": 3, "learning_rate": 5e-2, "warmup_ratio": 0.0}}
        (tmp_path / f"{stage}.yaml").write_text(yaml.safe_dump(cfg))
        module.run(load_config(stage, tmp_path / f"{stage}.yaml"))
        return [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines() if "loss" in x]

    for stage, module, data in (("sft", sft, "sft.jsonl"), ("reward", reward, "pairs.jsonl"),
                                ("dpo", dpo, "pairs.jsonl")):
        plain, packed = losses(stage, module, data, False), losses(stage, module, data, True)
        assert len(plain) == 3 and packed == pytest.approx(plain, abs=1e-5), stage


def test_packing_is_refused_where_attention_would_cross_rows(family_model, monkeypatch):
    from llmft.errors import ModelError
    from llmft.models import pairpack
    from llmft.models.forward import position_ids

    def crossing(model, ids, mask):  # packed with an explicit all-ones mask: transformers then lets rows see each other
        keep = mask.bool()
        flat = body_states(model, ids[keep][None], torch.ones_like(ids[keep][None]),
                           position_ids(mask)[keep][None])[0]
        return flat.new_zeros(*ids.shape, flat.shape[-1]).masked_scatter(keep[..., None], flat)

    chat, lm = family_model
    monkeypatch.setattr(pairpack, "packed_states", crossing)
    with pytest.raises(ModelError, match="crosses packed rows"):
        check_packing(lm)


def test_pairs_packed_with_their_prompt_once_score_like_padded_rows(family_model, monkeypatch):
    # dpo and reward: [prompt | chosen | rejected] per pair, the rejected answer never seeing the chosen one
    from llmft.data.preferences import TokenizedPair, collate_pairs
    from llmft.models.logprobs import pair_logps, sequence_logps
    from llmft.models.pairpack import can_pack_pairs
    from llmft.models.reward_model import RewardModel

    chat, lm = family_model
    pairs = []
    for row in PAIRS[:3]:
        prompt, chosen = chat.encode([{"role": "user", "content": row["prompt"]}], row["chosen"])
        pairs.append(TokenizedPair(prompt, chosen, chat.encode([{"role": "user", "content": row["prompt"]}],
                                                                row["rejected"])[1], None))
    batch = collate_pairs(pairs, chat.pad_id, packed=True)
    window = getattr(lm.config, "sliding_window", None)
    if not can_pack_pairs(lm, batch):  # Gemma's tiny window (16) is shorter than the packed sequence: refused ...
        assert window and batch["tree_ids"].shape[1] > window
        monkeypatch.setattr(lm.config, "sliding_window", 4096)  # ... and taken with a real model's window
        assert can_pack_pairs(lm, batch)
    results = []
    for packed in (False, True):
        lm.zero_grad()
        logps = (pair_logps(lm, batch) if packed else
                 sequence_logps(lm, batch["input_ids"], batch["attention_mask"], batch["labels"]))
        (logps * torch.tensor([1.0, 2.0, 3.0, -1.0, -2.0, 0.5])).sum().backward()
        results.append((logps.detach(), {n: p.grad.clone() for n, p in lm.named_parameters() if p.requires_grad}))
    (plain, plain_grads), (packed, packed_grads) = results
    assert torch.allclose(packed, plain, atol=1e-4 * (1 + float(plain.abs().max())))
    scale = max(float(g.abs().max()) for g in plain_grads.values())
    assert all(torch.allclose(packed_grads[n], g, atol=1e-5 * scale) for n, g in plain_grads.items())
    rm = RewardModel(lm, packed=True)
    with torch.no_grad():
        assert torch.allclose(rm.pair_scores(batch), rm(batch["input_ids"], batch["attention_mask"]), atol=1e-5)
    assert batch["tree_ids"].shape[1] == sum(len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids)
                                             for p in pairs)  # each prompt once, no padding


def test_packed_pairs_are_refused_where_the_rejected_answer_would_see_the_chosen(tiny_model_dir, monkeypatch):
    from llmft.errors import ModelError
    from llmft.models import pairpack
    from tests.helpers.families import lora_model

    real = pairpack.pair_mask

    def leaky(pair, segment, dtype, additive):  # every answer sees everything before it in its pair
        return real(pair, segment.clamp(max=0), dtype, additive)

    lm = lora_model(tiny_model_dir)
    check_packing(lm)
    monkeypatch.setattr(pairpack, "pair_mask", leaky)
    with pytest.raises(ModelError, match="crosses packed rows"):
        check_packing(lm)
