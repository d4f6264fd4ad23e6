"""Counting the host's reads of device values (GPU synchronisations), on any device.

On a GPU, `.item()`, `.tolist()`, `bool(t)`, `float(t)`, `.cpu()` of a tensor computed on the
device make the host wait for every queued kernel. On the CPU nothing waits, so the count is
kept by origin instead: tensors computed from the given models' parameters, buffers or gradients
are "device values" (taint spreads through every torch operation), and a read of one counts.
Host-side values (timesteps drawn with a CPU generator, the APT indicator) never count, as on a
GPU. Used by the tests to bound the synchronisations of a training step.

    with HostReads([unet, *text_encoders]) as reads:
        trainer.train_step(0)
    reads.count, reads.where
"""
from __future__ import annotations

import traceback

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakTensorKeyDictionary

READS = {"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy"}


def _to_host(args, kwargs) -> bool:
    """`.to("cpu")` written out: a `.to(device)` with the run's device object is a move to the
    device on a GPU, and cannot be told apart on the CPU, so only the string counts."""
    targets = [kwargs.get("device"), *args[1:]]
    return any(isinstance(a, str) and a.startswith("cpu") for a in targets)


def _caller() -> str:
    """file:line of the innermost frame outside torch and this module."""
    for frame in reversed(traceback.extract_stack()):
        path = frame.filename.replace("\\", "/")
        if "/torch/" not in path and not path.endswith("utils/syncs.py"):
            return f"{path.rsplit('/', 1)[-1]}:{frame.lineno}"
    return "?"


class HostReads(TorchFunctionMode):
    def __init__(self, models):
        super().__init__()
        self.tainted = WeakTensorKeyDictionary()
        self.count = 0
        self.where: list[str] = []
        self._hooks = []
        for model in models:
            for t in [*model.parameters(), *model.buffers()]:
                self.tainted[t] = True
                if isinstance(t, torch.nn.Parameter) and t.requires_grad:
                    self._hooks.append(t.register_post_accumulate_grad_hook(self._taint_grad))

    def _taint_grad(self, param) -> None:
        if param.grad is not None:
            self.tainted[param.grad] = True

    def __exit__(self, *exc):
        for hook in self._hooks:
            hook.remove()
        return super().__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        from_device = any(t in self.tainted for t in inputs)
        name = getattr(func, "__name__", "")
        read = from_device and (name in READS or (name == "to" and _to_host(args, kwargs)))
        if read:
            self.count += 1
            self.where.append(f"{_caller()} {name}")
        out = func(*args, **kwargs)
        if from_device and not read:  # what a read returns is on the host
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    self.tainted[t] = True
        return out
