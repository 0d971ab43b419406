"""Fake CUDA on a machine without a GPU: tensors "on the GPU" are CPU tensors that carry a mark, and every torch call
made inside the mode is checked the way CUDA checks it, so that code mixing device and host tensors fails here as it
would on a GPU ("Expected all tensors to be on the same device").

Inside `FakeCuda()`:
  - `.to("cuda")`, `.cuda()`, `device="cuda"` in a factory (torch.zeros(..., device=x.device)) make marked tensors;
    `.cpu()`, `.to("cpu")` make unmarked ones; a marked tensor reports `.device == cuda:0` and `.is_cuda`.
  - an op's outputs are marked when any input is;
  - an op that mixes marked tensors with unmarked ones of one or more dimensions raises `MixedDevice`, as CUDA does
    (0-dim host tensors are allowed, as CUDA allows CPU scalars; host integer or boolean indices may index a device
    tensor; `copy_` copies across devices).
The values are real (the CPU computes them), so a whole training step runs, with `.item()` and all.
"""
from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

CUDA = torch.device("cuda", 0)
T = torch.Tensor
INDEXING = {T.__getitem__, T.__setitem__, T.index_put_, T.index_put, torch.index_put}
MOVES = {T.copy_}


class MixedDevice(AssertionError):
    pass


def marked(t) -> bool:
    return isinstance(t, torch.Tensor) and getattr(t, "_fake_cuda", False)


def mark(t):
    if isinstance(t, torch.Tensor):
        t._fake_cuda = True
    return t


def is_cuda_target(x) -> bool:
    if isinstance(x, str):
        return x.startswith("cuda")
    return isinstance(x, torch.device) and x.type == "cuda"


def is_device(x) -> bool:
    return isinstance(x, (str, torch.device)) and str(x).split(":")[0] in ("cuda", "cpu")


class FakeCuda(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls = 0
        self.parameter_new = torch.nn.Parameter.__new__

    def __enter__(self):
        real = self.parameter_new

        def new(cls, data=None, requires_grad=True):  # a Parameter wraps its data: it lives where the data lives
            p = real(cls, data, requires_grad)
            return mark(p) if marked(data) else p

        torch.nn.Parameter.__new__ = new
        return super().__enter__()

    def __exit__(self, *exc):
        torch.nn.Parameter.__new__ = self.parameter_new
        return super().__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.calls += 1
        prop = getattr(getattr(func, "__self__", None), "__name__", None) if func.__name__ == "__get__" else None
        if prop == "device":
            return CUDA if marked(args[0]) else func(*args)
        if prop == "is_cuda":
            return marked(args[0])
        if prop == "grad":
            g = func(*args)
            return mark(g) if marked(args[0]) and g is not None else g
        if func is T.cuda:
            return mark(args[0].view_as(args[0]) if args[0].requires_grad else args[0].clone())
        if func is T.cpu:
            return args[0].view_as(args[0]) if marked(args[0]) else args[0]
        if func is T.to:
            target = next((a for a in [*args[1:], kwargs.get("device")] if is_device(a)), None)
            if target is not None:
                rest = [("cpu" if is_device(a) else a) for a in args[1:]]
                kw = {k: ("cpu" if k == "device" else v) for k, v in kwargs.items()}
                out = func(args[0], *rest, **kw)
                if out is args[0]:
                    out = out.view_as(out)
                    if isinstance(args[0], torch.nn.Parameter):  # Module._apply assigns param.data
                        out = args[0]
                if is_cuda_target(target):
                    return mark(out)
                if out is args[0] and marked(out):
                    return out  # parameter moved "to cpu" in place: leave as is
                return out
            out = func(*args, **kwargs)
            return mark(out) if marked(args[0]) and isinstance(out, torch.Tensor) else out
        dev = kwargs.get("device")
        if dev is not None and is_device(dev):
            kwargs = {**{k: v for k, v in kwargs.items() if k != "pin_memory"}, "device": "cpu"}
            out = func(*args, **kwargs)
            return tree_map(mark, out) if is_cuda_target(dev) else out
        leaves, _ = tree_flatten((args, kwargs))
        tensors = [t for t in leaves if isinstance(t, torch.Tensor)]
        on_dev = [t for t in tensors if marked(t)]
        if on_dev:
            host = [t for t in tensors if not marked(t) and t.dim() > 0]
            if func in INDEXING and host and marked(args[0]):
                host = [t for t in host if t.dtype not in (torch.long, torch.int, torch.bool)]
            if func in MOVES:
                host = []
            if host:
                name = getattr(func, "__qualname__", getattr(func, "__name__", str(func)))
                raise MixedDevice(f"{name}: tensors on cuda {[tuple(t.shape) for t in on_dev]} mixed with "
                                  f"tensors on cpu {[tuple(t.shape) for t in host]}")
        out = func(*args, **kwargs)
        if on_dev:
            out = tree_map(mark, out)
        return out
