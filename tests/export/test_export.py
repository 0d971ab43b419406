"""`llmft export`: a run's adapter chain merged into a plain transformers model (or GGUF), checked against the adapters
applied by peft itself, not against llmft's own merge."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from llmft.config import load_config
from llmft.stages import dpo, reward, sft
from tests.helpers.cli import assert_one_line_error, llmft
from tests.helpers.tiny import PAIRS, ROWS, TEXT, ids


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    """sft on the tiny model, then dpo and reward on the sft output: two steps each, at a learning rate that moves
    every LoRA weight visibly."""
    d = tmp_path_factory.mktemp("export")
    (d / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (d / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in PAIRS))

    def run(stage, module, model, data, **extra):
        cfg = {"model": {"name": str(model)}, "data": {"train": str(d / data), "max_length": 64},
               "lora": {"r": 4, "alpha": 8, "dropout": 0.0}, "output_dir": str(d / stage), "seed": 0,
               "train": {"batch_size": 4, "max_steps": 2, "learning_rate": 5e-2, "warmup_ratio": 0.0,
                         "save_every": 100}, **extra}
        (d / f"{stage}.yaml").write_text(yaml.safe_dump(cfg))
        module.run(load_config(stage, d / f"{stage}.yaml"))
        return d / stage

    return {"dir": d, "base": tiny_model_dir, "sft": run("sft", sft, tiny_model_dir, "sft.jsonl"),
            "dpo": run("dpo", dpo, d / "sft", "pairs.jsonl"),
            "reward": run("reward", reward, d / "sft", "pairs.jsonl")}


def peft_chain(runs, last: str):
    """base → sft merged by peft → `last`'s adapter active (unmerged): the model the export must equal."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(runs["base"], dtype=torch.float32)
    model = PeftModel.from_pretrained(model, runs["sft"]).merge_and_unload()
    return PeftModel.from_pretrained(model, runs[last]).eval() if last != "sft" else model.eval()




@torch.no_grad()
def test_a_policy_exports_as_a_plain_model_equal_to_its_adapter_chain(runs, capsys, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    out = runs["dir"] / "exported-dpo"
    code, stdout, err = llmft(capsys, monkeypatch, "export", runs["dpo"], "--out", out, "--dtype", "float32")
    assert code == 0, err
    assert "2 run(s) merged" in stdout and not (out / "adapter_config.json").exists()
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.float32
    tok = AutoTokenizer.from_pretrained(out)
    x = ids(tok)
    expected = peft_chain(runs, "dpo")(x).logits
    assert torch.allclose(model(x).logits, expected, atol=1e-4)
    base = AutoModelForCausalLM.from_pretrained(runs["base"]).eval()
    assert (base(x).logits - expected).abs().max() > 1e-2  # the adapters moved the model: the test can fail
    assert (peft_chain(runs, "sft")(x).logits - expected).abs().max() > 1e-3  # and dpo's adapter counts too
    stop = json.loads((runs["dpo"] / "generation_config.json").read_text())["eos_token_id"]
    assert GenerationConfig.from_pretrained(out).eos_token_id == stop
    assert tok.chat_template == AutoTokenizer.from_pretrained(runs["dpo"]).chat_template
    record = json.loads((out / "llmft-export.json").read_text())
    assert [r.get("stage") for r in record["lineage"]] == ["dpo", "sft", None]
    assert record["lineage"][-1]["base_model"] == str(runs["base"])


@torch.no_grad()
def test_the_dtype_is_the_one_asked_for(runs, capsys, monkeypatch):
    from transformers import AutoModelForCausalLM

    out = runs["dir"] / "exported-bf16"
    code, _, err = llmft(capsys, monkeypatch, "export", runs["sft"], "--out", out, "--dtype", "bfloat16")
    assert code == 0, err
    model = AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


@torch.no_grad()
def test_a_reward_model_exports_as_a_classifier_scoring_like_the_scorer(runs, capsys, monkeypatch):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from llmft.models.reward_model import RewardScorer

    out = runs["dir"] / "exported-reward"
    code, _, err = llmft(capsys, monkeypatch, "export", runs["reward"], "--out", out)
    assert code == 0, err
    classifier = AutoModelForSequenceClassification.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    scorer = RewardScorer.load(str(runs["reward"]), device="cpu")
    prompts, answers = [p["prompt"] for p in PAIRS], [p["chosen"] for p in PAIRS]
    expected = scorer.score(prompts, answers)
    seqs = [a + b for a, b in (scorer.chat.encode([{"role": "user", "content": p}], r)
                               for p, r in zip(prompts, answers, strict=True))]
    assert all(s[-1] == tok.convert_tokens_to_ids("<|im_end|>") for s in seqs)
    batch = tok.pad({"input_ids": seqs}, return_tensors="pt")  # right padding, with the export's own pad token
    scores = classifier(**batch).logits.squeeze(-1)
    # the head's bias has no place in transformers' bias-free score layer: recorded, and said on the terminal
    offset = json.loads((out / "llmft-export.json").read_text())["score_offset"]
    assert offset == pytest.approx(float(scorer.model.head.bias), abs=1e-7) and "lower by it" in err
    assert torch.allclose(scores + offset, expected, atol=1e-4) and expected.std() > 1e-3
    assert tok.pad_token == "<|endoftext|>"  # the tiny tokenizer pads with <|im_end|>, the terminator itself
    tok.pad_token = "<|im_end|>"  # with the tokenizer's own pad, each score would be read one token early
    early = classifier(**tok.pad({"input_ids": seqs}, return_tensors="pt")).logits.squeeze(-1)
    assert (early + offset - expected).abs().max() > 1e-2


def tiny_vocab_is_smollm(runs, monkeypatch) -> None:
    """llmft names llama.cpp's pre-tokenizer only for vocabularies it knows (SmolLM2's 49,152 ...): the tiny test
    tokenizer (byte-level BPE, as SmolLM2's) is registered as SmolLM2's for these tests."""
    from transformers import AutoConfig

    from llmft.export import gguf as gguf_export
    vocab = AutoConfig.from_pretrained(runs["base"]).vocab_size
    monkeypatch.setitem(gguf_export.PRE_TOKENIZERS, ("llama", vocab), "smollm")


def test_gguf_loads_back_in_transformers_with_the_same_logits(runs, capsys, monkeypatch):
    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tiny_vocab_is_smollm(runs, monkeypatch)

    for quant in ("f16", "q8_0"):
        out = runs["dir"] / f"gguf-{quant}"
        code, stdout, err = llmft(capsys, monkeypatch, "export", runs["dpo"], "--out", out, "--format", "gguf",
                                  "--quant", quant)
        assert code == 0, err
        with torch.no_grad():
            loaded = AutoModelForCausalLM.from_pretrained(out, gguf_file="model.gguf", dtype=torch.float32).eval()
            expected = peft_chain(runs, "dpo").merge_and_unload()
            for p in expected.parameters():  # the same rounding the file applies
                if p.ndim == 2 and quant == "f16":
                    p.copy_(p.half().float())
                elif p.ndim == 2:
                    q = gguf.quants.quantize(p.numpy(), gguf.GGMLQuantizationType.Q8_0)
                    p.copy_(torch.from_numpy(gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q8_0)))
            tok = AutoTokenizer.from_pretrained(out, gguf_file="model.gguf")
            x = ids(AutoTokenizer.from_pretrained(runs["dpo"]))
            assert torch.equal(ids(tok), x)  # the tokenizer comes back from the file's vocabulary and merges
            assert torch.allclose(loaded(x).logits, expected(x).logits, atol=1e-4)
        reader = gguf.GGUFReader(out / "model.gguf")
        eos = reader.fields["tokenizer.ggml.eos_token_id"]
        assert int(eos.parts[eos.data[0]][0]) == 2  # llama.cpp stops at the turn terminator


def test_gguf_export_of_a_qwen2_model(tmp_path, capsys, monkeypatch):
    # no rotary reordering and attention biases: a Qwen2.5-shaped model through one sft step
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.helpers.families import BY_NAME, build

    path = build(BY_NAME["qwen2.5"], tmp_path / "qwen")
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    cfg = {"model": {"name": str(path)}, "data": {"train": str(tmp_path / "sft.jsonl"), "max_length": 96},
           "lora": {"r": 4, "alpha": 8, "dropout": 0.0}, "output_dir": str(tmp_path / "run"), "seed": 0,
           "train": {"batch_size": 4, "max_steps": 1, "learning_rate": 5e-2, "warmup_ratio": 0.0}}
    (tmp_path / "sft.yaml").write_text(yaml.safe_dump(cfg))
    sft.run(load_config("sft", tmp_path / "sft.yaml"))
    code, _, err = llmft(capsys, monkeypatch, "export", tmp_path / "run", "--out", tmp_path / "out", "--format", "gguf")
    assert code == 0, err
    with torch.no_grad():
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", gguf_file="model.gguf", dtype=torch.float32)
        code, _, err = llmft(capsys, monkeypatch, "export", tmp_path / "run", "--out", tmp_path / "hf")
        assert code == 0, err
        plain = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
        for p in plain.parameters():
            if p.ndim == 2:
                p.copy_(p.half().float())
        x = torch.tensor([AutoTokenizer.from_pretrained(tmp_path / "run")("the sea is blue")["input_ids"]])
        assert type(loaded).__name__ == "Qwen2ForCausalLM"
        assert torch.allclose(loaded.eval()(x).logits, plain.eval()(x).logits, atol=1e-4)


def test_export_refuses_what_it_cannot_do_safely(runs, capsys, monkeypatch, tmp_path):
    stranger = tmp_path / "thesis"
    stranger.mkdir()
    (stranger / "chapter1.tex").write_text("months of work")
    cases = [
        (("export", runs["sft"], "--out", stranger), "exists and is not an llmft export"),
        (("export", tmp_path / "nowhere", "--out", tmp_path / "o"), "does not exist"),
        (("export", runs["base"], "--out", tmp_path / "o"), "not an llmft run"),
        (("export", runs["sft"], "--out", runs["sft"] / "inside"), "overlaps the run"),
        (("export", runs["reward"], "--out", tmp_path / "o", "--format", "gguf"), "reward model"),
        (("export", runs["sft"], "--out", tmp_path / "o", "--format", "onnx"), "--format onnx"),
        (("export", runs["sft"], "--out", tmp_path / "o", "--dtype", "int4"), "--dtype int4"),
        (("export", runs["sft"], "--out", tmp_path / "o", "--format", "gguf"), "pre-tokenizer"),
        (("export", runs["sft"], "--out", tmp_path / "o", "--quant", "q8_0"), "--quant applies to --format gguf"),
        (("export", runs["sft"], "--out", tmp_path / "o", "--format", "gguf", "--dtype", "float16"),
         "--dtype applies to --format hf"),
    ]
    for args, expected in cases:
        code, _, err = llmft(capsys, monkeypatch, *args)
        assert_one_line_error(code, err, expected)
    assert (stranger / "chapter1.tex").read_text() == "months of work" and not (tmp_path / "o").exists()
    out = tmp_path / "again"
    assert llmft(capsys, monkeypatch, "export", runs["sft"], "--out", out)[0] == 0
    code, _, err = llmft(capsys, monkeypatch, "export", runs["sft"], "--out", out)
    assert_one_line_error(code, err, "--overwrite")
    assert llmft(capsys, monkeypatch, "export", runs["dpo"], "--out", out, "--overwrite")[0] == 0
    assert json.loads((out / "llmft-export.json").read_text())["lineage"][0]["stage"] == "dpo"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary folder left


def test_gguf_refuses_other_architectures():
    from transformers import Gemma2Config, LlamaConfig, Qwen2Config

    from llmft.errors import LlmftError
    from llmft.export.gguf import check_exportable

    with pytest.raises(LlmftError, match="supports llama and qwen2 models; this one is gemma2"):
        check_exportable(Gemma2Config(), "f16")
    with pytest.raises(LlmftError, match="--quant q4_k"):
        check_exportable(Qwen2Config(), "q4_k")
    with pytest.raises(LlmftError, match="rope scaling llama3"):
        scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 8192}
        check_exportable(LlamaConfig(vocab_size=128256, rope_scaling=scaling), "f16")


def test_llama_cpp_runs_the_gguf(runs, capsys, monkeypatch):
    # llama.cpp itself (llama-cpp-python, not an llmft dependency: it compiles llama.cpp when installed) reads the
    # file: the same tokens, logits close to transformers' on the same f16 weights, and it stops at the terminator
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tiny_vocab_is_smollm(runs, monkeypatch)

    out, plain = runs["dir"] / "gguf-for-llama-cpp", runs["dir"] / "hf-for-llama-cpp"
    assert llmft(capsys, monkeypatch, "export", runs["dpo"], "--out", out, "--format", "gguf")[0] == 0
    assert llmft(capsys, monkeypatch, "export", runs["dpo"], "--out", plain, "--dtype", "float32")[0] == 0
    llm = llama_cpp.Llama(model_path=str(out / "model.gguf"), n_ctx=128, logits_all=True, verbose=False)
    tok = AutoTokenizer.from_pretrained(runs["dpo"])
    x = ids(tok)[0].tolist()
    assert llm.tokenize(TEXT.encode(), add_bos=False, special=True) == x and llm.token_eos() == x[-1]
    llm.eval(x)
    with torch.no_grad():
        model = AutoModelForCausalLM.from_pretrained(plain, dtype=torch.float32).eval()
        for p in model.parameters():
            if p.ndim == 2:
                p.copy_(p.half().float())
        expected = model(torch.tensor([x])).logits[0]
    got = torch.tensor(llm.scores[:len(x)])
    assert (got - expected).abs().max() < 0.02 * (1 + expected.abs().max())
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() >= 0.9
