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
from dataclasses import dataclass
from typing import Iterator

import peft
import torch
from peft import inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer, cast_adapter_dtype

from library.config.network_kinds import NetworkKind, network_kind
from library.errors import UserError
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

    @classmethod
    def from_options(cls, net, train_text_encoders: bool) -> "NetworkSpec":
        """From the [network] options (library.config.options.NetworkOptions)."""
        return cls(dim=net.network_dim, alpha=net.alpha, conv_dim=net.conv_dim, conv_alpha=net.conv_alpha_value,
                   dropout=net.network_dropout, train_unet=True, train_text_encoders=train_text_encoders,
                   network_type=net.network_type, lokr_factor=net.lokr_factor)

    def rank_alpha(self, target: LoraTarget) -> tuple[int, float]:
        if target.conv3x3:
            return self.conv_dim, self.conv_alpha
        return self.dim, self.alpha


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
        self.index = NameIndex.build(self.family, unet.config, [te.config.num_hidden_layers for te in text_encoders])
        if spec.train_unet:
            self._inject("unet", unet, unet_targets(unet.config, self.family, spec.conv_dim is not None))
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
            if self.kind.check_layer is not None:
                self.kind.check_layer(self.spec, target.name, _sizes(found[1]))
            resolved[found[0]] = target
        rank_pattern, alpha_pattern = {}, {}
        for path, target in resolved.items():
            rank, alpha = self.spec.rank_alpha(target)
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
        self.components[component] = model

    # --- parameters ---------------------------------------------------------------------------
    def parameters(self, component: str | None = None) -> Iterator[torch.nn.Parameter]:
        for target, layer in self.layers.values():
            if component is None or target.component == component:
                yield from _peft_params(layer, self.kind).values()

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

    # --- file layout --------------------------------------------------------------------------
    def _file_module(self, name: str):
        """One layer's adapter as the module written to files (library.lora.lycoris / weights)."""
        target, layer = self.layers[name]
        parts = {k: p.detach() for k, p in _peft_params(layer, self.kind).items()}
        if DORA_SUFFIX in parts:  # peft: (out,) or (1, out, 1, 1); files: (out, 1[, 1, 1])
            weight = layer.get_base_layer().weight
            parts[DORA_SUFFIX] = parts[DORA_SUFFIX].reshape(weight.shape[0], *[1] * (weight.ndim - 1))
        parts["alpha"] = torch.tensor(float(self.spec.rank_alpha(target)[1]))
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


def _linear_key(parts: dict, kind: NetworkKind) -> str:
    return next(k for k in kind.linear_in if k in parts)
