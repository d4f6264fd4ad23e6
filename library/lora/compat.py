"""Does a LoRA file fit a model? The one architecture and layout check, before any tensor math.

Every module of the file is placed by name (any layout the reader understands) and its shapes are
compared with the base weight it would change: the input and output sizes must match the layer,
and lora_up's rank must match lora_down's. A file is checked against a target: a loaded model, a
single-file checkpoint's header, the network being trained (which also fixes each rank), or, for
tools without a model, the shipped architecture the file fits best.

Outcomes: every module fits -> the weights. No module fits, or the file fits another architecture
better -> a one-line error naming both architectures and the count that fits. Some modules do not
fit (unknown names, other shapes, or for a network: layers the file has no weights for) -> a
one-line error with the counts, unless partial use was explicitly allowed (--allow_partial,
network_weights_partial), in which case the modules that fit are used and the others reported.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch

from library.config.network_kinds import DEFAULT_KIND, network_kind
from library.errors import UserError
from library.lora.index import NameIndex
from library.lora.weights import LoraModule, LoraWeights, NoLoraModules, from_tensors
from library.models import shipped

log = logging.getLogger(__name__)

_TENSOR_SUFFIX = re.compile(r"\.(?:lora_(?:down|up)\.weight|lora_[AB](?:\.default)?\.weight|alpha|"
                            r"processor\.\w+_lora\.(?:down|up)\.weight)$")


@dataclass(frozen=True)
class Target:
    """What a LoRA is checked against."""
    label: str                             # for messages, e.g. "the model at base.safetensors (SD1.x)"
    arch: str                              # "sd1" | "sd2" | "sdxl"
    index: NameIndex
    shapes: dict                           # our kohya module name -> shape of the base weight it changes
    ranks: dict | None = None              # a network being trained: the rank of each module
    required: bool = False                 # every module of `shapes` needs weights from the file (a network)


@dataclass
class Fit:
    weights: LoraWeights | None            # the modules that fit (None when none do)
    total: int                             # LoRA modules in the file
    unknown: list[str] = field(default_factory=list)   # modules the target has no layer for
    misfit: list[str] = field(default_factory=list)    # modules whose shapes do not fit their layer
    missing: list[str] = field(default_factory=list)   # target layers without weights (required targets)
    rank: dict = field(default_factory=dict)           # fit the layer, but not the configured rank: file ranks

    @property
    def matched(self) -> int:
        return len(self.weights.modules) if self.weights else 0

    @property
    def complete(self) -> bool:
        return not (self.unknown or self.misfit or self.missing or self.rank) and self.matched > 0


def arch_name(arch: str) -> str:
    """How messages call a model family ("SD1.x" for "sd1")."""
    from library.errors import UserError as Unknown
    from library.models.families import get_family

    try:
        return get_family(arch).label
    except Unknown:
        return arch


# --- targets -----------------------------------------------------------------------------------

def _shapes_of(index: NameIndex, components: dict) -> dict:
    from library.lora.apply import module_of

    lookup = {name: dict(model.named_modules()) for name, model in components.items()}
    shapes = {}
    for name, target in index.targets.items():
        modules = lookup.get(target.component)
        layer = module_of(None, target.path, modules) if modules is not None else None
        if layer is not None and getattr(layer, "weight", None) is not None:
            shapes[name] = tuple(layer.weight.shape)
    return shapes


def plan_target(plan, label: str) -> Target:
    """The model a ModelPlan describes (library.models.loader), from its configs: checked before it loads."""
    if plan.single_file:
        from library.models.single_file import read_safetensors_header

        return _header_target(plan, read_safetensors_header(plan.path), label)
    return config_target(str(plan.config_tree), plan.arch, f"{label} ({arch_name(plan.arch)})")


def _header_target(plan, header: dict, label: str) -> Target:
    """An original-format checkpoint, from its safetensors header (no tensor is read)."""
    from library.lora.apply import original_key

    index = NameIndex.for_tree(plan.family, plan.config_tree)
    shapes = {}
    for name, target in index.targets.items():
        key, block = original_key(plan.family, target, plan.unet_config)
        entry = header.get(key)
        if isinstance(entry, dict) and "shape" in entry:
            shape = list(entry["shape"])
            if block is not None:  # q, k and v stacked in one OpenCLIP weight
                shape[0] //= 3
            shapes[name] = tuple(shape)
    return Target(f"{label} ({arch_name(plan.arch)})", plan.arch, index, shapes)


def network_target(network, label: str) -> Target:
    """The LoRA layers being trained (library.lora.network.LoraNetwork): names, base shapes, ranks."""
    shapes, ranks = {}, {}
    # A kind without a rank per module (LoKr's factors may be whole matrices): its shapes are
    # checked when the network loads them.
    ranked = network_kind(getattr(network.spec, "network_type", DEFAULT_KIND)).ranked
    for name, (target, layer) in network.layers.items():
        shapes[name] = tuple(layer.get_base_layer().weight.shape)
        ranks[name] = network.ranks[name][0] if ranked else None
    return Target(f"{label} ({arch_name(network.arch)})", network.arch, network.index, shapes, ranks, required=True)


@lru_cache(maxsize=None)
def config_target(folder: str, arch: str, label: str) -> Target:
    """A model with the configs in the diffusers-layout `folder`, its layer shapes from modules built on
    the meta device (no memory, no weights)."""
    tree = Path(folder)
    index = NameIndex.for_tree(arch, tree)
    return Target(label, arch, index, _shapes_of(index, index.family.empty_components(tree)))


def tree_target(name: str) -> Target:
    """A shipped architecture (full-size or tiny)."""
    family = shipped.SHIPPED_TREES[name]
    tiny = " (tiny test model)" if name.startswith("tiny") else ""
    return config_target(str(shipped.tree(name)), family, f"{arch_name(family)}{tiny}")


# --- checking ----------------------------------------------------------------------------------

def _module_name(key: str) -> str:
    return _TENSOR_SUFFIX.sub("", key)


def _fits(down, up, shape: tuple) -> bool:
    return (down.ndim >= 2 and up.ndim >= 2 and up.shape[1] == down.shape[0] and up.shape[0] == shape[0]
            and math.prod(down.shape[1:]) == math.prod(shape[1:]) and math.prod(up.shape[2:]) == 1)


def _on_meta(module):
    """A copy of a module dataclass whose tensors are on the meta device: shapes without data."""
    changes = {f.name: getattr(module, f.name).to("meta") for f in dataclasses.fields(module)
               if isinstance(getattr(module, f.name), torch.Tensor)}
    return dataclasses.replace(module, **changes)


def _module_fits(mod, shape: tuple) -> bool:
    """Whether a read module (LoRA, or LoHa/LoKr/DoRA from library.lora.lycoris) fits a layer whose
    weight has `shape`; the other types' weight change is worked out on the meta device."""
    if isinstance(mod, LoraModule):
        return _fits(mod.down, mod.up, shape)
    try:
        if hasattr(mod, "magnitude"):  # DoRA: its magnitude must fit the layer's outputs or inputs
            mod.per_output(torch.empty(shape, device="meta"))
        delta = _on_meta(getattr(mod, "inner", mod)).delta()
    except (UserError, RuntimeError, ValueError, IndexError):
        return False
    return delta.shape[0] == shape[0] and delta.numel() == math.prod(shape)


def fit(tensors: dict, metadata: dict, source: str, target: Target) -> Fit:
    """Place every module of the file on `target` and compare shapes (no tensor data is touched)."""
    try:
        weights = from_tensors(tensors, metadata, source, target.index)
    except NoLoraModules:  # no module resolves for this architecture's names
        return Fit(None, len({_module_name(k) for k in tensors}), unknown=sorted({_module_name(k) for k in tensors}))
    result = Fit(weights, 0, unknown=sorted({_module_name(k) for k in weights.unknown}))
    kept = {}
    for name, mod in weights.modules.items():
        shape = target.shapes.get(name)
        if shape is None:
            result.unknown.append(name)
        elif not _module_fits(mod, shape):
            result.misfit.append(name)
        elif target.ranks is not None and target.ranks[name] is not None and mod.rank != target.ranks[name]:
            result.rank[name] = mod.rank
        else:
            kept[name] = mod
    if target.required:
        result.missing = sorted(set(target.shapes) - set(weights.modules))
    result.total = len(weights.modules) + len({_module_name(k) for k in weights.unknown})
    result.weights = LoraWeights(target.index, kept, weights.metadata, weights.style, weights.unknown) if kept else None
    return result


def best_tree(tensors: dict, metadata: dict, source: str) -> tuple[Target | None, Fit | None]:
    """The shipped architecture most of the file's modules fit (None when none of them fits any)."""
    best: tuple[Target | None, Fit | None] = (None, None)
    for name in shipped.SHIPPED_TREES:
        target = tree_target(name)
        got = fit(tensors, metadata, source, target)
        if got.matched and (best[1] is None or got.matched > best[1].matched):
            best = (target, got)
    return best


def no_lora(tensors: dict, source: str) -> UserError:
    if not tensors:
        return UserError(f"{source}: holds no tensors; not a LoRA file")
    return UserError(f"{source}: no LoRA for SD1.x, SD2.x or SDXL in this file: none of its {len(tensors)} tensors "
                     f"(e.g. {next(iter(tensors))}) is a LoRA module that fits any of these architectures")


def _example(names: list[str]) -> str:
    return f"{len(names)} (e.g. {names[0]})"


def check(tensors: dict, metadata: dict, source: str, target: Target | None = None, allow_partial: bool = False,
          partial_hint: str = "pass --allow_partial") -> tuple[LoraWeights, Target]:
    """The file's weights placed on `target` (default: the architecture it fits best) and that target,
    or a UserError."""
    own, own_fit = best_tree(tensors, metadata, source)
    if own is None:
        raise no_lora(tensors, source)
    if target is None:
        target, got = own, own_fit
    else:
        got = fit(tensors, metadata, source, target)
        if own.arch != target.arch and own_fit.matched > got.matched:
            raise UserError(f"{source}: a LoRA for {own.label}, not for {target.label}: only {got.matched} of "
                            f"{got.total} modules fit it")
    if got.rank:  # the layers fit, the configured rank does not: a config change fixes it
        name, rank = next(iter(got.rank.items()))
        raise UserError(f"{source}: rank {rank} does not match the configured rank {target.ranks[name]} in "
                        f"{len(got.rank)} modules (e.g. {name}); set network_dim/conv_dim to the file's ranks")
    if got.matched == 0:
        raise UserError(f"{source}: a LoRA for {own.label}; none of its {got.total} modules fits {target.label} "
                        "(another model size or layout)")
    if got.complete:
        return got.weights, target
    parts = []
    if got.unknown:
        parts.append(f"{_example(got.unknown)} have no layer in it")
    if got.misfit:
        parts.append(f"{_example(got.misfit)} have other shapes than its layers")
    if got.missing:
        parts.append(f"{_example(got.missing)} of its trained layers get no weights from the file")
    summary = f"{got.matched} of {got.total} modules fit {target.label}; " + "; ".join(parts)
    if not allow_partial:
        raise UserError(f"{source}: {summary}; {partial_hint} to use only the {got.matched} that fit")
    log.warning("%s: %s; using only the %d that fit, as allowed", source, summary, got.matched)
    return got.weights, target


def read_checked(path: str | Path, target: Target | None = None, allow_partial: bool = False,
                 partial_hint: str = "pass --allow_partial") -> tuple[LoraWeights, Target]:
    """Read a LoRA file (any layout) and check it against `target`; see `check`."""
    from library.lora.kohya_file import read_lora

    tensors, metadata = read_lora(path)
    return check(tensors, metadata, str(path), target, allow_partial, partial_hint)
