"""Every name a LoRA module goes by, for one model architecture.

One target (component + module path) is written `lora_unet_input_blocks_4_1_..._to_q` in our kohya
files (SGM paths for SDXL), `lora_unet_down_blocks_1_attentions_0_..._to_q` by trainers that use
diffusers paths for SDXL, and `unet.down_blocks.1.attentions.0....to_q` in PEFT/diffusers files.
The index maps all of them to the same target, built from the name tables (never from a module
tree), so files from any of these sources can be read, converted and merged.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from library.lora.names import LoraTarget, as_family, text_encoder_targets, unet_targets
from library.models import shipped
from library.models.family import ModelFamily

# PEFT/diffusers component prefixes, by our component names.
PEFT_PREFIX = {"unet": "unet", "te1": "text_encoder", "te2": "text_encoder_2"}


@dataclass
class NameIndex:
    family: ModelFamily
    targets: dict[str, LoraTarget]            # our kohya name -> target
    aliases: dict[str, str]                   # any accepted kohya-style name -> our kohya name
    by_path: dict[tuple[str, str], str]       # (component, module path) -> our kohya name

    @property
    def arch(self) -> str:
        return self.family.name

    @classmethod
    def build(cls, family: ModelFamily | str, unet_config: Mapping, te_layers: list[int]) -> "NameIndex":
        family = as_family(family)
        targets = unet_targets(unet_config, family, include_conv=True) + text_encoder_targets(family, te_layers)
        index = cls(family, {}, {}, {})
        for t in targets:
            index.targets[t.name] = t
            index.aliases[t.name] = t.name
            index.by_path[(t.component, t.path)] = t.name
            if t.component == "unet":
                for other in family.lora_alias_paths(t.path, unet_config):
                    index.aliases["lora_unet_" + other.replace(".", "_")] = t.name
        return index

    @classmethod
    def for_tree(cls, family: ModelFamily | str, tree: Path) -> "NameIndex":
        family = as_family(family)
        unet = shipped.read_json(tree / "unet" / "config.json")
        layers = [shipped.read_json(tree / f / "config.json")["num_hidden_layers"] for f in family.text_encoder_folders]
        return cls.build(family, unet, layers)

    @classmethod
    def for_model(cls, bundle) -> "NameIndex":
        return cls.build(bundle.family, bundle.unet.config, [te.config.num_hidden_layers for te in bundle.text_encoders])

    def resolve(self, name: str) -> str | None:
        return self.aliases.get(name)

    def peft_key(self, name: str) -> str:
        t = self.targets[name]
        return f"{PEFT_PREFIX[t.component]}.{t.path}"

    def from_peft_key(self, module: str) -> str | None:
        """`unet.down_blocks...to_q` (with or without text_model.) -> our kohya name."""
        head, _, path = module.partition(".")
        component = {v: k for k, v in PEFT_PREFIX.items()}.get(head)
        if component is None:
            return None
        if component != "unet" and not path.startswith("text_model."):
            path = "text_model." + path
        return self.by_path.get((component, path))


def shipped_index(arch: str | None = None, cross_dim: int | None = None, te_width: int | None = None) -> NameIndex:
    """The index of the shipped architecture (full-size or tiny) that matches what a file shows:
    its architecture, the width of its cross-attention keys, or the width of its text encoder."""
    candidates = []
    for name, family in shipped.SHIPPED_TREES.items():
        if arch is not None and family != arch:
            continue
        tree = shipped.tree(name)
        unet = shipped.read_json(tree / "unet" / "config.json")
        te = shipped.read_json(tree / "text_encoder" / "config.json")
        if cross_dim is not None and unet["cross_attention_dim"] != cross_dim:
            continue
        if te_width is not None and te["hidden_size"] != te_width:
            continue
        candidates.append((family, tree))
    if not candidates:
        return None
    family, tree = candidates[0]
    return NameIndex.for_tree(family, tree)
