"""Which modules get a LoRA, and their names in kohya's file layout.

The tables are computed by the model family (library.models.family) from the model *configs*
(block structure, layer counts) with fixed rules, never read from the installed library's module
tree: transformers 5 renamed CLIPTextModel's modules, and a table taken from `named_modules()`
would silently change the file's keys. Golden tests pin the full-size tables (SD1.5 264 / 350
with conv, SDXL 986 / 1,052).

Names are prefix + module path with "." -> "_": `lora_unet_` + the path the family writes (SD1.x/
SD2.x: diffusers paths; SDXL: the original SGM paths), and the family's text-encoder prefix + the
encoder's module path, which always includes `text_model.`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from library.models.families import get_family
from library.models.family import ModelFamily


@dataclass(frozen=True)
class LoraTarget:
    component: str  # "unet", "te1" or "te2"
    path: str       # module path (text encoders: with "text_model.")
    name: str       # kohya module name, e.g. lora_unet_..._to_q
    conv_set: bool  # part of the conv (LoCon) set: ResNet/down/upsampler layers
    conv3x3: bool   # a spatial convolution: uses conv_dim / conv_alpha


def as_family(family: ModelFamily | str) -> ModelFamily:
    """A family, or the family of that name."""
    return get_family(family) if isinstance(family, str) else family


def unet_targets(config: Mapping, family: ModelFamily | str, include_conv: bool) -> list[LoraTarget]:
    family = as_family(family)
    targets = []
    for path, conv_set, conv3x3 in family.lora_module_paths(config, include_conv):
        name = "lora_unet_" + family.lora_unet_path(path, config).replace(".", "_")
        targets.append(LoraTarget("unet", path, name, conv_set, conv3x3))
    return targets


def text_encoder_targets(family: ModelFamily | str, layer_counts: list[int]) -> list[LoraTarget]:
    """Targets of each text encoder; `layer_counts` = num_hidden_layers of each encoder."""
    family = as_family(family)
    targets = []
    for index, (prefix, layers) in enumerate(zip(family.lora_te_prefixes, layer_counts)):
        for path in family.lora_text_encoder_paths(layers):
            targets.append(LoraTarget(f"te{index + 1}", path, f"{prefix}_{path.replace('.', '_')}", False, False))
    return targets
