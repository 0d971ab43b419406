"""Fixtures: a tiny Llama model and a ChatML tokenizer built offline in a second, with pad == eos."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CORPUS = ["the quick brown fox jumps over the lazy dog", "a lighthouse guides ships at night",
          "paris is the capital of france", "water boils at one hundred degrees",
          "write three words about the sea", "answer in lowercase please", "hello world"] * 20


def build_tokenizer(chat_template: str | None = CHATML):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    raw = Tokenizer(models.BPE(unk_token=None))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  pad_token="<|im_end|>", unk_token="<|endoftext|>")
    tok.chat_template = chat_template
    return tok


def build_model(vocab_size: int, seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=None,
                      initializer_range=0.2)  # wide init: LoRA on a tiny random model then learns fast
    return LlamaForCausalLM(cfg)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A local Hugging Face directory: 2-layer Llama (hidden 32) + ChatML tokenizer, pad == eos. The model's config has
    no pad_token_id: an embedding's padding_idx row starts at zero, and EOS (= pad) could never be emitted."""
    path = tmp_path_factory.mktemp("tiny-model")
    tok = build_tokenizer()
    build_model(len(tok)).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="session")
def tiny_chat(tiny_tokenizer):
    from llmft.data.chat import Chat

    return Chat(tiny_tokenizer)


ROWS = [{"prompt": f"write {w} words about the sea", "completion": f"the sea is {c}"}
        for w, c in [("two", "blue"), ("three", "deep and wide"), ("one", "salty"), ("four", "calm at night"),
                     ("five", "home to the quick fish"), ("six", "where ships go at night"),
                     ("seven", "lazy and warm in summer"), ("eight", "the capital of blue")]]


@pytest.fixture
def sft_data(tmp_path) -> Path:
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path


PAIRS = [{"prompt": f"write {w} words about the sea", "chosen": f"the sea is {c}", "rejected": r}
         for w, c, r in [("two", "blue", "hello world"), ("three", "deep and wide", "the lazy dog"),
                         ("one", "salty", "paris is the capital of france"), ("four", "calm at night", "hello"),
                         ("five", "home to the quick fish", "the quick brown fox jumps over the lazy dog"),
                         ("six", "where ships go at night", "water boils at one hundred degrees"),
                         ("seven", "lazy and warm in summer", "answer in lowercase please"),
                         ("eight", "the capital of blue", "the dog jumps")]]


@pytest.fixture
def pref_data(tmp_path) -> Path:
    """Eight {prompt, chosen, rejected} pairs: the chosen answers talk about the sea."""
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in PAIRS))
    return path


def set_keys(cfg: dict, overrides: dict) -> dict:
    """Set nested keys written with double underscores (train__max_steps=2 → cfg["train"]["max_steps"])."""
    for key, value in overrides.items():
        node = cfg
        *parents, leaf = key.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return cfg


@pytest.fixture
def write_config(tmp_path):
    """Write a YAML config for the tiny model and return its path."""

    def write(model_dir: Path, data: Path, **overrides) -> Path:
        cfg = {"model": {"name": str(model_dir)},
               "data": {"train": str(data), "max_length": 64},
               "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
               "train": {"batch_size": 4, "learning_rate": 1e-2, "epochs": 2, "warmup_ratio": 0.0,
                         "save_every": 2},
               "output_dir": str(tmp_path / "run"), "seed": 0}
        return save_config(tmp_path, "cfg", set_keys(cfg, overrides))

    return write


def save_config(folder: Path, prefix: str, cfg: dict) -> Path:
    """Write `cfg` as the next unused PREFIX-N.yaml in `folder` and return its path."""
    import yaml

    path = folder / f"{prefix}-{len(list(folder.glob(f'{prefix}-*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def crash_then_resume(run, cfg, monkeypatch, at_step: int = 5) -> None:
    """Run a stage, kill it (KeyboardInterrupt) inside optimizer step `at_step`, then resume it to the end."""
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
