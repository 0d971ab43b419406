"""Hub kernels — layers of a model replaced by compiled code fetched from the Hugging Face Hub (the `kernels` package,
repositories such as kernels-community/…) — are off in llmft unless a config asks for them (`model.kernels: true`).

Two libraries fetch them on their own:
  - transformers (5.2x) kernelizes every model `from_pretrained` loads unless told not to, and again at every
    `train()` / `eval()`, possibly with other kernels in each mode: the trainer (train mode) and the sampler (eval
    mode) would run different code, fetched over the network, that the user never named. Every model llmft loads
    passes `use_kernels` explicitly (`load_kwargs`), and `check_loaded` refuses a model that kernelized anyway.
  - bitsandbytes, imported on a CPU with AVX-512 BF16, asks the Hub for a 4-bit matmul kernel (and logs a warning
    where it cannot fetch it). `import_bitsandbytes` imports it with that fetch refused; bitsandbytes then uses its
    own code. `llmft.models.loading` calls it (`guard_bitsandbytes`) before anything imports peft, whose import
    imports bitsandbytes where it is installed.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import sys
from typing import Any

from llmft.errors import ModelError


class HubKernelsRefused(RuntimeError):
    """Raised in place of a Hub kernel fetch that llmft refused."""


def load_kwargs(enabled: bool) -> dict[str, Any]:
    """Keyword arguments for transformers' `from_pretrained`: Hub kernels exactly as the config says."""
    return {"use_kernels": bool(enabled)}


def check_loaded(model, enabled: bool, name: str):
    """`model`, checked not to be kernelized when the config did not ask for it (a transformers release that
    ignored `use_kernels=False` would otherwise change every stage's numerics in silence)."""
    if not enabled and getattr(model, "use_kernels", False):
        raise ModelError(f"transformers kernelized {name} although model.kernels is false (Hub kernels replace layers "
                         f"with code from the network); please report it with `llmft env`")
    return model


def guard_bitsandbytes() -> None:
    """Import bitsandbytes now, with its fetch refused, if it is installed; a broken install is left for
    `model.quantization` to report (`models.quantization.bitsandbytes`), as every other command runs without it."""
    try:
        import_bitsandbytes()
    except Exception:  # noqa: BLE001 — a broken install raises more than ImportError
        pass


def import_bitsandbytes():
    """The bitsandbytes module (None where it is not installed), imported with its Hub kernel fetch refused."""
    if "bitsandbytes" in sys.modules or importlib.util.find_spec("bitsandbytes") is None:
        return sys.modules.get("bitsandbytes")
    with fetch_refused():
        import bitsandbytes
    return bitsandbytes


@contextlib.contextmanager
def fetch_refused():
    """While open, `kernels.get_kernel` raises HubKernelsRefused, and the warning bitsandbytes logs when its fetch
    fails (or when `kernels` is missing) is dropped; everything else bitsandbytes logs passes."""
    try:
        import kernels
    except Exception:  # noqa: BLE001 — missing, or an install that fails to import: nothing to patch
        kernels = None
    real = getattr(kernels, "get_kernel", None)
    drop = RefusedFetchFilter()
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    logger.addFilter(drop)
    if real is not None:
        kernels.get_kernel = refuse
    try:
        yield
    finally:
        logger.removeFilter(drop)
        if real is not None:
            kernels.get_kernel = real


def refuse(repo_id: str, *args, **kwargs):
    raise HubKernelsRefused(f"llmft refuses Hub kernel {repo_id}")


class RefusedFetchFilter(logging.Filter):
    """Drops a log record that reports a refused (or impossible) Hub kernel fetch."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else (record.args,)
        return not any(isinstance(a, (HubKernelsRefused, ImportError)) for a in args)
