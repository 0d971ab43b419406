"""A tiny Llama model and a ChatML tokenizer built offline in a second (pad == eos), and the rows the tests train on."""

from __future__ import annotations

import torch

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


ROWS = [{"prompt": f"write {w} words about the sea", "completion": f"the sea is {c}"}
        for w, c in [("two", "blue"), ("three", "deep and wide"), ("one", "salty"), ("four", "calm at night"),
                     ("five", "home to the quick fish"), ("six", "where ships go at night"),
                     ("seven", "lazy and warm in summer"), ("eight", "the capital of blue")]]


PAIRS = [{"prompt": f"write {w} words about the sea", "chosen": f"the sea is {c}", "rejected": r}
         for w, c, r in [("two", "blue", "hello world"), ("three", "deep and wide", "the lazy dog"),
                         ("one", "salty", "paris is the capital of france"), ("four", "calm at night", "hello"),
                         ("five", "home to the quick fish", "the quick brown fox jumps over the lazy dog"),
                         ("six", "where ships go at night", "water boils at one hundred degrees"),
                         ("seven", "lazy and warm in summer", "answer in lowercase please"),
                         ("eight", "the capital of blue", "the dog jumps")]]


TEXT = "<|im_start|>user\nwrite two words about the sea<|im_end|>\n<|im_start|>assistant\nthe sea is blue<|im_end|>"


def ids(tokenizer) -> torch.Tensor:
    return torch.tensor([tokenizer(TEXT, add_special_tokens=False)["input_ids"]])
