"""QLoRA's frozen base: every linear layer but the output head held in 4-bit NormalFloat (`nf4`, with the
quantisation constants themselves quantised: Dettmers et al. 2023, "QLoRA", eq. 5: Y = X · doubleDequant(c1, c2, W_nf4)
+ X · L1 · L2) or in 8-bit (`int8`, LLM.int8(): row-wise absmax with fp16 outlier columns, Dettmers et al. 2022)
through bitsandbytes; LoRA trains on top in the compute dtype.

The way back is `dequantized`: each layer's weight as the network used it in training, doubleDequant(W_nf4). An adapter
trained on a quantised base is merged into that — not into the original weights, which it never saw — by every later
stage, `llmft eval`/`generate` and `llmft export` (`loading.merged_adapter`)."""

from __future__ import annotations

from typing import Any

import torch

from llmft.errors import ModelError
from llmft.models.hub_kernels import import_bitsandbytes

KINDS = ("nf4", "int8")


def bitsandbytes(kind: str):
    """The bitsandbytes module, or one line on what to install."""
    try:
        bnb = import_bitsandbytes()
    except Exception as e:  # noqa: BLE001 — a broken install raises more than ImportError
        raise ModelError(f"model.quantization: {kind} needs bitsandbytes, which cannot be imported here "
                         f"({type(e).__name__}: {e}); install it with pip install 'llmft[qlora]'") from None
    if bnb is None:
        raise ModelError(f"model.quantization: {kind} needs bitsandbytes, which is not installed here; install it "
                         f"with pip install 'llmft[qlora]'")
    return bnb


def quantize(model: torch.nn.Module, kind: str, compute_dtype: torch.dtype) -> torch.nn.Module:
    """Replace every `nn.Linear` of `model` except its output embedding (the LM head: tied to the input embedding in
    many models, and the layer whose rounding every log-prob sees) with bitsandbytes' layer holding the same weights.
    They are quantised where the model is next moved (`.to(device)`), so the full-precision copy of a layer meets the
    GPU one layer at a time."""
    bnb = bitsandbytes(kind)
    keep = model.get_output_embeddings()
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is torch.nn.Linear and child is not keep:
                setattr(module, name, quantized_linear(bnb, child, kind, compute_dtype))
    return model


def quantized_linear(bnb, linear: torch.nn.Linear, kind: str, compute_dtype: torch.dtype) -> torch.nn.Module:
    """bitsandbytes' frozen layer for `linear` (not yet quantised: that happens on `.to`)."""
    sizes = (linear.in_features, linear.out_features, linear.bias is not None)
    weight = linear.weight.data.to(compute_dtype)
    if kind == "nf4":
        layer = bnb.nn.Linear4bit(*sizes, compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4",
                                  device="meta")
        layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, compress_statistics=True, quant_type="nf4")
        # bitsandbytes' CPU fast path repacks the weight with bf16 block constants on the first no-grad eval-mode
        # call: generation and training would then use two different bases (and layers narrower than a block fail)
        layer.support_avx512bf16_for_cpu = False
    else:
        layer = bnb.nn.Linear8bitLt(*sizes, has_fp16_weights=False, threshold=6.0, device="meta")
        layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    if linear.bias is not None:
        layer.bias = torch.nn.Parameter(linear.bias.data.to(compute_dtype), requires_grad=False)
    return layer


def dequantized(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """`model` with each bitsandbytes layer replaced by an `nn.Linear` holding its de-quantised weight in `dtype`."""
    from peft.utils.integrations import dequantize_bnb_weight

    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if is_quantized(child):
                state = getattr(child.weight, "quant_state", None) or getattr(child, "state", None)
                linear = torch.nn.Linear(child.in_features, child.out_features, child.bias is not None,
                                         device="meta")
                linear.weight = torch.nn.Parameter(dequantize_bnb_weight(child.weight, state).to(dtype))
                if child.bias is not None:
                    linear.bias = torch.nn.Parameter(child.bias.data.to(dtype))
                setattr(module, name, linear)
    return model


def round_trip(model: torch.nn.Module, kind: str, compute_dtype: torch.dtype) -> torch.nn.Module:
    """The base as a QLoRA run trained on it: quantised as training quantised it, then de-quantised in place (the
    model keeps its device and dtype)."""
    dtype, device = next(model.parameters()).dtype, next(model.parameters()).device
    return dequantized(quantize(model, kind, compute_dtype).to(device), dtype)


def is_quantized(module: torch.nn.Module) -> bool:
    return hasattr(module, "weight") and type(module.weight).__name__ in ("Params4bit", "Int8Params")


def numel(p: torch.Tensor) -> int:
    """Parameters a tensor stands for: a 4-bit weight packs two in each byte of its storage."""
    state = getattr(p, "quant_state", None)
    return state.shape.numel() if state is not None else p.numel()


def record(kind: str | None, compute_dtype: torch.dtype) -> dict[str, Any] | None:
    """What a run's manifest keeps so that its adapter is merged into the base it was trained on."""
    return {"kind": kind, "compute_dtype": str(compute_dtype).removeprefix("torch.")} if kind else None


def trained_on(manifest: dict) -> tuple[str, torch.dtype] | None:
    """(kind, compute dtype) of the quantised base a stage output was trained on; None for a full-precision one."""
    q = manifest.get("model", {}).get("quantization")
    return (q["kind"], getattr(torch, q["compute_dtype"])) if q else None
