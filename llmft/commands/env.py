"""`llmft env`: what a bug report needs: versions, devices, and the distributed settings of this process."""

from __future__ import annotations

import importlib.metadata
import os
import platform

import torch

LIBRARIES = ("llmft", "torch", "transformers", "peft", "accelerate", "safetensors", "kernels", "bitsandbytes",
             "datasets", "gguf", "typer", "pyyaml", "rich")
LAUNCHER_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                 "CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS", "NCCL_DEBUG")


def report() -> list[tuple[str, str]]:
    rows = [("platform", platform.platform()), ("python", platform.python_version()),
            ("cpu cores", str(os.cpu_count()))]
    rows += [(lib, version(lib)) for lib in LIBRARIES]
    rows += devices()
    rows += [("torch.distributed", ", ".join(b for b in ("nccl", "gloo", "mpi") if backend_available(b)) or "none")]
    rows += [(k, os.environ[k]) for k in LAUNCHER_VARS if k in os.environ]
    rows += sorted((k, v) for k, v in os.environ.items() if k.startswith(("ACCELERATE_", "FSDP_")))
    return rows


def version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def devices() -> list[tuple[str, str]]:
    if not torch.cuda.is_available():
        return [("cuda", f"not available (torch built with CUDA {torch.version.cuda})" if torch.version.cuda
                 else "not available (CPU build of torch)")]
    rows = [("cuda", f"{torch.version.cuda}, {torch.cuda.device_count()} device(s), "
                     f"bf16 {'yes' if torch.cuda.is_bf16_supported() else 'no'}")]
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        rows.append((f"cuda:{i}", f"{p.name}, {p.total_memory / 2**30:.1f} GiB, compute {p.major}.{p.minor}"))
    return rows


def backend_available(name: str) -> bool:
    d = torch.distributed
    return d.is_available() and bool(getattr(d, f"is_{name}_available", lambda: False)())
