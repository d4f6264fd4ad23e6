"""LoRA weights in memory, read from any common file layout and written to kohya's or PEFT's.

Readers accept: kohya files (SDXL with SGM or diffusers paths, SD1.x with diffusers or SGM paths),
with LyCORIS's DoRA, LoHa and LoKr modules too (library.lora.lycoris); PEFT/diffusers files
(`unet.<path>.lora_A.weight`, alpha from `lora_adapter_metadata`), diffusers' older
attention-processor files, and files without alpha (alpha = rank, i.e. scale 1).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch

from library.config import network_kinds
from library.errors import UserError
from library.lora.index import NameIndex, shipped_index
from library.lora.kohya_file import read_lora, write_lora
from library.lora.lycoris import DeltaModule, LoraModule, build_module  # noqa: F401  (LoraModule: read from here too)
from library.utils.atomic import atomic_write_bytes


@dataclass
class LoraWeights:
    index: NameIndex
    modules: dict[str, DeltaModule]   # LoraModule, or LyCORIS's DoraModule/LohaModule/LokrModule
    metadata: dict[str, str] = field(default_factory=dict)
    style: str = "kohya"
    unknown: list[str] = field(default_factory=list)

    @property
    def arch(self) -> str:
        return self.index.arch

    def dtype(self) -> torch.dtype | None:
        first = next(iter(self.modules.values()), None)
        return None if first is None else first.dtype

    @property
    def network_type(self) -> str:
        """lora, dora, loha, lokr, or the types joined with "+" for a file that mixes them."""
        return "+".join(sorted({m.kind for m in self.modules.values()})) or "lora"

    @property
    def plain_lora(self) -> bool:
        """Every module is a LoraModule (lora_down/lora_up), what the LoRA-only tools work on."""
        return all(type(m) is LoraModule for m in self.modules.values())

    def require_plain_lora(self, source: str, what: str) -> None:
        if not self.plain_lora:
            raise UserError(f"{source}: a {self.network_type} file; {what} handles plain LoRA "
                            "(lora_down/lora_up) only")


# --- reading -----------------------------------------------------------------------------------

class NoLoraModules(UserError):
    """No tensor of the file is a LoRA module of the given architecture."""


_PEFT = re.compile(r"^(?:base_model\.model\.)?(.+?)\.(lora_A|lora_B)(?:\.default)?\.weight$")
_OLD_DIFFUSERS = re.compile(r"^(.+)\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")


@lru_cache(maxsize=None)
def _kohya_key(suffixes: tuple[str, ...]) -> re.Pattern:
    """kohya's `<module>.<tensor>` keys of the tensors files of the registered kinds hold."""
    return re.compile(r"^(lora_(?:unet|te[12]?)_[^.]+)\.(" + "|".join(re.escape(s) for s in suffixes) + ")$")


def _base_version(metadata: dict) -> str | None:
    version = metadata.get("ss_base_model_version", "")
    if version.startswith("sdxl"):
        return "sdxl"
    if version.startswith("sd_v2"):
        return "sd2"
    if version.startswith("sd_v1"):
        return "sd1"
    return None


def _input_width(tensors: dict[str, torch.Tensor], wanted) -> int | None:
    """Input size of the first module whose key satisfies `wanted`, from whichever factors it has
    (LoRA down, LoHa's w1_b, the product of LoKr's two input factors)."""
    for key, value in tensors.items():
        if not wanted(key):
            continue
        if key.endswith(("lora_down.weight", "lora_A.weight", ".down.weight", "hada_w1_b")):
            return value.shape[1]
        m = re.match(r"^(.+)\.lokr_w1(_b)?$", key)
        if m:
            w2 = tensors.get(f"{m[1]}.lokr_w2", tensors.get(f"{m[1]}.lokr_w2_b"))
            if w2 is not None:
                return value.shape[1] * w2.shape[1]
    return None


def guess_index(tensors: dict[str, torch.Tensor], metadata: dict, source: str) -> NameIndex:
    """The architecture a file was trained for, from its keys, shapes and metadata."""
    keys = list(tensors)
    cross = _input_width(tensors, lambda k: "attn2" in k and "to_k" in k)
    arch = None
    if any(k.startswith(("lora_te1_", "lora_te2_", "text_encoder_2.")) for k in keys):
        arch = "sdxl"
    arch = arch or _base_version(metadata)
    te_width = None
    if cross is None:
        te_width = _input_width(tensors, lambda k: "q_proj" in k)
    index = shipped_index(arch, cross, te_width) or shipped_index(None, cross, te_width)
    if index is None:
        raise UserError(f"{source}: cannot tell which model this LoRA is for (cross-attention width {cross}); "
                        "only SD1.x, SD2.x and SDXL LoRAs are supported")
    return index


def _peft_alphas(metadata: dict) -> dict[str, dict]:
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        data = json.loads(raw)
    except ValueError:
        return {}
    out: dict[str, dict] = {}
    for key, value in data.items():
        prefix, _, name = key.partition(".")
        out.setdefault(prefix, {})[name] = value
    return out


def _alpha_from_config(config: dict, path: str, rank: int) -> float:
    for pattern, alpha in (config.get("alpha_pattern") or {}).items():
        if re.fullmatch(rf"(.*\.)?{pattern}", path):
            return float(alpha)
    return float(config.get("lora_alpha", rank))


def from_tensors(tensors: dict[str, torch.Tensor], metadata: dict, source: str,
                 index: NameIndex | None = None) -> LoraWeights:
    index = index or guess_index(tensors, metadata, source)
    parts: dict[str, dict] = {}
    unknown: list[str] = []
    styles = set()
    peft_configs = _peft_alphas(metadata)
    kohya_key = _kohya_key(network_kinds.file_suffixes())
    for key, value in tensors.items():
        m = kohya_key.match(key)
        if m:
            name = index.resolve(m[1])
            if name is None:
                unknown.append(key)
                continue
            styles.add("kohya" if name == m[1] else "kohya (other path names)")
            parts.setdefault(name, {})[m[2]] = value
            continue
        m = _PEFT.match(key) or _OLD_DIFFUSERS.match(key)
        if m and m.re is _PEFT:
            module, slot = m[1], {"lora_A": "lora_down.weight", "lora_B": "lora_up.weight"}[m[2]]
        elif m:
            suffix = "to_out.0" if m[2] == "to_out" else m[2]
            module, slot = f"{m[1]}.{suffix}", f"lora_{m[3]}.weight"
        elif key.endswith(".alpha"):
            module, slot = key[: -len(".alpha")], "alpha"
        else:
            unknown.append(key)
            continue
        name = index.from_peft_key(module)
        if name is None:
            unknown.append(key)
            continue
        styles.add("peft")
        parts.setdefault(name, {})[slot] = value
        parts[name].setdefault("_peft", module)
    modules = {}
    for name, got in parts.items():
        alpha, peft = None, got.pop("_peft", None)
        if peft is not None and "alpha" not in got and "lora_down.weight" in got:
            component, _, path = peft.partition(".")
            alpha = _alpha_from_config(peft_configs.get(component, {}), path, got["lora_down.weight"].shape[0])
        modules[name] = build_module(got, name, source, alpha)
    if not modules:
        raise NoLoraModules(f"{source}: no LoRA modules found (expected lora_down/lora_up, lora_A/lora_B, or LyCORIS's "
                        "hada_*/lokr_* tensors)")
    return LoraWeights(index, modules, dict(metadata), " + ".join(sorted(styles)), unknown)


def load_weights(path: str | Path, index: NameIndex | None = None) -> LoraWeights:
    tensors, metadata = read_lora(path)
    return from_tensors(tensors, metadata, str(path), index)


# --- writing -----------------------------------------------------------------------------------

def kohya_tensors(weights: LoraWeights, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """kohya's layout (LyCORIS's for DoRA/LoHa/LoKr modules)."""
    return module_tensors(weights.modules, dtype)


def module_tensors(modules: dict, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    return {f"{name}.{suffix}": t for name, mod in sorted(modules.items())
            for suffix, t in mod.file_tensors(dtype).items()}


def save_kohya(weights: LoraWeights, path: str | Path, metadata: dict | None = None,
               dtype: torch.dtype | None = None) -> str:
    return write_lora(path, kohya_tensors(weights, dtype), weights.metadata if metadata is None else metadata)


def peft_tensors(weights: LoraWeights, dtype: torch.dtype | None = None) -> tuple[dict, dict[str, str]]:
    """PEFT/diffusers layout; per-module ranks and alphas go into `lora_adapter_metadata`, which
    diffusers' load_lora_weights reads (without it alpha != rank would be lost)."""
    if not weights.plain_lora:
        raise UserError(f"the PEFT/diffusers layout holds plain LoRA only, not {weights.network_type}; keep kohya's "
                        "layout, which the WebUIs load")
    tensors = {}
    configs: dict[str, dict] = {}
    for name, mod in sorted(weights.modules.items()):
        key = weights.index.peft_key(name)
        component, _, path = key.partition(".")
        d = dtype or mod.up.dtype
        tensors[f"{key}.lora_A.weight"] = mod.down.to(d).contiguous()
        tensors[f"{key}.lora_B.weight"] = mod.up.to(d).contiguous()
        if component != "unet":
            # transformers >= 5.6 has no `text_model.` in CLIPTextModel; a suffix matches both layouts.
            path = path.removeprefix("text_model.")
        cfg = configs.setdefault(component, {"targets": [], "ranks": {}, "alphas": {}})
        cfg["targets"].append(path)
        cfg["ranks"][path] = mod.rank
        cfg["alphas"][path] = mod.alpha
    packed = {}
    for component, cfg in configs.items():
        rank = max(set(cfg["ranks"].values()), key=list(cfg["ranks"].values()).count)
        alpha = max(set(cfg["alphas"].values()), key=list(cfg["alphas"].values()).count)
        packed[f"{component}.r"] = rank
        packed[f"{component}.lora_alpha"] = alpha
        packed[f"{component}.target_modules"] = sorted(cfg["targets"])
        packed[f"{component}.rank_pattern"] = {re.escape(p): r for p, r in cfg["ranks"].items() if r != rank}
        packed[f"{component}.alpha_pattern"] = {re.escape(p): a for p, a in cfg["alphas"].items() if a != alpha}
    meta = {k: v for k, v in weights.metadata.items() if k != "lora_adapter_metadata"}
    meta["lora_adapter_metadata"] = json.dumps(packed, sort_keys=True)
    return tensors, meta


def save_peft(weights: LoraWeights, path: str | Path, dtype: torch.dtype | None = None) -> None:
    from safetensors.torch import save

    tensors, meta = peft_tensors(weights, dtype)
    atomic_write_bytes(path, save(tensors, metadata=meta))

