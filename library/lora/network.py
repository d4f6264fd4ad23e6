"""peft adapter layers (LoRA, DoRA, LoHa, LoKr) on the UNet (and optionally the text encoders),
addressed by the name tables.

peft provides the layers (their weights, alpha/rank scaling, dropout, enable/disable); this module
decides where they go, keeps the mapping to kohya names, and moves weights in and out in the file
layout WebUIs load: kohya's for LoRA (`lora_down` = peft `lora_A`, `lora_up` = peft `lora_B`),
LyCORIS's for the others (library.lora.lycoris). Every type goes through the same path; its
record in the network-kind table (library.config.network_kinds) says which peft config builds it
and how its parameters are named in files.
"""
from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import peft
import torch
from peft import inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer, cast_adapter_dtype

from library.config.network_kinds import NetworkKind, network_kind
from library.errors import UserError
from library.lora.blocks import BlockPlan, block_plan
from library.lora.index import NameIndex
from library.lora.fused import fuse_whole_delta, keep_input_under_autocast
from library.lora.lycoris import DORA_SUFFIX, DoraModule, build_module, module_class
from library.lora.names import LoraTarget, as_family, text_encoder_targets, unet_targets

ADAPTER = "default"


@dataclass(frozen=True)
class NetworkSpec:
    """What to train: ranks and alphas as they will be written to the file."""
    dim: int
    alpha: float
    conv_dim: int | None = None
    conv_alpha: float | None = None
    dropout: float = 0.0
    train_unet: bool = True
    train_text_encoders: bool = False
    network_type: str = "lora"    # a network kind (library.config.network_kinds)
    lokr_factor: int = -1
    # kohya's per-block arguments (library.lora.blocks), LoRA+ is the optimizer's business
    block_dims: tuple[int, ...] | None = None
    block_alphas: tuple[float, ...] | None = None
    conv_block_dims: tuple[int, ...] | None = None
    conv_block_alphas: tuple[float, ...] | None = None
    down_lr_weight: tuple[float, ...] | str | None = None
    mid_lr_weight: tuple[float, ...] | None = None
    up_lr_weight: tuple[float, ...] | str | None = None
    block_lr_zero_threshold: float = 0.0
    rank_dropout: float = 0.0
    module_dropout: float = 0.0

    @classmethod
    def from_options(cls, net, train_text_encoders: bool) -> "NetworkSpec":
        """From the [network] options (library.config.options.NetworkOptions)."""
        return cls(dim=net.network_dim, alpha=net.alpha, conv_dim=net.conv_dim, conv_alpha=net.conv_alpha_value,
                   dropout=net.network_dropout, train_unet=True, train_text_encoders=train_text_encoders,
                   network_type=net.network_type, lokr_factor=net.lokr_factor,
                   **{k: getattr(net, k) for k in BLOCK_FIELDS}, rank_dropout=net.rank_dropout,
                   module_dropout=net.module_dropout)

    @property
    def trains_conv(self) -> bool:
        return self.conv_dim is not None or self.conv_block_dims is not None

    def rank_alpha(self, target: LoraTarget, plan: BlockPlan | None = None, block: int | None = None
                   ) -> tuple[int, float]:
        default = (self.conv_dim, self.conv_alpha) if target.conv3x3 else (self.dim, self.alpha)
        if plan is None or target.component != "unet":
            return default
        return plan.rank_alpha(block, target.conv3x3, default)


BLOCK_FIELDS = ("block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas", "down_lr_weight",
                "mid_lr_weight", "up_lr_weight", "block_lr_zero_threshold")


def _find_module(modules: dict[str, torch.nn.Module], path: str) -> tuple[str, torch.nn.Module] | None:
    for candidate in (path, path.removeprefix("text_model.")):
        if candidate in modules:
            return candidate, modules[candidate]
    return None


def _sizes(module: torch.nn.Module) -> tuple[int, int]:
    if isinstance(module, torch.nn.Conv2d):
        return module.in_channels, module.out_channels
    return module.in_features, module.out_features


def peft_config(spec: NetworkSpec, targets: list[str], rank_pattern: dict, alpha_pattern: dict):
    """The peft config of the network type; every adapter starts with a zero weight change."""
    kind = network_kind(spec.network_type)
    return getattr(peft, kind.peft_config)(r=spec.dim, target_modules=targets, rank_pattern=rank_pattern,
                                           alpha_pattern=alpha_pattern, **kind.peft_kwargs(spec))


def _peft_params(layer: BaseTunerLayer, kind: NetworkKind) -> dict[str, torch.nn.Parameter]:
    """The adapter's parameters of one layer, by file tensor name."""
    out = {}
    for attr in layer.adapter_layer_names:
        container = getattr(layer, attr, None)
        if container is None or ADAPTER not in container:
            continue
        param = container[ADAPTER]
        out[kind.peft_names.get(attr, attr)] = param.weight if isinstance(param, torch.nn.Module) else param
    return out


class LoraNetwork:
    """The adapter layers (LoRA, DoRA, LoHa or LoKr) injected into a loaded model bundle."""

    def __init__(self, unet: torch.nn.Module, text_encoders: list[torch.nn.Module], family, spec: NetworkSpec):
        """`family`: the model family (library.models.family), or its name."""
        self.spec = spec
        self.kind = network_kind(spec.network_type)
        self.family = as_family(family)
        self.enabled = True
        self.components: dict[str, torch.nn.Module] = {}
        self.layers: dict[str, tuple[LoraTarget, BaseTunerLayer]] = {}
        self.ranks: dict[str, tuple[int, float]] = {}     # (rank, alpha) of each layer, as written to the file
        self.blocks: dict[str, int] = {}                  # kohya block of each UNet layer (with a block plan)
        self.index = NameIndex.build(self.family, unet.config, [te.config.num_hidden_layers for te in text_encoders])
        self.plan = block_plan(spec, self.family, unet.config) if spec.train_unet else None
        self._unet_config = unet.config
        if spec.train_unet:
            self._inject("unet", unet, unet_targets(unet.config, self.family, spec.trains_conv))
        if spec.train_text_encoders:
            counts = [te.config.num_hidden_layers for te in text_encoders]
            targets = text_encoder_targets(self.family, counts)
            for index, te in enumerate(text_encoders):
                comp = f"te{index + 1}"
                self._inject(comp, te, [t for t in targets if t.component == comp])

    def _inject(self, component: str, model: torch.nn.Module, targets: list[LoraTarget]) -> None:
        resolved: dict[str, LoraTarget] = {}
        before = dict(model.named_modules())  # once: a lookup per target walked the model each time
        for target in targets:
            found = _find_module(before, target.path)
            if found is None or not isinstance(found[1], (torch.nn.Linear, torch.nn.Conv2d)):
                raise UserError(f"{component}: module {target.path} ({target.name}) is missing or not Linear/Conv2d; "
                                "the model does not have the expected architecture")
            block = self.family.lora_block_index(target.path, self._unet_config) \
                if self.plan is not None and component == "unet" else None
            rank, alpha = self.spec.rank_alpha(target, self.plan, block)
            if not rank:
                continue  # kohya: a block of rank 0 (or learning-rate factor 0) has no LoRA
            if block is not None:
                self.blocks[target.name] = block
            self.ranks[target.name] = (rank, float(alpha))
            if self.kind.check_layer is not None:
                self.kind.check_layer(self.spec, target.name, _sizes(found[1]))
            resolved[found[0]] = target
        if not resolved:
            return
        rank_pattern, alpha_pattern = {}, {}
        for path, target in resolved.items():
            rank, alpha = self.ranks[target.name]
            if (rank, alpha) != (self.spec.dim, self.spec.alpha):
                rank_pattern[re.escape(path)] = rank
                alpha_pattern[re.escape(path)] = alpha
        config = peft_config(self.spec, sorted(resolved), rank_pattern, alpha_pattern)
        inject_adapter_in_model(config, model, adapter_name=ADAPTER)
        # Adapter weights train in fp32 even when the frozen base weights are fp16/bf16.
        cast_adapter_dtype(model, ADAPTER, autocast_adapter_dtype=True)
        modules = dict(model.named_modules())
        for path, target in resolved.items():
            layer = modules[path]
            assert isinstance(layer, BaseTunerLayer), path
            fuse_whole_delta(layer)  # LoHa/LoKr: one matmul per layer instead of peft's two
            keep_input_under_autocast(layer)
            self.layers[target.name] = (target, layer)
            if self.kind.rank_module_dropout == "hook" and (self.spec.rank_dropout or self.spec.module_dropout):
                layer.lora_A[ADAPTER].register_forward_hook(
                    _dropout_hook(self.spec.rank_dropout, self.spec.module_dropout))
        self.components[component] = model

    # --- parameters ---------------------------------------------------------------------------
    def parameters(self, component: str | None = None) -> Iterator[torch.nn.Parameter]:
        for target, layer in self.layers.values():
            if component is None or target.component == component:
                yield from _peft_params(layer, self.kind).values()

    def parameter_sets(self) -> Iterator[tuple[str, str | None, float, bool, torch.nn.Parameter]]:
        """(component, kohya block label or None, block learning-rate factor, LoRA+ tensor, parameter) of
        every trained parameter, in a fixed order; the optimizer's parameter groups are built from it."""
        labels = self.plan.labels if self.plan is not None else ()
        for name in sorted(self.layers):
            target, layer = self.layers[name]
            block = self.blocks.get(name)
            label = labels[block] if block is not None and self.plan.lr_weights is not None else None
            weight = self.plan.lr_weight(block) if self.plan is not None else 1.0
            for key, param in _peft_params(layer, self.kind).items():
                yield target.component, label, weight, key in self.kind.loraplus, param

    @property
    def arch(self) -> str:
        return self.family.name

    def trainable_components(self) -> list[str]:
        return list(self.components)

    # --- enable / disable (the APT reference pass runs the same model with the adapters off) --
    def set_enabled(self, enabled: bool) -> None:
        for _, layer in self.layers.values():  # every injected layer, without walking the models
            layer.enable_adapters(enabled)
        self.enabled = enabled

    @contextmanager
    def multiplied(self, multiplier: float):
        """Every adapter's weight change times `multiplier` inside the block (kohya's per-dataset
        network_multiplier); the exact scales come back after it. peft keeps each layer's alpha / rank
        scale in `scaling`, for LoRA and the LyCORIS kinds alike, and the weight change is linear in
        it (DoRA's is not: refused where the option is read). Entered again with the multiplier
        already in force (the loop holds it over the backward pass, the denoiser over the forward),
        it changes nothing."""
        current = getattr(self, "_multiplier", 1.0)
        if multiplier == current:
            yield
            return
        if current != 1.0:
            raise RuntimeError(f"network multiplier {multiplier} inside multiplier {current}")
        saved = [(layer, dict(layer.scaling)) for _, layer in self.layers.values()]
        for layer, scales in saved:
            layer.scaling[ADAPTER] = scales[ADAPTER] * multiplier
        self._multiplier = multiplier
        try:
            yield
        finally:
            self._multiplier = 1.0
            for layer, scales in saved:
                layer.scaling.clear()
                layer.scaling.update(scales)

    # --- file layout --------------------------------------------------------------------------
    def _file_module(self, name: str):
        """One layer's adapter as the module written to files (library.lora.lycoris / weights)."""
        target, layer = self.layers[name]
        parts = {k: p.detach() for k, p in _peft_params(layer, self.kind).items()}
        if DORA_SUFFIX in parts:  # peft: (out,) or (1, out, 1, 1); files: (out, 1[, 1, 1])
            weight = layer.get_base_layer().weight
            parts[DORA_SUFFIX] = parts[DORA_SUFFIX].reshape(weight.shape[0], *[1] * (weight.ndim - 1))
        parts["alpha"] = torch.tensor(self.ranks[name][1])
        module = build_module(parts, name, "network")
        # peft scales by alpha / rank; where the file's scale differs (LoKr with both factors
        # whole: scale 1), the difference goes into the factor the weight change is linear in.
        ratio = layer.scaling[ADAPTER] / module.scale
        if ratio != 1.0:
            key = _linear_key(parts, self.kind)
            parts[key] = parts[key] * ratio
            module = build_module(parts, name, "network")
        return module

    def file_modules(self) -> dict:
        """Every layer's module in the file layout (tensors on the layers' device)."""
        return {name: self._file_module(name) for name in sorted(self.layers)}

    def kohya_state_dict(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The file's tensors: kohya's LoRA layout, LyCORIS's for DoRA/LoHa/LoKr."""
        out = {}
        for name, module in self.file_modules().items():
            for suffix, tensor in module.file_tensors().items():
                out[f"{name}.{suffix}"] = tensor.to(dtype or tensor.dtype).cpu().contiguous()
        return out

    def load_modules(self, modules: dict, source: str, allow_missing: bool = False) -> None:
        """Copy weights from read modules (library.lora.weights), keyed by our kohya names.

        Ranks and factor shapes must match what is being trained; a different alpha is absorbed
        into the factor the weight change is linear in, so the file's weight change is kept exactly.
        With `allow_missing` the layers the file has no weights for keep their fresh initialisation.
        """
        missing = sorted(set(self.layers) - set(modules))
        if missing and not allow_missing:
            raise UserError(f"{source}: has no weights for {len(missing)} of the {len(self.layers)} modules being "
                            f"trained (first: {missing[0]}); it was trained with other targets (conv_dim or text "
                            "encoder?)")
        kind, cls = self.spec.network_type, module_class(self.kind)
        with torch.no_grad():
            for name, (target, layer) in self.layers.items():
                if name not in modules:
                    continue
                mod = modules[name]
                if type(mod) is not cls:
                    raise UserError(f"{source}: {name} is a {mod.kind} module; network_type is {kind!r}; set "
                                    f"network_type = \"{mod.kind}\" to continue from this file")
                if isinstance(mod, DoraModule) and not mod.per_output(layer.get_base_layer().weight):
                    raise UserError(f"{source}: {name}: dora_scale is per input channel (LyCORIS wd_on_output="
                                    "False); peft's DoRA trains one magnitude per output channel")
                params = _peft_params(layer, self.kind)
                ours = self._file_module(name)
                if mod.rank != ours.rank:
                    raise UserError(f"{source}: {name}: rank {mod.rank or 'whole'} does not match the configured "
                                    f"rank {ours.rank or 'whole'}; set network_dim/conv_dim to the file's ranks")
                tensors = {k: v for k, v in mod.file_tensors().items() if k != "alpha"}
                if set(tensors) != set(params):
                    raise UserError(f"{source}: {name}: holds {', '.join(sorted(tensors))}, the network being "
                                    f"trained {', '.join(sorted(params))}; set network_dim/conv_dim (and lokr_factor) "
                                    "to the file's")
                ratio = mod.scale / layer.scaling[ADAPTER]
                linear = _linear_key(tensors, self.kind)
                for key, param in params.items():
                    value = tensors[key]
                    if value.numel() != param.numel() or (key != DORA_SUFFIX and value.shape != param.shape):
                        raise UserError(f"{source}: {name}: {key} has shape {tuple(value.shape)}, the network being "
                                        f"trained {tuple(param.shape)}; set network_dim/conv_dim (and lokr_factor) "
                                        "to the file's")
                    value = value.float() * ratio if key == linear else value
                    param.copy_(value.reshape(param.shape).to(param.dtype, copy=True))


def _dropout_hook(rank_p: float, module_p: float):
    """kohya's rank and module dropout on a LoRA layer's down projection (training passes only): the
    whole module is skipped with probability `module_p`; each rank is dropped per sample with
    probability `rank_p`, the others scaled by 1 / (1 - rank_p)."""
    def hook(module, inputs, out):
        if not (module.training and torch.is_grad_enabled()):
            return out
        if module_p and torch.rand((), device=out.device) < module_p:
            return out * 0.0
        if not rank_p:
            return out
        if isinstance(module, torch.nn.Conv2d):  # (batch, rank, h, w)
            shape = (out.shape[0], out.shape[1]) + (1,) * (out.ndim - 2)
        else:                                    # (batch, ..., rank)
            shape = (out.shape[0],) + (1,) * (out.ndim - 2) + (out.shape[-1],)
        keep = torch.rand(shape, device=out.device) >= rank_p
        return out * keep.to(out.dtype) / (1.0 - rank_p)
    return hook


def _linear_key(parts: dict, kind: NetworkKind) -> str:
    return next(k for k in kind.linear_in if k in parts)
