"""The model-family matrix: tiny models shaped like Llama-3, Qwen2.5, Qwen3, Gemma-2, Gemma-3, Mistral and Phi-3
(`tests/helpers/families.py`), each through the chat rules and through every stage, with the invariants that catch most
silent bugs: prompts as the template renders them, answers that end with the template's turn terminator in every
stage, generation that stops there, the sampler's log-probs equal to the trainer's at step 1, DPO's ln 2 at step 0,
PPO's ratio 1 on the first minibatch, and the reward model reading its score on the terminator."""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from llmft.config import load_config
from llmft.data.examples import tokenize_example
from llmft.data.preferences import collate_pairs
from llmft.errors import DataError
from llmft.models.forward import last_token_index
from llmft.models.forward import model_body as modeling_body
from llmft.models.forward import shared_prefix_states as SHARED
from llmft.models.loading import load_chat
from llmft.models.sources import resolve_source
from llmft.rl.stage import sample
from llmft.stages import dpo, grpo, kto, ppo, reward, sft
from tests.helpers.families import BY_NAME, FAMILIES, TOOL_FAMILIES, build, lora_model
from tests.helpers.tiny import PAIRS, ROWS

U, A = {"role": "user", "content": "write two words about the sea"}, "the sea is blue"
SYSTEM = {"role": "system", "content": "be brief"}


@pytest.fixture(scope="module", params=[f.name for f in FAMILIES])
def family(request, tmp_path_factory):
    f = BY_NAME[request.param]
    return f, build(f, tmp_path_factory.mktemp(f.name))


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


# ------------------------------------------------------------------------------------------ chat rules
def test_prompts_answers_and_the_stop_set_follow_the_template(family):
    f, path = family
    chat = load_chat(resolve_source(str(path)))
    tok = chat.tokenizer
    end = tok.convert_tokens_to_ids(f.turn_end)
    generation = json.loads((path / "generation_config.json").read_text())["eos_token_id"]
    assert chat.stop_ids == sorted({tok.eos_token_id, end, *([generation] if isinstance(generation, int) else
                                                             generation)})
    prompt_ids, answer_ids = chat.encode([U], A)
    assert prompt_ids == list(tok.apply_chat_template([U], add_generation_prompt=True, tokenize=True,
                                                      return_dict=True)["input_ids"])
    rendered = tok.apply_chat_template([U, {"role": "assistant", "content": A}], tokenize=False)
    through_end = rendered[:rendered.rindex(f.turn_end) + len(f.turn_end)]
    assert prompt_ids + answer_ids == ids(tok, through_end)  # the answer as the template writes it, in context
    assert answer_ids[-1] == end and chat.cut(answer_ids + answer_ids) == (answer_ids, True)


def test_system_messages_and_multi_turn_conversations(family):
    f, path = family
    chat = load_chat(resolve_source(str(path)))
    tok = chat.tokenizer
    if f.system == "refused":  # Gemma-2: its template raises, and so does llmft, naming the row
        with pytest.raises(DataError, match="f:3: the chat template rejects .*System role not supported"):
            chat.encode([SYSTEM, U], A, "f:3")
    else:
        prompt_ids, answer_ids = chat.encode([SYSTEM, U], A)
        assert "be brief" in tok.decode(prompt_ids) and answer_ids[-1] == tok.convert_tokens_to_ids(f.turn_end)
    turns = [U, {"role": "assistant", "content": "sea"}, {"role": "user", "content": "again"},
             {"role": "assistant", "content": "blue"}]
    if f.name == "qwen3":  # the final answer gets a think block that earlier turns lose: not one sequence
        with pytest.raises(DataError, match="renders earlier turns differently once later ones exist"):
            tokenize_example(chat, turns, 256, "completion", "f:1")
        return
    ex, _ = tokenize_example(chat, turns, 256, "completion", "f:1")
    rendered = tok.apply_chat_template(turns, tokenize=False)
    assert ex.input_ids == ids(tok, rendered[:rendered.rindex(f.turn_end) + len(f.turn_end)])
    answers = [t for t, label in zip(ex.input_ids, ex.labels, strict=True) if label != -100]
    assert tok.decode(answers).replace(" ", "").replace("▁", "") == f"sea{f.turn_end}blue{f.turn_end}"


def test_a_refinement_request_renders_as_the_template_writes_it(family):
    """llmft loop's refine: the request, the answer, the critique as the next user turn, in every family."""
    from llmft.loop.config import REFINE_TEMPLATE
    from llmft.loop.rows import refinement_messages

    f, path = family
    chat = load_chat(resolve_source(str(path)))
    msgs = refinement_messages([U], "sea", "the reply has 1 word; the request said two", REFINE_TEMPLATE)
    prompt_ids = chat.prompt_ids(msgs)
    assert prompt_ids == list(chat.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True,
                                                                 return_dict=True)["input_ids"])
    assert "the request said two" in chat.tokenizer.decode(prompt_ids)


# ------------------------------------------------------------------------------------- shared prompts


def experience(chat, answers_per_prompt: int = 3):
    """Two prompts of different lengths (left padding), each with answers of different lengths (right padding)."""
    from llmft.rollout.experience import pack
    from llmft.rollout.generation import Answer

    torch.manual_seed(2)
    prompts = [chat.prompt_ids([{"role": "user", "content": t}]) for t in ("the sea", "a lighthouse guides ships")]
    gens = [Answer(p, torch.randint(5, len(chat.tokenizer) - 1, (3 + 5 * k,)).tolist(), "", False)
            for p in prompts for k in range(answers_per_prompt)]
    return pack(gens, chat.pad_id, torch.device("cpu"))


def logps_and_grads(lm, exp, share: bool, monkeypatch):
    from llmft.models.forward import hidden_states
    from llmft.rollout import experience as rollout

    if not share:
        monkeypatch.setattr(rollout, "prompt_owners", lambda *a: None)
    lm.zero_grad()
    logps, _ = rollout.answer_logps(lm, functools.partial(hidden_states, lm), exp, list(range(exp.size)), 0.7,
                                      torch.float32)
    (logps * exp.mask).sum().backward()
    monkeypatch.undo()
    return logps.detach(), {n: p.grad.clone() for n, p in lm.named_parameters() if p.requires_grad}


def test_a_shared_prompt_gives_the_same_log_probs_and_gradients(family, monkeypatch):
    # G answers to one prompt: its keys and values are computed once and shared (sliding windows and soft-capping
    # included); the log-probs and the LoRA gradients (through the prompt's keys and values too) are the same
    from llmft.models import forward
    f, path = family
    chat, lm = load_chat(resolve_source(str(path))), lora_model(path)
    lm.train()  # as in the update (dropout is off): some models make no KV cache of their own in train mode
    exp = experience(chat)
    calls = []
    monkeypatch.setattr(forward, "shared_prefix_states", lambda *a: calls.append(1) or SHARED(*a))
    shared, shared_grads = logps_and_grads(lm, exp, True, monkeypatch)
    assert calls == [1]
    full, full_grads = logps_and_grads(lm, exp, False, monkeypatch)
    assert torch.allclose(shared, full, atol=1e-5) and len(set(exp.mask.sum(-1).tolist())) == 3
    scale = max(float(g.abs().max()) for g in full_grads.values())
    assert scale > 0 and all(torch.allclose(shared_grads[n], g, atol=1e-5 * scale) for n, g in full_grads.items())


def test_a_shared_prompt_sums_its_gradient_in_a_fixed_order(family, monkeypatch):
    # the gradient of indexing with repeated rows (index_put with accumulate) is summed in parallel on a CPU, in an
    # order that changes from run to run: a GRPO run was not bitwise reproducible. The prompt's keys and values reach
    # their rows by index_select, whose gradient (index_add) sums in a fixed order
    from torch.utils._python_dispatch import TorchDispatchMode

    class RepeatedAccumulation(TorchDispatchMode):
        found = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            puts = (torch.ops.aten.index_put, torch.ops.aten.index_put_, torch.ops.aten._index_put_impl_)
            if func._overloadpacket in puts and (args[3:4] or [kwargs.get("accumulate")])[0]:
                rows = [i for i in args[1] if i is not None and i.dtype in (torch.int64, torch.int32)]
                self.found += any(len(torch.unique(i)) < i.numel() for i in rows)
            return func(*args, **kwargs)

    f, path = family
    chat, lm = load_chat(resolve_source(str(path))), lora_model(path)
    lm.train()
    mode = RepeatedAccumulation()
    with mode:
        logps_and_grads(lm, experience(chat), True, monkeypatch)
    assert mode.found == 0


def test_a_shared_prompt_is_not_shared_under_gradient_checkpointing(family, monkeypatch):
    # transformers drops the KV cache of a checkpointed layer: sharing would silently drop the prompt
    from llmft.models import forward
    f, path = family
    chat = load_chat(resolve_source(str(path)))
    exp = experience(chat)
    reference, _ = logps_and_grads(lora_model(path), exp, False, monkeypatch)
    lm = lora_model(path, gradient_checkpointing=True)
    lm.train()
    calls = []
    monkeypatch.setattr(forward, "shared_prefix_states", lambda *a: calls.append(1) or SHARED(*a))
    checkpointed, _ = logps_and_grads(lm, exp, True, monkeypatch)
    assert calls == [] and torch.allclose(checkpointed, reference, atol=1e-5)


def test_generation_encodes_a_repeated_prompt_once(family, monkeypatch):
    # the same answers and sampler log-probs as encoding every copy of the prompt, with the prompt run once
    from llmft.config import SamplingConfig
    from llmft.rollout import generation

    f, path = family
    chat, lm = load_chat(resolve_source(str(path))), lora_model(path)
    prompts = [chat.prompt_ids([{"role": "user", "content": t}]) for t in ("the sea", "a lighthouse guides ships")]
    prompts = [p for p in prompts for _ in range(4)]
    sampling = SamplingConfig(max_new_tokens=10, temperature=1.0, seed=3, batch_size=8)
    widths = []
    embed = modeling_body(lm).get_input_embeddings()
    embed.register_forward_hook(lambda m, args, out: widths.append(tuple(args[0].shape)))
    shared = generation.generate(lm, chat, prompts, sampling, logprobs=True)
    assert widths[0] == (2, max(map(len, prompts)) - 1) and widths[1] == (8, 1)  # distinct prompts, then 8 rows
    monkeypatch.setattr(generation, "shared_prompts", lambda *a: {})
    plain = generation.generate(lm, chat, prompts, sampling, logprobs=True)
    assert [g.answer_ids for g in shared] == [g.answer_ids for g in plain]
    assert max(abs(a - b) for s, p in zip(shared, plain, strict=True)
               for a, b in zip(s.logprobs, p.logprobs, strict=True)) < 1e-5


# ---------------------------------------------------------------------------------------------- stages
@pytest.fixture(scope="module")
def chain(family, tmp_path_factory):
    """sft (long enough to learn the answers and their ending) → reward → dpo, kto → ppo, grpo on the family's
    model."""
    f, path = family
    d = tmp_path_factory.mktemp(f"{f.name}-runs")
    (d / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (d / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in PAIRS))
    (d / "prompts.jsonl").write_text("".join(json.dumps({**r, "constraints": [{"type": "lowercase"}]}) + "\n"
                                             for r in ROWS))

    def config(stage: str, model: Path, data: str, steps: int, **extra) -> object:
        cfg = {"model": {"name": str(model)}, "data": {"train": str(d / data)}, "lora": {"r": 8, "alpha": 16,
                                                                                        "dropout": 0.0},
               "train": {"batch_size": 4, "max_steps": steps, "learning_rate": 2e-2, "warmup_ratio": 0.0,
                         "save_every": 100}, "output_dir": str(d / stage), "seed": 0, **extra}
        if stage not in ("ppo", "grpo"):
            cfg["data"]["max_length"] = 160
        (d / f"{stage}.yaml").write_text(yaml.safe_dump(cfg))
        return load_config(stage, d / f"{stage}.yaml")

    runs = {"dir": d}
    runs["sft"] = sft.run(config("sft", path, "sft.jsonl", 0, lora={"r": 16, "alpha": 32, "dropout": 0.0},
                                 train={"batch_size": 4, "max_steps": 80, "learning_rate": 1e-2, "warmup_ratio": 0.0,
                                        "scheduler": "constant", "save_every": 100}))
    runs["reward"] = reward.run(config("reward", d / "sft", "pairs.jsonl", 2))
    runs["dpo"] = dpo.run(config("dpo", d / "sft", "pairs.jsonl", 2))
    runs["kto"] = kto.run(config("kto", d / "sft", "pairs.jsonl", 2))
    runs["ppo_cfg"] = config("ppo", d / "sft", "prompts.jsonl", 2, rollout={"max_new_tokens": 12, "temperature": 1.0},
                             reward={"model": str(d / "reward")}, ppo={"num_minibatches": 2}, samples_every=1)
    runs["ppo"] = ppo.run(runs["ppo_cfg"])
    runs["grpo"] = grpo.run(config("grpo", d / "sft", "prompts.jsonl", 2, rollout={"max_new_tokens": 12,
                                                                                   "temperature": 1.0},
                                   reward={"model": str(d / "reward"), "judges": {"constraints": 1.0}},
                                   train={"batch_size": 4, "grad_accum": 2, "max_steps": 2, "save_every": 100,
                                          "learning_rate": 2e-2}, grpo={"num_generations": 4}))
    return runs


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_trained_answer_ends_where_generation_stops(family, chain):
    from llmft.config import SamplingConfig
    from llmft.models.loading import load_model
    from llmft.rollout.generation import generate

    f, _ = family
    src = resolve_source(str(chain["dir"] / "sft"))
    chat = load_chat(src)
    model = load_model(src, torch.float32, torch.device("cpu"), chain["ppo_cfg"].model)
    prompts = [chat.prompt_ids([{"role": "user", "content": r["prompt"]}]) for r in ROWS]
    gens = generate(model, chat, prompts, SamplingConfig(max_new_tokens=40, temperature=0))
    end = chat.tokenizer.convert_tokens_to_ids(f.turn_end)
    finished = [g for g in gens if g.finished]
    assert len(finished) >= 7, [g.text for g in gens]  # the SFT model learned its answers and how they end ...
    assert all(g.answer_ids[-1] == end for g in finished)  # ... with the turn terminator, where generation stops
    assert sum(g.text.endswith(r["completion"]) for g, r in zip(gens, ROWS, strict=True)) >= 6


def test_the_reward_model_reads_its_score_on_the_terminator(family, chain):
    f, _ = family
    s = reward.setup(load_config("reward", chain["dir"] / "reward.yaml"))
    end = s.chat.tokenizer.convert_tokens_to_ids(f.turn_end)
    for side in ("right", "left"):
        batch = collate_pairs(s.train.pairs[:4], s.chat.pad_id, side=side)
        last, n = last_token_index(batch["attention_mask"]), batch["input_ids"].shape[0]
        assert len(s.train.pairs) == 8 and batch["input_ids"][torch.arange(n), last].tolist() == [end] * n
    assert math.isfinite(chain["reward"]["loss"])


def test_dpo_starts_at_ln2(family, chain):
    first = metrics(chain["dir"] / "dpo")[0]
    assert first["step"] == 1 and first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-6)


def test_kto_starts_at_half_the_weight_with_no_kl(family, chain):
    first = metrics(chain["dir"] / "kto")[0]  # λ_D = λ_U = 1: every answer's loss is 1 − σ(0) at step 0
    assert first["step"] == 1 and first["loss"] == pytest.approx(0.5, abs=1e-6) and first["kl_reference_point"] == 0.0
    assert first.get("rewards/desirable", 0.0) == first.get("rewards/undesirable", 0.0) == 0.0


def test_ppo_samples_the_distribution_it_trains(family, chain):
    # the family's generation_config.json carries sampling defaults (Qwen2.5: repetition_penalty 1.1, top_k 20 ...):
    # none of them may reach the sampler, or its log-probs would not be softmax(z / T)
    rows = metrics(chain["dir"] / "ppo")
    assert rows[0]["logprob_gap"] < 1e-4 and len(rows) == 2
    s = ppo.setup(chain["ppo_cfg"])
    model = ppo.build_model(s)
    exp = sample(model, s, s.train.ids[:8], 0)
    ppo.role_forwards(model, s, exp)
    assert exp.logprob_gap()[0] < 1e-4
    assert torch.equal(exp.old_logps, exp.ref_logps)  # policy == reference before the first update
    exp.put(advantages=exp.mask * 0.5, returns=exp.values)
    first = ppo.update_epochs(model, s, exp, lambda loss: 0.0, step=1)[0]
    assert first["ratio"] == pytest.approx(1.0, abs=1e-6) and first["clip_ratio/region"] == 0.0
    end = s.chat.tokenizer.convert_tokens_to_ids(BY_NAME[family[0].name].turn_end)
    for g in exp.answers:  # responses cut at their first stop id, and the reward model's last token is it
        assert not g.finished or g.answer_ids[-1] in s.chat.stop_ids
    last = last_token_index(exp.attention_mask)
    ended = [i for i, g in enumerate(exp.answers) if g.finished and g.answer_ids[-1] == end]
    assert all(exp.input_ids[i, last[i]] == end for i in ended)


def test_grpo_samples_the_distribution_it_trains(family, chain):
    rows = metrics(chain["dir"] / "grpo")  # μ = 1, one minibatch: the update's forward is the old policy's
    assert len(rows) == 2 and rows[0]["logprob_gap"] < 1e-4 and rows[0]["ratio"] == pytest.approx(1.0, abs=1e-6)


def test_eval_and_generate_run_on_the_family(family, chain, capsys, monkeypatch):
    from tests.helpers.cli import llmft

    d = chain["dir"]
    code, _, err = llmft(capsys, monkeypatch, "eval", "--model", d / "sft", "--compare", d / "ppo", "--prompts",
                         d / "prompts.jsonl", "--reference", d / "sft", "--reward-model", d / "reward", "--set",
                         "sampling.max_new_tokens=40", "--out", d / "report.json")
    assert code == 0, err
    report = json.loads((d / "report.json").read_text())["models"]
    assert report[str(d / "sft")]["eos_share"] >= 0.75 and report[str(d / "sft")]["kl_to_reference"] == 0


def test_multi_turn_grpo_samples_the_distribution_it_trains(family, chain):
    """A two-turn environment on the family's SFT model: the sampler's log-probs equal the trainer's over the policy's
    tokens of both turns, and what the environment added is exactly the context SFT gives the same conversation.
    Qwen3's template drops the earlier turns' think blocks once a user turn follows: refused at start."""
    from llmft.rl.multi_turn import sample_trajectories

    f, _ = family
    d = chain["dir"]
    cfg = {"model": {"name": str(d / "sft")}, "data": {"train": str(d / "prompts.jsonl")},
           "lora": {"r": 8, "alpha": 16, "dropout": 0.0}, "rollout": {"max_new_tokens": 24, "temperature": 1.0},
           "reward": {}, "env": {"name": "tests.helpers.envs:TwoTurns", "max_tokens": 96},
           "train": {"batch_size": 4, "grad_accum": 2, "max_steps": 1}, "grpo": {"num_generations": 4},
           "output_dir": str(d / "grpo-env"), "seed": 0}
    (d / "grpo-env.yaml").write_text(yaml.safe_dump(cfg))
    config = load_config("grpo", d / "grpo-env.yaml")
    if f.name == "qwen3":
        with pytest.raises(DataError, match="renders earlier turns differently"):
            grpo.setup(config)
        return
    s = grpo.setup(config)
    model = grpo.build_model(s)
    metrics_, _ = grpo.grpo_step(model, s, [0, 1], lambda loss: 0.0, 1)
    assert metrics_["logprob_gap"] < 1e-4 and metrics_["env/turns"] > 1.2, metrics_
    # 32 trajectories: a tiny model ends its first turn in 24 tokens only now and then (4 rows drew none once)
    _, _, _, trajectories = sample_trajectories(s.conversations, model, s, s.train.records[:8] * 4, 5)
    two = [t for t in trajectories if t.turns == 2]
    assert two
    for t in two:
        pieces = s.chat.conversation(t.messages, "trajectory")
        context = [ids for ids, answer in pieces if not answer]
        between = [t.ids[i] for i, m in enumerate(t.mask) if m == 0]
        assert t.prompt_ids == context[0] and between == context[1]


CALLS = {"llama3.1": lambda a, b: json.dumps({"name": "add", "parameters": {"a": a, "b": b}}),
         "qwen2.5": lambda a, b: "<tool_call>\n" + json.dumps({"name": "add", "arguments": {"a": a, "b": b}})
         + "\n</tool_call>",
         "mistral": lambda a, b: "[TOOL_CALLS] " + json.dumps([{"name": "add", "arguments": {"a": a, "b": b}}])}


@pytest.mark.parametrize("name", list(TOOL_FAMILIES))
def test_tool_using_grpo_samples_the_distribution_it_trains(name, tmp_path):
    """Each family whose template has tools, in its own call format: SFT on demonstrations of the tool in use (the
    `tools` column), then a GRPO step with a calculator environment: the calls are parsed in the family's format and
run (a tiny model's are mostly broken JSON, whose error is the result it reads), the sampler's
    log-probs equal the trainer's over both turns, and the tool's result sits in the sequence exactly as SFT's
    context for the same conversation. Mistral's template moves the tools to the last user turn: refused at start."""
    from transformers.utils import get_json_schema

    from llmft.rl.multi_turn import sample_trajectories
    from tests.helpers.envs import add

    path = build(TOOL_FAMILIES[name], tmp_path / "base")
    sums = [(a, b) for a in range(1, 7) for b in range(1, 5)]
    demos = [{"tools": [get_json_schema(add)], "messages": [
        {"role": "user", "content": f"what is {a} + {b}?"}, {"role": "assistant", "content": CALLS[name](a, b)},
        {"role": "tool", "name": "add", "content": str(a + b)}, {"role": "assistant", "content": str(a + b)}]}
        for a, b in sums]
    (tmp_path / "demos.jsonl").write_text("".join(json.dumps(r) + "\n" for r in demos))
    (tmp_path / "sums.jsonl").write_text("".join(json.dumps({"a": a, "b": b}) + "\n" for a, b in sums))
    lora = {"r": 16, "alpha": 32, "dropout": 0.0}
    (tmp_path / "sft.yaml").write_text(yaml.safe_dump({
        "model": {"name": str(path)}, "data": {"train": str(tmp_path / "demos.jsonl"), "max_length": 2048},
        "lora": lora, "train": {"batch_size": 4, "max_steps": 80, "learning_rate": 2e-2, "warmup_ratio": 0.0,
                                "scheduler": "constant", "save_every": 100},
        "output_dir": str(tmp_path / "sft"), "seed": 0}))
    (tmp_path / "grpo.yaml").write_text(yaml.safe_dump({
        "model": {"name": str(tmp_path / "sft")}, "data": {"train": str(tmp_path / "sums.jsonl"),
                                                           "max_prompt_length": 2048},
        "lora": lora, "rollout": {"max_new_tokens": 40, "temperature": 0.5}, "reward": {},
        "env": {"name": "tests.helpers.envs:Calculator", "max_tokens": 160},
        "train": {"batch_size": 4, "grad_accum": 2, "max_steps": 1}, "grpo": {"num_generations": 4},
        "output_dir": str(tmp_path / "grpo"), "seed": 0}))
    if name == "mistral":
        cfg = load_config("grpo", tmp_path / "grpo.yaml")
        cfg.model.name = str(path)
        with pytest.raises(DataError, match="renders earlier turns differently"):
            grpo.setup(cfg)
        return
    sft.run(load_config("sft", tmp_path / "sft.yaml"))
    s = grpo.setup(load_config("grpo", tmp_path / "grpo.yaml"))
    model = grpo.build_model(s)
    metrics_, _ = grpo.grpo_step(model, s, [0, 1], lambda loss: 0.0, 1)
    assert metrics_["logprob_gap"] < 1e-4 and metrics_["env/tool_calls"] > 0, metrics_
    _, _, _, trajectories = sample_trajectories(s.conversations, model, s, s.train.records[:8], 5)
    called = [t for t in trajectories if t.tool_calls]
    assert called
    for t in called:  # a tiny model's calls are often broken JSON: the error is the tool's result, read by the model
        results = [m["content"] for m in t.messages if m["role"] == "tool"]
        assert all(r == str(t.env.answer) or r.startswith("error: ") for r in results)
        plain = [{k: v for k, v in m.items() if k != "tool_calls"} for m in t.messages]  # as an SFT row holds it
        pieces = s.chat.conversation(plain, "trajectory", s.conversations.tools)
        context = [ids for ids, answer in pieces if not answer]
        between = [t.ids[i] for i, m in enumerate(t.mask) if m == 0]
        assert t.prompt_ids == context[0] and between == [i for c in context[1:] for i in c]
