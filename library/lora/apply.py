"""Adding LoRA weight changes into model weights (merging) and finding them (extraction), for
models in the diffusers layout and in the original single-file layout."""
from __future__ import annotations

import torch

from library.lora.names import LoraTarget, as_family
from library.lora.weights import LoraWeights


def original_key(family, target: LoraTarget, unet_config) -> tuple[str, int | None]:
    """(key of the weight in an original-format checkpoint, q/k/v row block or None)."""
    return as_family(family).original_weight_key(target.component, target.path, unet_config)


def _add(weight: torch.Tensor, module, mult: float, block: int | None) -> torch.Tensor:
    """`weight` with `module` merged at `mult` (the q, k or v rows `block` of a stacked weight),
    in the weight's dtype. Modules merge against the base weight: DoRA's rescaling depends on it."""
    out = weight.float().clone()
    if block is None:
        out = module.apply(out, mult)
    else:
        d = out.shape[0] // 3
        out[block * d:(block + 1) * d] = module.apply(out[block * d:(block + 1) * d], mult)
    return out.to(weight.dtype)


def merge_into_original(state: dict[str, torch.Tensor], loras: list[tuple[LoraWeights, float]], unet_config,
                        progress=None) -> list[str]:
    """Add every LoRA (times its multiplier) into an original-layout state dict; returns missing keys."""
    missing = []
    for weights, mult in loras:
        for name, mod in weights.modules.items():
            target = weights.index.targets[name]
            key, block = original_key(weights.index.family, target, unet_config)
            if key not in state:
                missing.append(key)
                continue
            state[key] = _add(state[key], mod, mult, block)
            if progress:
                progress(1)
    return missing


def module_of(model: torch.nn.Module, path: str, modules: dict | None = None) -> torch.nn.Module | None:
    """The layer at `path` (text-encoder paths with or without "text_model."); pass `modules`
    (dict(model.named_modules())) when looking up many layers."""
    modules = dict(model.named_modules()) if modules is None else modules
    return modules.get(path) or modules.get(path.removeprefix("text_model."))


def merge_into_modules(components: dict[str, torch.nn.Module], loras: list[tuple[LoraWeights, float]],
                       progress=None) -> list[str]:
    """Add every LoRA into loaded diffusers/transformers modules ({"unet": ..., "te1": ...}) in place."""
    missing = []
    with torch.no_grad():
        for weights, mult in loras:
            for name, mod in weights.modules.items():
                target = weights.index.targets[name]
                model = components.get(target.component)
                layer = module_of(model, target.path) if model is not None else None
                if layer is None:
                    missing.append(name)
                    continue
                layer.weight.copy_(_add(layer.weight, mod, mult, None))
                if progress:
                    progress(1)
    return missing


class MergedLoras:
    """LoRAs merged into loaded modules in place, optionally switchable off and on again (to
    compare with the base model).

    Merging, not injecting layers: any file the reader understands works, whatever its ranks or
    alphas per module, and generation runs at the base model's speed. Each changed weight is
    merged once, in fp32 (the loaded models' dtype). Only with `switchable` is a copy of the
    other version kept, one per changed weight, on the CPU in `store_dtype` (the dtype the model
    will run in: the copy is then exactly what the model would hold); a switch swaps that copy
    with the model's weight, so the images of either version are the same however often it is
    switched. Without it nothing is kept besides the model."""

    def __init__(self, components: dict[str, torch.nn.Module], loras: list[tuple[LoraWeights, float]], progress=None,
                 switchable: bool = False, store_dtype: torch.dtype | None = None):
        lookup = {name: dict(model.named_modules()) for name, model in components.items()}
        self.layers: dict[tuple[str, str], torch.nn.Module] = {}
        self.missing: list[str] = []
        self.other: dict[tuple[str, str], torch.Tensor] = {}  # the version not in the model (switchable)
        with torch.no_grad():
            for weights, mult in loras:
                for name, mod in weights.modules.items():
                    target = weights.index.targets[name]
                    model = components.get(target.component)
                    layer = module_of(model, target.path, lookup[target.component]) if model is not None else None
                    if layer is None:
                        self.missing.append(name)
                        continue
                    key = (target.component, target.path)
                    if switchable and key not in self.layers:
                        self.other[key] = layer.weight.detach().to("cpu", store_dtype or layer.weight.dtype,
                                                                   copy=True)
                    self.layers[key] = layer
                    layer.weight.copy_(_add(layer.weight, mod, mult, None))
                    if progress:
                        progress(1)
        self.switchable = switchable
        self.enabled = True

    def held_bytes(self) -> int:
        """Bytes this object keeps besides the model."""
        return sum(t.numel() * t.element_size() for t in self.other.values())

    def set_enabled(self, enabled: bool) -> None:
        if enabled == self.enabled:
            return
        if not self.switchable:
            raise RuntimeError("these LoRAs were merged without switchable = True")
        with torch.no_grad():
            for key, layer in self.layers.items():
                current = layer.weight.detach().to("cpu", self.other[key].dtype, copy=True)
                layer.weight.copy_(self.other[key])
                self.other[key] = current
        self.enabled = enabled
