"""Byte counts of what autograd keeps, measured on any device (the CPU included).

`graph_saved_bytes` walks the autograd graph behind some tensors and adds up the storages its
nodes still hold for backward (freed buffers, after a backward pass, count nothing);
`SavedTensors` counts what a block of code saves for backward, through saved-tensor hooks. Both
count each storage once. The tests and bench/memory_estimate.py measure GPU memory this way
without a GPU.
"""
from __future__ import annotations

from typing import Iterable

import torch


def _storage(t: torch.Tensor) -> tuple[int, int] | None:
    """(identity, bytes) of a tensor's storage; meta tensors (no data) count by their storage
    object, so that the meta device can stand in for a GPU."""
    s = t.untyped_storage()
    return (s._cdata if t.device.type == "meta" else s.data_ptr()), s.nbytes()


def graph_saved_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages the autograd graphs behind `tensors` still hold."""
    stack = [t.grad_fn for t in tensors if isinstance(t, torch.Tensor) and t.grad_fn is not None]
    seen_nodes: set[int] = set()
    storages: dict[int, int] = {}
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen_nodes:
            continue
        seen_nodes.add(id(node))
        for attr in dir(node):
            if not attr.startswith("_saved_"):
                continue
            try:
                value = getattr(node, attr)
            except RuntimeError:  # freed by a backward pass
                continue
            for item in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(item, torch.Tensor):
                    key, size = _storage(item)
                    storages[key] = size
        stack.extend(fn for fn, _ in node.next_functions)
    return sum(storages.values())


class SavedTensors:
    """Context manager: the distinct storages saved for backward inside the block.

        with SavedTensors() as saved:
            loss = model(x).sum()
        saved.bytes, saved.by_dtype
    """

    def __init__(self, exclude: Iterable[torch.Tensor] = ()):
        """`exclude`: tensors whose storages are not counted (a model's parameters, which frozen
        layers save for their input's gradient, but which exist anyway)."""
        self._skip = {_storage(t)[0] for t in exclude}
        self._storages: dict[int, tuple[int, torch.dtype]] = {}
        self._alive: list[torch.Tensor] = []
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda x: x)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        key, size = _storage(t)
        if key not in self._skip and key not in self._storages:
            self._storages[key] = (size, t.dtype)
            # Held until the counter goes: a storage freed during the block (a graph branch that
            # dies early) could otherwise hand its identity to a new one and be counted once.
            self._alive.append(t)
        return t

    def __enter__(self) -> "SavedTensors":
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)

    @property
    def bytes(self) -> int:
        return sum(n for n, _ in self._storages.values())

    def bytes_besides(self, *tensors: torch.Tensor) -> int:
        """Bytes saved, leaving out the storages of `tensors` (alive anyway, e.g. the input)."""
        skip = {_storage(t)[0] for t in tensors}
        return sum(n for ptr, (n, _) in self._storages.items() if ptr not in skip)

    @property
    def by_dtype(self) -> dict[torch.dtype, int]:
        out: dict[torch.dtype, int] = {}
        for n, dtype in self._storages.values():
            out[dtype] = out.get(dtype, 0) + n
        return out
