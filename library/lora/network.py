"""peft LoRA layers on the UNet (and optionally the text encoders), addressed by the name tables.

peft provides the layers (Linear and Conv2d LoRA, alpha/rank scaling, dropout, enable/disable);
this module decides where they go, keeps the mapping to kohya names, and moves weights in and out
in kohya's layout (`lora_down` = peft `lora_A`, `lora_up` = peft `lora_B`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterator

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import cast_adapter_dtype

from library.errors import UserError
from library.lora.index import NameIndex
from library.lora.names import LoraTarget, text_encoder_targets, unet_targets

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

    def rank_alpha(self, target: LoraTarget) -> tuple[int, float]:
        if target.conv3x3:
            return self.conv_dim, self.conv_alpha
        return self.dim, self.alpha


def _find_module(model: torch.nn.Module, path: str) -> tuple[str, torch.nn.Module] | None:
    modules = dict(model.named_modules())
    for candidate in (path, path.removeprefix("text_model.")):
        if candidate in modules:
            return candidate, modules[candidate]
    return None


class LoraNetwork:
    """The LoRA layers injected into a loaded model bundle."""

    def __init__(self, unet: torch.nn.Module, text_encoders: list[torch.nn.Module], arch: str, spec: NetworkSpec):
        self.spec = spec
        self.arch = arch
        self.components: dict[str, torch.nn.Module] = {}
        self.layers: dict[str, tuple[LoraTarget, LoraLayer]] = {}
        self.index = NameIndex.build(arch, unet.config, [te.config.num_hidden_layers for te in text_encoders])
        if spec.train_unet:
            self._inject("unet", unet, unet_targets(unet.config, arch, spec.conv_dim is not None))
        if spec.train_text_encoders:
            counts = [te.config.num_hidden_layers for te in text_encoders]
            targets = text_encoder_targets(arch, counts)
            for index, te in enumerate(text_encoders):
                comp = f"te{index + 1}"
                self._inject(comp, te, [t for t in targets if t.component == comp])

    def _inject(self, component: str, model: torch.nn.Module, targets: list[LoraTarget]) -> None:
        resolved: dict[str, LoraTarget] = {}
        for target in targets:
            found = _find_module(model, target.path)
            if found is None or not isinstance(found[1], (torch.nn.Linear, torch.nn.Conv2d)):
                raise UserError(f"{component}: module {target.path} ({target.name}) is missing or not Linear/Conv2d; "
                                "the model does not have the expected architecture")
            resolved[found[0]] = target
        rank_pattern, alpha_pattern = {}, {}
        for path, target in resolved.items():
            rank, alpha = self.spec.rank_alpha(target)
            if (rank, alpha) != (self.spec.dim, self.spec.alpha):
                rank_pattern[re.escape(path)] = rank
                alpha_pattern[re.escape(path)] = alpha
        config = LoraConfig(r=self.spec.dim, lora_alpha=self.spec.alpha, lora_dropout=self.spec.dropout,
                            target_modules=sorted(resolved), rank_pattern=rank_pattern, alpha_pattern=alpha_pattern,
                            init_lora_weights=True, bias="none")
        inject_adapter_in_model(config, model, adapter_name=ADAPTER)
        # LoRA weights train in fp32 even when the frozen base weights are fp16/bf16.
        cast_adapter_dtype(model, ADAPTER, autocast_adapter_dtype=True)
        modules = dict(model.named_modules())
        for path, target in resolved.items():
            layer = modules[path]
            assert isinstance(layer, LoraLayer), path
            self.layers[target.name] = (target, layer)
        self.components[component] = model

    # --- parameters ---------------------------------------------------------------------------
    def parameters(self, component: str | None = None) -> Iterator[torch.nn.Parameter]:
        for target, layer in self.layers.values():
            if component is None or target.component == component:
                yield layer.lora_A[ADAPTER].weight
                yield layer.lora_B[ADAPTER].weight

    def trainable_components(self) -> list[str]:
        return list(self.components)

    # --- enable / disable (the APT reference pass runs the same model with LoRA off) ---------
    def set_enabled(self, enabled: bool) -> None:
        for _, layer in self.layers.values():  # every injected layer, without walking the models
            layer.enable_adapters(enabled)

    # --- kohya layout -------------------------------------------------------------------------
    def kohya_state_dict(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        out = {}
        for name, (target, layer) in sorted(self.layers.items()):
            rank, alpha = self.spec.rank_alpha(target)
            down = layer.lora_A[ADAPTER].weight.detach()
            up = layer.lora_B[ADAPTER].weight.detach()
            out[f"{name}.lora_down.weight"] = down.to(dtype or down.dtype).cpu().contiguous()
            out[f"{name}.lora_up.weight"] = up.to(dtype or up.dtype).cpu().contiguous()
            out[f"{name}.alpha"] = torch.tensor(float(alpha), dtype=dtype or torch.float32)
        return out

    def load_modules(self, modules: dict, source: str, allow_missing: bool = False) -> None:
        """Copy weights from read LoRA modules (library.lora.weights), keyed by our kohya names.

        Ranks must match what is being trained; a different alpha is absorbed into lora_up so the
        file's effective weight change is kept exactly. With `allow_missing` the layers the file has
        no weights for keep their fresh initialisation.
        """
        missing = sorted(set(self.layers) - set(modules))
        if missing and not allow_missing:
            raise UserError(f"{source}: has no weights for {len(missing)} of the {len(self.layers)} modules being "
                            f"trained (first: {missing[0]}); it was trained with other targets (conv_dim or text "
                            "encoder?)")
        with torch.no_grad():
            for name, (target, layer) in self.layers.items():
                if name not in modules:
                    continue
                mod = modules[name]
                a, b = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
                if mod.down.shape != a.shape or mod.up.shape != b.shape:
                    raise UserError(f"{source}: {name}: rank {mod.down.shape[0]} does not match the configured rank "
                                    f"{a.shape[0]}; set network_dim/conv_dim to the file's ranks")
                _, alpha = self.spec.rank_alpha(target)
                a.copy_(mod.down.to(a.dtype))
                b.copy_((mod.up.float() * (mod.alpha / alpha)).to(b.dtype))
