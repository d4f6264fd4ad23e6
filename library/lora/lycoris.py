"""The modules of LoRA files: kohya's LoRA, and DoRA, LoHa and LoKr in LyCORIS's file layout,
which AUTOMATIC1111/Forge and ComfyUI load.

Per module name (`lora_unet_...`/`lora_te*_...`) a file holds:
- LoRA: `lora_down.weight` (r, in[, kh, kw]), `lora_up.weight` (out, r[, 1, 1]), `alpha`;
  delta = up @ down * alpha / r (a file without alpha: scale 1).
- DoRA: `lora_down.weight`, `lora_up.weight`, `alpha` and `dora_scale`, the magnitude of each
  output channel shaped (out, 1) or (out, 1, 1, 1) (LyCORIS's default orientation; files with
  the older per-input-channel orientation, shaped (1, in[, 1, 1]), are read too).
- LoHa: `hada_w1_a` (out, r), `hada_w1_b` (r, in*kh*kw), `hada_w2_a`, `hada_w2_b`, `alpha`;
  delta = (w1_a @ w1_b) * (w2_a @ w2_b) * alpha / r. (`hada_t1`/`hada_t2`, Tucker, are read.)
- LoKr: `lokr_w1` (a, c) or `lokr_w1_a` (a, r) + `lokr_w1_b` (r, c); `lokr_w2` (b, d[, kh, kw]) or
  `lokr_w2_a` (b, r) + `lokr_w2_b` (r, d*kh*kw); `alpha`; delta = kron(w1, w2) * scale with scale
  alpha / r when a factor is split into _a/_b and 1 when both are whole (alpha is then unused).

The formulas are those of LyCORIS's modules; tests check them against the `lycoris-lora` package.
Merging with a multiplier follows the WebUIs: W + m * (W' - W), where W' is the merged weight.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch

from library.config import network_kinds
from library.config.network_kinds import NetworkKind
from library.errors import UserError

DORA_SUFFIX = "dora_scale"


def _cast(tensors: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    return {k: v.to(dtype or v.dtype).contiguous() for k, v in tensors.items() if v is not None}


def _shaped(delta: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    if delta.numel() != weight.numel():
        raise UserError(f"a module's weight change has shape {tuple(delta.shape)}, the layer {tuple(weight.shape)}: "
                        "the file is for another model")
    return delta.reshape(weight.shape)


def need(parts: dict, name: str, source: str, *keys: str) -> None:
    missing = [k for k in keys if k not in parts]
    if missing:
        raise UserError(f"{source}: module {name} has no {missing[0]} tensor; the file is incomplete")


class DeltaModule:
    """A module whose weight change does not depend on the base weight (LoRA, LoHa, LoKr).

    Each file module class is built from one module's file tensors by `from_parts(parts, name,
    source, alpha)` (`alpha`: the file's, None when it has none) and gives them back with
    `file_tensors`; `kind` names the network kind whose files hold it."""
    kind = "?"
    alpha: float

    def delta(self) -> torch.Tensor:
        raise NotImplementedError

    def apply(self, weight: torch.Tensor, multiplier: float = 1.0) -> torch.Tensor:
        """The merged weight, in fp32."""
        return weight.float() + _shaped(self.delta(), weight) * multiplier

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.file_tensors().values())).dtype

    def file_tensors(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        raise NotImplementedError


@dataclass
class LoraModule(DeltaModule):
    down: torch.Tensor   # (r, in) or (r, in, kh, kw)
    up: torch.Tensor     # (out, r) or (out, r, 1, 1)
    alpha: float
    kind = "lora"

    @classmethod
    def from_parts(cls, parts: dict, name: str, source: str, alpha: float | None) -> "LoraModule":
        if "lora_down.weight" not in parts or "lora_up.weight" not in parts:
            raise UserError(f"{source}: module {name} has "
                            f"{'no lora_up' if 'lora_down.weight' in parts else 'no lora_down'} weight; the file "
                            "is incomplete")
        down, up = parts["lora_down.weight"], parts["lora_up.weight"]
        if down.ndim < 2 or up.ndim < 2:
            raise UserError(f"{source}: module {name} has tensors of impossible shapes for a LoRA (down "
                            f"{tuple(down.shape)}, up {tuple(up.shape)}); the file is damaged")
        # old files without alpha: scale 1 (alpha = rank), as every loader does
        return cls(down, up, float(down.shape[0]) if alpha is None else alpha)

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta(self) -> torch.Tensor:
        """The weight change scale * up @ down, in fp32, shaped like the base weight."""
        down, up = self.down.float(), self.up.float()
        out = (up.flatten(1) @ down.flatten(1)) * self.scale
        return out.reshape(up.shape[0], *down.shape[1:]) if down.ndim == 4 else out

    @property
    def dtype(self) -> torch.dtype:
        return self.up.dtype

    def file_tensors(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        d = dtype or self.up.dtype
        return {"lora_down.weight": self.down.to(d).contiguous(), "lora_up.weight": self.up.to(d).contiguous(),
                "alpha": torch.tensor(float(self.alpha), dtype=d)}


@dataclass
class LohaModule(DeltaModule):
    w1a: torch.Tensor
    w1b: torch.Tensor
    w2a: torch.Tensor
    w2b: torch.Tensor
    alpha: float
    t1: torch.Tensor | None = None
    t2: torch.Tensor | None = None
    kind = "loha"

    @classmethod
    def from_parts(cls, parts: dict, name: str, source: str, alpha: float | None) -> "LohaModule":
        need(parts, name, source, "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
        if ("hada_t1" in parts) != ("hada_t2" in parts):
            raise UserError(f"{source}: module {name} has only one of hada_t1/hada_t2; the file is incomplete")
        rank = parts["hada_w1_b"].shape[0]
        return cls(parts["hada_w1_a"], parts["hada_w1_b"], parts["hada_w2_a"], parts["hada_w2_b"],
                   float(rank) if alpha is None else alpha, parts.get("hada_t1"), parts.get("hada_t2"))

    @property
    def rank(self) -> int:
        return self.w1b.shape[0]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta(self) -> torch.Tensor:
        scale = self.scale
        if self.t1 is not None:  # Tucker: w*_a (r, out), w*_b (r, in), t (r, r, kh, kw)
            one = torch.einsum("i j k l, j r, i p -> p r k l", self.t1.float(), self.w1b.float(), self.w1a.float())
            two = torch.einsum("i j k l, j r, i p -> p r k l", self.t2.float(), self.w2b.float(), self.w2a.float())
            return one * two * scale
        return (self.w1a.float() @ self.w1b.float()) * (self.w2a.float() @ self.w2b.float()) * scale

    def file_tensors(self, dtype=None):
        return _cast({"hada_w1_a": self.w1a, "hada_w1_b": self.w1b, "hada_w2_a": self.w2a, "hada_w2_b": self.w2b,
                      "hada_t1": self.t1, "hada_t2": self.t2,
                      "alpha": torch.tensor(float(self.alpha))}, dtype)


@dataclass
class LokrModule(DeltaModule):
    w1: torch.Tensor | None
    w1a: torch.Tensor | None
    w1b: torch.Tensor | None
    w2: torch.Tensor | None
    w2a: torch.Tensor | None
    w2b: torch.Tensor | None
    alpha: float
    t2: torch.Tensor | None = None
    kind = "lokr"

    @classmethod
    def from_parts(cls, parts: dict, name: str, source: str, alpha: float | None) -> "LokrModule":
        if "lokr_w1" not in parts:
            need(parts, name, source, "lokr_w1_a", "lokr_w1_b")
        if "lokr_w2" not in parts:
            need(parts, name, source, "lokr_w2_a", "lokr_w2_b")
        get = parts.get
        module = cls(get("lokr_w1"), get("lokr_w1_a"), get("lokr_w1_b"), get("lokr_w2"), get("lokr_w2_a"),
                     get("lokr_w2_b"), 0.0, get("lokr_t2"))
        module.alpha = (float(module.rank) if module.rank is not None else 1.0) if alpha is None else alpha
        return module

    @property
    def rank(self) -> int | None:
        """The rank of the split factor(s); None when both factors are whole matrices."""
        if self.w1a is not None:
            return self.w1a.shape[1]
        if self.w2a is not None:
            return self.w2a.shape[1] if self.t2 is None else self.w2a.shape[0]
        return None

    @property
    def scale(self) -> float:
        return 1.0 if self.rank is None else self.alpha / self.rank

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        w1 = self.w1.float() if self.w1 is not None else self.w1a.float() @ self.w1b.float()
        if self.w2 is not None:
            w2 = self.w2.float()
        elif self.t2 is not None:  # Tucker: w2_a (r, b), w2_b (r, d), t2 (r, r, kh, kw)
            w2 = torch.einsum("i j k l, i p, j r -> p r k l", self.t2.float(), self.w2a.float(), self.w2b.float())
        else:
            w2 = self.w2a.float() @ self.w2b.float()
        return w1, w2

    def delta(self) -> torch.Tensor:
        w1, w2 = self.factors()
        if w2.ndim == 4:
            w1 = w1[:, :, None, None]
        return torch.kron(w1.contiguous(), w2.contiguous()) * self.scale

    def file_tensors(self, dtype=None):
        return _cast({"lokr_w1": self.w1, "lokr_w1_a": self.w1a, "lokr_w1_b": self.w1b, "lokr_w2": self.w2,
                      "lokr_w2_a": self.w2a, "lokr_w2_b": self.w2b, "lokr_t2": self.t2,
                      "alpha": torch.tensor(float(self.alpha))}, dtype)


@dataclass
class DoraModule:
    """A weight change (usually LoRA) followed by DoRA's rescaling of each channel to a magnitude."""
    inner: DeltaModule
    magnitude: torch.Tensor  # as in the file: (out, 1[, 1, 1]) or, older orientation, (1, in[, 1, 1])
    kind = "dora"

    @classmethod
    def from_parts(cls, parts: dict, name: str, source: str, alpha: float | None) -> "DoraModule":
        """The module the other tensors make (LoRA, or LoHa in some LyCORIS files), with the magnitude."""
        inner = build_module({k: v for k, v in parts.items() if k != DORA_SUFFIX}, name, source, alpha)
        return cls(inner, parts[DORA_SUFFIX])

    @property
    def alpha(self) -> float:
        return self.inner.alpha

    @property
    def rank(self):
        return self.inner.rank

    @property
    def scale(self) -> float:
        return self.inner.scale

    @property
    def dtype(self) -> torch.dtype:
        return self.magnitude.dtype

    def per_output(self, weight: torch.Tensor) -> bool:
        m = self.magnitude
        if m.shape[0] == weight.shape[0] and m[0].numel() == 1:
            return True
        if m.shape[0] == 1 and m.ndim > 1 and m.shape[1] == weight.shape[1] and m[0, 0].numel() == 1:
            return False
        raise UserError(f"dora_scale of shape {tuple(m.shape)} fits neither the outputs nor the inputs of a layer "
                        f"shaped {tuple(weight.shape)}: the file is for another model")

    def apply(self, weight: torch.Tensor, multiplier: float = 1.0) -> torch.Tensor:
        base = weight.float()
        merged = self.inner.apply(base, 1.0)
        if self.per_output(weight):
            norm = merged.flatten(1).norm(dim=1).reshape(-1, *[1] * (merged.ndim - 1))
            magnitude = self.magnitude.float().reshape(norm.shape)
        else:
            norm = merged.transpose(0, 1).flatten(1).norm(dim=1).reshape(1, -1, *[1] * (merged.ndim - 2))
            magnitude = self.magnitude.float().reshape(norm.shape)
        rescaled = merged * (magnitude / norm)
        return base + (rescaled - base) * multiplier

    def file_tensors(self, dtype=None):
        return {**self.inner.file_tensors(dtype), DORA_SUFFIX: self.magnitude.to(dtype or self.magnitude.dtype)}


def module_class(kind: NetworkKind) -> type:
    """The file module class a kind names (a class of this module, or "module:Class")."""
    if ":" in kind.file_module:
        module, _, name = kind.file_module.partition(":")
        return getattr(importlib.import_module(module), name)
    if kind.file_module in globals():
        return globals()[kind.file_module]
    raise ValueError(f"network kind {kind.name!r}: no file module class {kind.file_module!r} in library.lora")


def file_kind(parts: dict[str, torch.Tensor]) -> NetworkKind:
    """The kind of one module's file tensors: the first kind in the table whose tensors are among
    them, plain LoRA when none is."""
    for kind in network_kinds.network_kinds():
        if kind.name != network_kinds.DEFAULT_KIND and any(s in parts for s in kind.file_suffixes):
            return kind
    return network_kinds.network_kind(network_kinds.DEFAULT_KIND)


def build_module(parts: dict[str, torch.Tensor], name: str, source: str, alpha: float | None = None):
    """The module of one name from its file tensors (suffix -> tensor); `alpha` is used when the
    tensors have none (a PEFT file's alpha is in its metadata)."""
    if "alpha" in parts and parts["alpha"].numel() != 1:
        raise UserError(f"{source}: module {name} has an alpha of shape {tuple(parts['alpha'].shape)} (one value "
                        "expected); the file is damaged")
    if "alpha" in parts:
        alpha = float(parts["alpha"])
    return module_class(file_kind(parts)).from_parts(parts, name, source, alpha)
