"""scripts/gpu_check.py runs where a GPU is lent, not in CI; its tiny CPU mode here keeps it from rotting."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.helpers import ROOT


def test_gpu_check_runs_every_stage_in_its_tiny_cpu_mode(tmp_path):
    out = tmp_path / "figures.json"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--size", "tiny", "--device", "cpu",
                           "--steps", "2", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    figures = json.loads(out.read_text())
    assert figures["all_ran"] and [r["stage"] for r in figures["stages"]] == [
        "build model", "sft", "reward", "dpo", "ppo", "grpo", "ppo-env", "grpo-env", "sft-nf4", "grpo-nf4", "grpo-vllm",
        "generate", "eval",
        "export", "export-nf4", "nf4-export-logits"]
    engine = figures["stages"][10]  # not run only where vLLM is not set up (the lent GPU machines' image)
    assert engine["ran"] is True if os.environ.get("LLMFT_REQUIRE_VLLM") == "1" else engine["ran"] in (True, None)
    nf4 = figures["stages"][-1]  # the de-quantised export computes what training computed on the nf4 base
    assert nf4["dtype"] == "float32" and nf4["max_logit_gap"] < 1e-4 * max(1.0, nf4["max_logit"])
    for stage in ("ppo", "grpo", "ppo-env", "grpo-env", "grpo-nf4") + (("grpo-vllm",) if engine["ran"] else ()):
        assert figures[f"{stage}_step1_logprob_gap"]["logprob_gap"] < 1e-4, stage
        assert figures[f"{stage}_step1_within_default_tolerance"], stage
