"""The vLLM engine's own process: `python vllm_worker.py READ_FD WRITE_FD`, run by the interpreter that has vLLM.

It imports vLLM and the standard library only (never llmft), so vLLM may live in an environment of its own with
the transformers it needs while training keeps the tested set. `llmft.rollout.vllm_engine` starts it and talks to
it over two pipes, one pickled request and one reply at a time:

    {"op": "init", "llm": {LLM keyword arguments}, "sleep": bool}            → {"version": vLLM's}
    {"op": "generate", "prompts": [[token ids]], "params": {...}, "seeds": [int], "adapter": [name, id, path]|None}
                                                                             → [(token ids, log-probs|None, reason)]
    {"op": "probe", "ids": [token ids], "adapter": ...}                      → [log p(ids[t] | ids[:t]) for t ≥ 1]
    {"op": "stop"}

Token ids in, token ids out: vLLM never sees text (no tokenizer is loaded). A reply to a failed request is
{"error": "one line"}. The process ends with its parent: the pipe's end stops the loop, and on Linux the kernel
sends it SIGKILL when the parent dies (a trainer killed with kill -9 leaves no engine behind).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import traceback
from multiprocessing.connection import Connection


def die_with_parent() -> None:
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() == 1:  # the parent died before the line above ran
        os._exit(1)


class Worker:
    def __init__(self):
        self.llm, self.sleep, self.asleep = None, False, False

    def init(self, llm: dict, sleep: bool = False) -> dict:
        import vllm

        self.llm, self.sleep = vllm.LLM(**llm), sleep
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

    def nap(self) -> None:
        """With sleep mode (a GPU shared with training), weights go to host memory and the KV cache is freed."""
        if self.sleep and not self.asleep:
            self.llm.sleep(level=1)
            self.asleep = True

    def wake(self) -> None:
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False


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
