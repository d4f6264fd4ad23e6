"""kohya's per-block network arguments (networks.lora): ranks, alphas and learning-rate factors of
the UNet's blocks.

The blocks are the model family's (`lora_blocks` / `lora_block_index` in library.models): the
original UNet's input, middle and output blocks, 25 for SD1.x/2.x as kohya documents them, 23 for
SDXL following its real block lists. A block whose rank or learning-rate factor is 0 gets no LoRA.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

from library.errors import UserError


def _curve(name: str, count: int) -> list[float]:
    """kohya's named learning-rate curves over `count` blocks, "+x" adding x to every value."""
    kind, _, plus = name.partition("+")
    base = float(plus) if plus else 0.0
    steps = [i / (count - 1) if count > 1 else 0.0 for i in range(count)]
    values = {
        "sine": [math.sin(math.pi * t / 2) for t in steps],
        "cosine": [math.sin(math.pi * t / 2) for t in reversed(steps)],
        "linear": steps,
        "reverse_linear": list(reversed(steps)),
        "zeros": [0.0] * count,
    }[kind]
    return [v + base for v in values]


def _weights(value, count: int, key: str) -> list[float]:
    if value is None:
        return [1.0] * count
    if isinstance(value, str):
        return _curve(value, count)
    values = list(value)
    if len(values) > count:
        raise UserError(f"[network] {key}: {len(values)} values, but this model has {count} such blocks")
    return values + [1.0] * (count - len(values))  # kohya fills missing factors with 1


@dataclass(frozen=True)
class BlockPlan:
    labels: tuple[str, ...]
    dims: tuple[int, ...] | None
    alphas: tuple[float, ...] | None
    conv_dims: tuple[int, ...] | None
    conv_alphas: tuple[float, ...] | None
    lr_weights: tuple[float, ...] | None

    def rank_alpha(self, block: int | None, conv3x3: bool, default: tuple[int | None, float | None]
                   ) -> tuple[int | None, float | None]:
        """The (rank, alpha) of a module in `block`; `default` is the network-wide value."""
        if block is None:
            return default
        if self.lr_weights is not None and self.lr_weights[block] == 0:
            return 0, default[1]
        dims, alphas = (self.conv_dims, self.conv_alphas) if conv3x3 else (self.dims, self.alphas)
        if dims is None:
            return default
        rank = dims[block]
        if alphas is not None:
            return rank, alphas[block]
        return rank, default[1] if default[1] is not None else float(rank)

    def lr_weight(self, block: int | None) -> float:
        return 1.0 if self.lr_weights is None or block is None else self.lr_weights[block]


def _per_block(value: Sequence | None, labels: Sequence[str], key: str, what: str) -> tuple | None:
    if value is None:
        return None
    if len(value) != len(labels):
        raise UserError(f"[network] {key}: {len(value)} values, but this {what} has {len(labels)} blocks "
                        f"({labels[0]}...{labels[-1]}; docs/configuration.md lists them)")
    return tuple(value)


def block_plan(spec, family, unet_config: Mapping) -> BlockPlan | None:
    """The per-block settings of a NetworkSpec for this model, or None when it sets none."""
    keys = ("block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas", "down_lr_weight",
            "mid_lr_weight", "up_lr_weight")
    if all(getattr(spec, k) is None for k in keys):
        return None
    labels = tuple(family.lora_blocks(unet_config))
    what = f"{family.label} UNet"
    lr = None
    if any(getattr(spec, k) is not None for k in ("down_lr_weight", "mid_lr_weight", "up_lr_weight")):
        groups = {"IN": [], "MID": [], "OUT": []}
        for i, label in enumerate(labels):
            head = "MID" if label.startswith("MID") else "OUT" if label.startswith("OUT") and label != "OUT" else \
                "IN" if label.startswith("IN") else None
            if head:
                groups[head].append(i)
        weights = [1.0] * len(labels)  # BASE and OUT (SDXL) keep factor 1, as in kohya
        for head, key in (("IN", "down_lr_weight"), ("MID", "mid_lr_weight"), ("OUT", "up_lr_weight")):
            for i, w in zip(groups[head], _weights(getattr(spec, key), len(groups[head]), key)):
                weights[i] = w if w > spec.block_lr_zero_threshold else 0.0
        lr = tuple(weights)
    return BlockPlan(labels, _per_block(spec.block_dims, labels, "block_dims", what),
                     _per_block(spec.block_alphas, labels, "block_alphas", what),
                     _per_block(spec.conv_block_dims, labels, "conv_block_dims", what),
                     _per_block(spec.conv_block_alphas, labels, "conv_block_alphas", what), lr)
