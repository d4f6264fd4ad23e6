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
    """LoRAs merged into loaded modules, switchable off and on again (to compare with the base model).

    Merging, not injecting layers: any file the reader understands works, whatever its ranks or
    alphas per module, and generation runs at the base model's speed. Both versions of every
    changed weight are computed once (in fp32, kept on the CPU); switching only copies them back,
    so the LoRA's images are the same however often it is switched."""

    def __init__(self, components: dict[str, torch.nn.Module], loras: list[tuple[LoraWeights, float]], progress=None):
        lookup = {name: dict(model.named_modules()) for name, model in components.items()}
        self.layers: dict[tuple[str, str], torch.nn.Module] = {}
        self.missing: list[str] = []
        merged: dict[tuple[str, str], torch.Tensor] = {}
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
                    self.layers[key] = layer
                    base = merged.get(key, layer.weight.detach().float().cpu())
                    merged[key] = _add(base, mod, mult, None)
                    if progress:
                        progress(1)
        self.weights = {False: {k: layer.weight.detach().float().cpu().clone() for k, layer in self.layers.items()},
                        True: merged}
        self.enabled = False
        self.set_enabled(True)

    def set_enabled(self, enabled: bool) -> None:
        if enabled == self.enabled:
            return
        with torch.no_grad():
            for key, layer in self.layers.items():
                layer.weight.copy_(self.weights[enabled][key])
        self.enabled = enabled
