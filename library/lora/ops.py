"""Rank arithmetic on LoRA weights: SVD factorisation, resizing, LoRA+LoRA merging, extraction.

Everything works on the effective weight change `scale * up @ down` of each module, so the result
is independent of how the inputs split rank and alpha. Written here because no maintained library
offers these operations for kohya-layout files.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from library.errors import UserError
from library.lora.weights import LoraModule, LoraWeights


@dataclass
class Factor:
    module: LoraModule
    retained: float  # Frobenius norm share of the delta kept by the chosen rank (1.0 = exact)


def choose_rank(singular: torch.Tensor, rank: int | None, dynamic: str | None, param: float | None) -> int:
    """kohya's dynamic rank rules, capped by `rank` when both are given."""
    s = singular.double()
    full = len(s)
    if dynamic is None:
        chosen = rank or full
    elif dynamic == "sv_ratio":  # keep values within a factor `param` of the largest
        chosen = int((s >= s[0] / param).sum())
    elif dynamic == "sv_cumulative":  # keep values summing to a share `param` of the total
        chosen = int((torch.cumsum(s, 0) / s.sum() < param).sum()) + 1
    elif dynamic == "sv_fro":  # keep the Frobenius norm share `param`
        chosen = int((torch.sqrt(torch.cumsum(s ** 2, 0) / (s ** 2).sum()) < param).sum()) + 1
    else:
        raise UserError(f"unknown dynamic method {dynamic!r}; valid: sv_ratio, sv_fro, sv_cumulative")
    if rank:
        chosen = min(chosen, rank)
    return max(1, min(chosen, full))


def factorise(delta: torch.Tensor, scale: float, rank: int | None, dynamic: str | None = None,
              param: float | None = None, conv: torch.Size | None = None) -> Factor:
    """up/down with scale*up@down ~ delta; `conv` is the down weight's (in, kh, kw) for 4-D weights."""
    matrix = delta.float().flatten(1)
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    r = choose_rank(s, rank, dynamic, param)
    total = torch.sqrt((s.double() ** 2).sum())
    retained = float(torch.sqrt((s[:r].double() ** 2).sum()) / total) if total > 0 else 1.0
    root = torch.sqrt(s[:r] / scale)
    up = u[:, :r] * root
    down = root[:, None] * vh[:r]
    if conv is not None:
        down = down.reshape(r, *conv)
        up = up.reshape(*up.shape, 1, 1)
    return Factor(LoraModule(down.contiguous(), up.contiguous(), scale * r), retained)


def resize(weights: LoraWeights, rank: int | None, dynamic: str | None = None, param: float | None = None,
           progress=None) -> tuple[LoraWeights, dict[str, tuple[int, int, float]]]:
    """Each module re-factorised to the new rank, keeping its scale (alpha / rank).

    Returns the new weights and, per module, (old rank, new rank, retained Frobenius share).
    """
    modules, report = {}, {}
    for name, mod in weights.modules.items():
        conv = mod.down.shape[1:] if mod.down.ndim == 4 else None
        cap = min(rank, mod.rank) if rank else mod.rank  # resizing never adds rank
        f = factorise(mod.delta(), mod.scale, cap, dynamic, param, conv)
        f.module.down = f.module.down.to(mod.down.dtype)
        f.module.up = f.module.up.to(mod.up.dtype)
        modules[name] = f.module
        report[name] = (mod.rank, f.module.rank, f.retained)
        if progress:
            progress(1)
    return LoraWeights(weights.index, modules, dict(weights.metadata), weights.style), report


def merge_loras(inputs: list[tuple[LoraWeights, float]], mode: str, rank: int | None = None,
                progress=None) -> LoraWeights:
    """Several LoRAs (with multipliers) as one: `svd` (rank `rank`) or `concat` (exact, ranks add up)."""
    index = inputs[0][0].index
    for w, _ in inputs[1:]:
        if w.arch != index.arch:
            raise UserError(f"cannot merge a {w.arch} LoRA with a {index.arch} LoRA")
    names = sorted({n for w, _ in inputs for n in w.modules})
    modules = {}
    for name in names:
        parts = [(w.modules[name], m) for w, m in inputs if name in w.modules]
        if mode == "concat":
            # down stacked, up scaled so that one shared alpha/rank of 1 reproduces the sum exactly
            down = torch.cat([p.down.float() for p, _ in parts])
            up = torch.cat([p.up.float() * p.scale * m for p, m in parts], dim=1)
            modules[name] = LoraModule(down, up, float(down.shape[0]))
        else:
            delta = sum(p.delta() * m for p, m in parts)
            first = parts[0][0]
            conv = first.down.shape[1:] if first.down.ndim == 4 else None
            modules[name] = factorise(delta, 1.0, rank or max(p.rank for p, _ in parts), conv=conv).module
        if progress:
            progress(1)
    return LoraWeights(index, modules, {}, "kohya")
