"""Peak memory and time of token log-probs over a large vocabulary: all [N × V] logits at once vs `models.logprobs`.

    python scripts/bench_logprobs.py                    # Qwen2.5-0.5B's LM head (896 → 151,936), N = 2048 positions
    python scripts/bench_logprobs.py --positions 4096 --hidden 576 --vocab 49152

Each way runs in its own process (forward and backward of Σ log π(y_t) with respect to the hidden states, the LM head
frozen as under LoRA), three times; reported: the process's peak RSS above what it held before, and seconds.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def measure(way: str, positions: int, hidden: int, vocab: int) -> dict:
    import torch
    from torch import nn

    from llmft.maths.losses import token_logps
    from llmft.models import logprobs
    from llmft.models.forward import lm_logits

    class Head(nn.Module):  # the one part of a causal LM that log-probs touch: the output embedding
        def __init__(self):
            super().__init__()
            self.lm_head = nn.Linear(hidden, vocab, bias=False).requires_grad_(False)
            self.config = type("C", (), {"get_text_config": lambda self: self})()

        def get_output_embeddings(self):
            return self.lm_head

    torch.manual_seed(0)
    model = Head()
    h = torch.randn(positions, hidden, requires_grad=True)
    y = torch.randint(0, vocab, (positions,))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    logps = token_logps(lm_logits(model, h), y) if way == "whole" else logprobs.head_logps(model, h, y)[0]
    logps.sum().backward()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"way": way, "peak_mib_above_start": (peak - before) / 1024, "seconds": seconds,
            "logps_sum": float(logps.detach().sum()), "grad_norm": float(h.grad.norm())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--positions", type=int, default=2048)
    p.add_argument("--hidden", type=int, default=896)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.positions, args.hidden, args.vocab)))
        return
    fp32 = args.positions * args.vocab * 4 / 2**20
    print(f"N = {args.positions} positions, d = {args.hidden}, V = {args.vocab}: one fp32 [N × V] tensor is "
          f"{fp32:.0f} MiB")
    for run in range(args.runs):
        for way in ("whole", "chunked"):
            out = subprocess.run([sys.executable, __file__, "--child", way, "--positions", str(args.positions),
                                  "--hidden", str(args.hidden), "--vocab", str(args.vocab)],
                                 capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"run {run + 1} {way:8s} peak +{r['peak_mib_above_start']:7.0f} MiB  {r['seconds']:6.2f} s  "
                  f"Σ log π {r['logps_sum']:.4f}  |∇h| {r['grad_norm']:.6f}")


if __name__ == "__main__":
    main()
