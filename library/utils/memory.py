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
    if t.device.type == "meta":
        return None
    s = t.untyped_storage()
    return s.data_ptr(), s.nbytes()


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
                    found = _storage(item)
                    if found:
                        storages[found[0]] = found[1]
        stack.extend(fn for fn, _ in node.next_functions)
    return sum(storages.values())


class SavedTensors:
    """Context manager: the distinct storages saved for backward inside the block.

        with SavedTensors() as saved:
            loss = model(x).sum()
        saved.bytes, saved.by_dtype
    """

    def __init__(self):
        self._storages: dict[int, tuple[int, torch.dtype]] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda x: x)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        found = _storage(t)
        if found:
            self._storages.setdefault(found[0], (found[1], t.dtype))
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
        skip = {t.untyped_storage().data_ptr() for t in tensors}
        return sum(n for ptr, (n, _) in self._storages.items() if ptr not in skip)

    @property
    def by_dtype(self) -> dict[torch.dtype, int]:
        out: dict[torch.dtype, int] = {}
        for n, dtype in self._storages.values():
            out[dtype] = out.get(dtype, 0) + n
        return out
