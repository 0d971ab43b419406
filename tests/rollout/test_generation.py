"""Batched generation: left padding is invisible, responses stop at the first EOS, `llmft generate` I/O."""

from __future__ import annotations

import functools
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from llmft.config import SamplingConfig
from llmft.rollout.generation import generate
from tests.helpers.cli import assert_one_line_error, llmft


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir)


@pytest.fixture
def chat(tiny_chat):
    return tiny_chat


def prompts(chat, texts):
    return [chat.prompt_ids([{"role": "user", "content": t}]) for t in texts]


def test_batched_left_padded_greedy_equals_one_at_a_time(model, chat):
    ids = prompts(chat, ["hello", "write three words about the sea please now", "the lazy dog"])
    assert len({len(p) for p in ids}) == 3
    greedy = SamplingConfig(max_new_tokens=8, temperature=0, batch_size=3)
    together = generate(model, chat, ids, greedy)
    alone = [generate(model, chat, [p], greedy)[0] for p in ids]
    assert [g.answer_ids for g in together] == [g.answer_ids for g in alone]
    assert [g.prompt_ids for g in together] == ids  # returned in the prompts' order


def test_sampling_is_reproducible_by_seed(model, chat):
    ids = prompts(chat, ["hello", "the sea"]) * 2
    a = generate(model, chat, ids, SamplingConfig(max_new_tokens=12, temperature=1.0, seed=3))
    b = generate(model, chat, ids, SamplingConfig(max_new_tokens=12, temperature=1.0, seed=3))
    c = generate(model, chat, ids, SamplingConfig(max_new_tokens=12, temperature=1.0, seed=4))
    assert [g.answer_ids for g in a] == [g.answer_ids for g in b] != [g.answer_ids for g in c]


def test_response_is_cut_after_the_first_stop_id(chat):
    eos = chat.tokenizer.eos_token_id
    assert chat.cut([10, 11, eos, 12, eos, eos]) == ([10, 11, eos], True)
    assert "<|im_end|>" not in chat.decode([10, 11, eos])
    assert chat.cut([10, 11, 12]) == ([10, 11, 12], False)


def test_generate_command_keeps_rows_and_adds_responses(capsys, monkeypatch, tiny_model_dir, tmp_path):
    src = tmp_path / "prompts.jsonl"
    rows = [{"prompt": "hello", "constraints": [{"type": "lowercase"}]},
            {"messages": [{"role": "user", "content": "the sea"}, {"role": "assistant", "content": "x"}]}]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out.jsonl"
    code, _, err = llmft(capsys, monkeypatch, "generate", tiny_model_dir, "--prompts", src, "--out", out,
                         "--max-new-tokens", "5", "--temperature", "0")
    assert code == 0, err
    got = [json.loads(x) for x in out.read_text().splitlines()]
    assert got[0]["constraints"] == rows[0]["constraints"] and len(got) == 2
    assert all({"response", "finished", "response_tokens"} <= set(r) for r in got)
    assert all(0 < r["response_tokens"] <= 5 for r in got)


@pytest.mark.parametrize("content, args, expected", [
    (None, [], "data file not found"),
    ("", [], "the dataset is empty"),
    ('{"question": "hi"}\n', [], "p.jsonl:1: a prompt row needs a 'prompt'"),
    ('{"prompt": ""}\n', [], "p.jsonl:1: the prompt must be a non-empty string"),
    ('{"prompt": "hi"}\n', ["--temperature", "-1"], "llmft generate: 'sampling.temperature' must be >= 0"),
    ('{"prompt": "hi"}\n', ["--top-p", "0"], "'sampling.top_p' must be > 0 and <= 1"),
    ('{"prompt": "hi"}\n', ["--dtype", "int8"], "'dtype' expects one of 'auto', 'float32'"),
])
def test_generate_bad_input(capsys, monkeypatch, tiny_model_dir, tmp_path, content, args, expected):
    path = tmp_path / "p.jsonl"
    if content is not None:
        path.write_text(content)
    code, _, err = llmft(capsys, monkeypatch, "generate", tiny_model_dir, "--prompts", path, *args)
    assert_one_line_error(code, err, expected)


def test_generation_runs_in_eval_mode(model, chat):
    model.train()
    generate(model, chat, prompts(chat, ["hello"]), SamplingConfig(max_new_tokens=2, temperature=0))
    assert not model.training and torch.is_grad_enabled()


def test_checkpoint_sampling_defaults_never_reach_the_sampler(tiny_model_dir, tmp_path):
    # instruct checkpoints ship sampling defaults; transformers fills every option left unset from them. The sampler
    # must draw from exactly softmax(z / T), and report its own log-probs, or RL optimises another distribution
    import shutil

    from llmft.models.forward import hidden_states
    from llmft.models.loading import load_chat
    from llmft.models.sources import resolve_source
    from llmft.rollout.experience import answer_logps, pack

    leaky = tmp_path / "leaky"
    shutil.copytree(tiny_model_dir, leaky)
    chat = load_chat(resolve_source(str(leaky)))
    eos = chat.tokenizer.eos_token_id
    (leaky / "generation_config.json").write_text(json.dumps({
        "eos_token_id": [eos], "do_sample": True, "temperature": 0.2, "top_k": 3, "top_p": 0.5,
        "repetition_penalty": 1.5, "no_repeat_ngram_size": 1, "min_new_tokens": 6, "suppress_tokens": [eos],
        "bad_words_ids": [[5]], "begin_suppress_tokens": [7]}))
    model = AutoModelForCausalLM.from_pretrained(leaky)
    assert model.generation_config.repetition_penalty == 1.5  # the model carries them ...
    ids = prompts(chat, ["hello", "the sea", "write three words", "the lazy dog"]) * 4
    gens = generate(model, chat, ids, SamplingConfig(max_new_tokens=10, temperature=0.7, seed=1), logprobs=True)
    assert model.generation_config.repetition_penalty == 1.5  # ... and keep them after generating
    exp = pack(gens, chat.pad_id, torch.device("cpu"))
    with torch.no_grad():
        recomputed, _ = answer_logps(model, functools.partial(hidden_states, model), exp, list(range(exp.size)), 0.7,
                                    torch.float32)
    gap = ((recomputed - exp.sampler_logps).abs() * exp.mask).max()
    assert gap < 1e-5  # ... but the sampler drew from softmax(z / 0.7) alone (suppressed EOS, banned words,
    # top-k, penalties: each would move probability mass, and the drawn tokens' log-probs with it)


def test_the_token_draw_follows_the_distribution_and_never_draws_a_zero():
    # inverse-CDF draw: frequencies of 40,000 draws within 4 standard errors of softmax(scores); a token of
    # probability 0 (cut by top-k / top-p: -inf) never drawn, not even at the ends of the vocabulary
    from llmft.rollout.generation import TokenDraw

    probs = torch.tensor([0.0, 0.5, 0.0, 0.2, 0.3, 0.0])
    scores = probs.log().expand(40_000, -1)
    draw = TokenDraw(seed=0, sample=True, record=True)
    out = draw(None, scores)
    token = out.argmax(-1)
    assert torch.isfinite(out).sum(-1).eq(1).all() and out.max(-1).values.eq(0).all()  # one token left standing
    freq = torch.bincount(token, minlength=6).float() / len(token)
    se = (probs * (1 - probs) / len(token)).sqrt()
    assert freq[probs == 0].sum() == 0 and ((freq - probs).abs() <= 4 * se + 1e-9).all(), freq
    assert torch.allclose(draw.result()[:, 0], probs[token].log())  # the sampler's log-prob of what it drew
    last = TokenDraw(seed=1, sample=True, record=False)(None, torch.tensor([[0.0] + [float("-inf")] * 5,
                                                                         [float("-inf")] * 5 + [0.0]]))
    assert last.argmax(-1).tolist() == [0, 5]


def test_the_token_draw_resolves_probabilities_below_float32s_step(monkeypatch):
    # issue 28: a float32 uniform and running sum resolve only 2^-24 (6e-8). In float64: a uniform above
    # 1 - 2^-30 draws the last token, of probability 2^-30, and the uniforms themselves are finer than 2^-24
    from llmft.rollout.generation import TokenDraw, inverse_cdf

    tiny = 2.0 ** -30
    p = torch.tensor([[1 - tiny, tiny]], dtype=torch.float64)
    assert inverse_cdf(p, torch.tensor([[1 - 2.0 ** -31]], dtype=torch.float64)).tolist() == [[1]]
    assert inverse_cdf(p, torch.tensor([[1 - 2.0 ** -29]], dtype=torch.float64)).tolist() == [[0]]
    seen, rand = [], torch.rand
    monkeypatch.setattr(torch, "rand", lambda *a, **k: seen.append(rand(*a, **k)) or seen[-1])
    TokenDraw(seed=0, sample=True, record=False)(None, torch.zeros(64, 3))
    grid = seen[0] * 2 ** 24
    assert seen[0].dtype == torch.float64 and (grid != grid.floor()).any()  # not all on float32's grid


def test_the_token_draw_is_seeded_and_greedy_keeps_the_scores():
    from llmft.rollout.generation import TokenDraw

    scores = torch.randn(8, 50)
    a, b, c = (TokenDraw(seed, True, False)(None, scores).argmax(-1) for seed in (3, 3, 4))
    assert a.tolist() == b.tolist() != c.tolist()
    greedy = TokenDraw(0, False, True)
    assert greedy(None, scores) is scores
    assert torch.allclose(greedy.result()[:, 0], scores.log_softmax(-1).max(-1).values)


def test_the_multinomial_draw_reproduces_transformers_sampling(model, chat):
    # draw: multinomial samples exactly as transformers' own do_sample does from the same seed (so data sampled
    # that way, like the demo's preference files, regenerates byte for byte)
    ids = prompts(chat, ["hello", "the sea"])
    ours = generate(model, chat, ids, SamplingConfig(max_new_tokens=10, temperature=0.8, seed=5, draw="multinomial"))
    torch.manual_seed(5)
    from llmft.data.examples import Example, collate

    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    batch = collate([Example(ids[i], ids[i]) for i in order], chat.pad_id, side="left")
    out = model.generate(**batch, do_sample=True, temperature=0.8, top_k=0, top_p=1.0, max_new_tokens=10,
                         pad_token_id=chat.pad_id, eos_token_id=chat.generation_ids()["eos_token_id"])
    theirs = {i: chat.cut(out[row, batch["input_ids"].shape[1]:].tolist())[0] for row, i in enumerate(order)}
    assert [g.answer_ids for g in ours] == [theirs[i] for i in range(len(ids))]


def test_a_draw_that_lands_on_a_zero_probability_token_moves_to_a_drawable_one():
    # on CUDA an fp32 scan can step up on a token of probability 0 (the sum's rounding), so the search may land on
    # it: such a draw goes to the nearest drawable token before it, or the first one after when there is none
    from llmft.errors import ModelError
    from llmft.rollout.generation import locate

    p = torch.tensor([[0.0, 0.5, 0.0, 0.0, 0.5], [0.0, 0.0, 1.0, 0.0, 0.0], [0.2, 0.8, 0.0, 0.0, 0.0]])
    token = torch.tensor([[3], [0], [1]])
    assert locate(p, token).tolist() == [[1], [2], [1]]
    with pytest.raises(ModelError, match="not finite"):
        locate(torch.tensor([[float("nan"), 1.0]]), torch.tensor([[0]]))
