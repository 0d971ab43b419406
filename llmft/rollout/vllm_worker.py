"""The vLLM engine's own process: `python vllm_worker.py READ_FD WRITE_FD`, run by the interpreter that has vLLM.

It imports vLLM and the standard library only (never llmft), so vLLM may live in an environment of its own with
the transformers it needs while training keeps the tested set. `llmft.rollout.vllm_engine` starts it and talks to
it over two pipes, one pickled request and one reply at a time:

    {"op": "init", "llm": {LLM keyword arguments}, "sleep": bool}            → {"version": vLLM's}
    {"op": "generate", "prompts": [[token ids]], "params": {...}, "seeds": [int], "adapter": [name, id, path]|None}
                                                                             → [(token ids, log-probs|None, reason)]
    {"op": "probe", "ids": [token ids], "adapter": ...}                      → [log p(ids[t] | ids[:t]) for t ≥ 1]
    {"op": "merge", "adapter": path}      → the engine's weights become base + s·B·A of the adapter (tensors pushed)
    {"op": "stop"}

Token ids in, token ids out: vLLM never sees text (no tokenizer is loaded). A reply to a failed request is
{"error": "one line"}. The process ends with its parent: the pipe's end stops the loop, and on Linux the kernel
sends it SIGKILL when the parent dies (a trainer killed with kill -9 leaves no engine behind).
"""

from __future__ import annotations

import ctypes
import json
import logging
import math
import os
import re
import signal
import sys
import traceback
from multiprocessing.connection import Connection
from pathlib import Path


def die_with_parent() -> None:
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() == 1:  # the parent died before the line above ran
        os._exit(1)


class Worker:
    def __init__(self):
        self.llm, self.sleep, self.asleep, self.model_dir = None, False, False, ""

    def init(self, llm: dict, sleep: bool = False) -> dict:
        import vllm

        self.llm, self.sleep, self.model_dir = vllm.LLM(**llm), sleep, llm["model"]
        self.nap()
        return {"version": vllm.__version__}

    def lora(self, adapter):
        from vllm.lora.request import LoRARequest

        return LoRARequest(adapter[0], adapter[1], adapter[2]) if adapter else None

    def generate(self, prompts: list, params: dict, seeds: list, adapter=None) -> list:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        self.wake()
        sampling = [SamplingParams(**params, seed=seed) for seed in seeds]
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], sampling,
                                 lora_request=self.lora(adapter), use_tqdm=False)
        self.nap()
        return [answer(o.outputs[0]) for o in outs]

    def probe(self, ids: list, adapter=None) -> list:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        self.wake()
        params = SamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=0, detokenize=False)
        out = self.llm.generate([TokensPrompt(prompt_token_ids=ids)], params, lora_request=self.lora(adapter),
                                use_tqdm=False)[0]
        self.nap()
        return [step[ids[t]].logprob for t, step in enumerate(out.prompt_logprobs) if t > 0]

    def merge(self, adapter: str) -> int:
        """Make the engine's weights the base's plus the adapter's s·B·A, through vLLM's in-place reload (which also
        repacks the CPU kernels' weights); the prefix cache, built with the old weights, is dropped."""
        import torch

        for quiet in ("layerwise", "inplace"):  # the layers left as they were are expected, not warnings
            logging.getLogger(f"vllm.model_executor.model_loader.reload.{quiet}").setLevel(logging.ERROR)
        self.wake()
        pushed = [0]

        def weights():  # one tensor at a time, counted
            for item in merged_weights(self.model_dir, adapter):
                pushed[0] += 1
                yield item

        with torch.no_grad():
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights()})
        self.llm.reset_prefix_cache()
        self.nap()
        return pushed[0]

    def nap(self) -> None:
        """With sleep mode (a GPU shared with training), weights go to host memory and the KV cache is freed."""
        if self.sleep and not self.asleep:
            self.llm.sleep(level=1)
            self.asleep = True

    def wake(self) -> None:
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False


def merged_weights(model_dir: str, adapter: str):
    """(name, tensor) of every tensor of each decoder layer an adapter touches, W = W₀ + s·B·A in fp32 for the LoRA
    modules (s = α / r, or α / √r with rsLoRA), W₀ from the base's safetensors. Whole layers, because vLLM stacks
    q/k/v and gate/up into one weight that a reload must see complete."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    cfg = json.loads((Path(adapter) / "adapter_config.json").read_text())
    if cfg.get("use_dora") or cfg.get("rank_pattern") or cfg.get("alpha_pattern") or cfg.get("modules_to_save"):
        raise ValueError("this adapter is more than plain LoRA (DoRA, per-module ranks or saved modules): "
                         "use rollout.vllm.sync: adapter")
    scale = cfg["lora_alpha"] / (math.sqrt(cfg["r"]) if cfg.get("use_rslora") else cfg["r"])
    lora = load_file(str(Path(adapter) / "adapter_model.safetensors"))
    deltas = {}
    for key, a in lora.items():
        if ".lora_A." in key:
            module = key.removeprefix("base_model.model.").split(".lora_A.")[0]
            delta = scale * (lora[key.replace(".lora_A.", ".lora_B.")].float() @ a.float())
            deltas[f"{module}.weight"] = delta.T if cfg.get("fan_in_fan_out") else delta
    files = {}
    for file in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            files.update(dict.fromkeys(f.keys(), file))
    missing = sorted(set(deltas) - set(files))
    if missing:
        raise ValueError(f"the adapter's module {missing[0]} has no weight in the engine's model {model_dir}")
    layers = {layer_of(name) for name in deltas}
    for file in sorted(set(files.values())):
        with safe_open(str(file), framework="pt") as f:
            for name in sorted((n for n in f.keys() if layer_of(n) in layers), key=layer_order):
                w = f.get_tensor(name)
                yield name, w.float() + deltas[name] if name in deltas else w  # vLLM casts to its dtype


LAYER = re.compile(r"^(.*?\.layers\.(\d+)\.)")


def layer_of(name: str) -> str:
    """The decoder layer a tensor belongs to ("model.layers.3."), or the tensor itself outside the layers."""
    found = LAYER.match(name)
    return found.group(1) if found else name


def layer_order(name: str) -> tuple:
    """Layer by layer in numeric order (3 before 10), so that vLLM finishes one layer before the next."""
    found = LAYER.match(name)
    return (int(found.group(2)) if found else -1, name)


def answer(completion) -> tuple:
    ids = list(completion.token_ids)
    logps = None
    if completion.logprobs is not None:
        logps = [float(step[token].logprob) for step, token in zip(completion.logprobs, ids, strict=False)]
    return ids, logps, completion.finish_reason


def one_line(e: Exception) -> str:
    """The line of an exception's message that says what is wrong (pydantic's 'Value error, ...' line)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip() and not ln.strip().startswith("For further")]
    said = next((ln for ln in lines if ln.startswith("Value error")), lines[-1] if lines else "")
    return f"{type(e).__name__}: {said.split(' [type=')[0].removeprefix('Value error, ')}"[:400]


def serve(inbox: Connection, outbox: Connection) -> None:
    worker = Worker()
    while True:
        try:
            request = inbox.recv()
        except (EOFError, OSError):
            return
        op = request.pop("op")
        if op == "stop":
            outbox.send({"stopped": True})
            return
        try:
            outbox.send({"result": getattr(worker, op)(**request)})
        except Exception as e:  # noqa: BLE001 - every failure goes back as one line; the trace goes to the log
            traceback.print_exc()
            outbox.send({"error": one_line(e)})


if __name__ == "__main__":
    die_with_parent()
    serve(Connection(int(sys.argv[1]), writable=False), Connection(int(sys.argv[2]), readable=False))
    sys.stdout.flush()
    os._exit(0)  # vLLM's threads and atexit hooks are not waited for
