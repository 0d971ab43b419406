"""End to end on the embedded SmolLM2-135M-Instruct (slow: converts the GGUF once, then trains 2 steps)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmft.config import load_config
from llmft.models.sources import embedded_gguf, resolve_source
from llmft.stages import sft
from tests.helpers import ROOT

pytestmark = pytest.mark.slow



@pytest.fixture(scope="module")
def embedded():
    pytest.importorskip("gguf")
    try:
        return resolve_source("smollm2-135m-instruct")
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"embedded model unavailable: {e}")


def test_embedded_model_is_cached_as_safetensors(embedded):
    assert embedded.kind == "embedded" and (Path(embedded.path) / "model.safetensors").is_file()
    assert resolve_source("smollm2-135m-instruct").path == embedded.path  # converted once, reused


def test_gguf_file_source_converts_into_the_cache(embedded, tmp_path, monkeypatch):
    monkeypatch.setenv("LLMFT_CACHE", str(tmp_path))
    src = resolve_source(str(embedded_gguf("smollm2-135m-instruct")))
    assert src.kind == "gguf" and Path(src.path).parent == tmp_path / "models"
    assert (Path(src.path) / "tokenizer_config.json").is_file()


def test_shipped_sft_config_trains_and_the_output_generates(embedded, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "sft"
    cfg = load_config("sft", ROOT / "configs" / "sft.yaml",
                      [f"output_dir={out}", "train.max_steps=2", "train.batch_size=2", "train.grad_accum=1",
                       "data.eval=null", f"data.train={ROOT / 'data/demo/sft_train.jsonl'}"])
    metrics = sft.run(cfg)
    assert metrics["loss"] > 0
    manifest = json.loads((out / "llmft.json").read_text())
    assert manifest["model"] == {"source": "smollm2-135m-instruct", "kind": "embedded",
                                 "resolved": "smollm2-135m-instruct", "root": "smollm2-135m-instruct",
                                 "kernels": False, "embedding_rows": 49152}
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(embedded.path), out)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.pad_token == tok.eos_token == "<|im_end|>"
    enc = tok.apply_chat_template([{"role": "user", "content": "Say hi."}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    assert model.generate(**enc, max_new_tokens=3, do_sample=False).shape[1] == enc["input_ids"].shape[1] + 3


def test_preference_data_regenerates_byte_identical(embedded, tmp_path):
    """The first chunk of prompts (8) regenerates the first pairs of the shipped files exactly; the
    prompt-only PPO file regenerates whole."""
    import subprocess
    import sys

    subprocess.run([sys.executable, str(ROOT / "scripts/make_pref_data.py"), "--seed", "0", "--limit", "8",
                    "--out", str(tmp_path)], check=True, capture_output=True)
    for name in ("pref_train.jsonl", "pref_eval.jsonl"):
        fresh = (tmp_path / name).read_text().splitlines()
        shipped = (ROOT / "data/demo" / name).read_text().splitlines()
        assert fresh and fresh == shipped[:len(fresh)], name
    assert (tmp_path / "ppo_train.jsonl").read_bytes() == (ROOT / "data/demo/ppo_train.jsonl").read_bytes()
