"""The registered model families: lookup by name and automatic detection.

Importing this module registers the built-in families (library.models.stable_diffusion); a new
family registers itself with library.models.family.register_family and is found here like them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import library.models.stable_diffusion  # noqa: F401  registers SDXL, SD2.x and SD1.x
from library.errors import UserError
from library.models.family import CheckpointFacts, ModelFamily, registered


def families() -> list[ModelFamily]:
    """Every registered family in detection order."""
    found = list(registered().values())
    return [f for f in found if not f.catch_all] + [f for f in found if f.catch_all]


def get_family(name: str, where: str = "model_arch") -> ModelFamily:
    known = registered()
    if name not in known:
        raise UserError(f"{where}: {name!r} is not a model family; valid: auto, {', '.join(known)}")
    return known[name]


def detect_folder_family(folder: Path, model_index: dict, unet_config: dict) -> ModelFamily:
    for family in families():
        if family.auto_detect and family.claims_folder(model_index, unet_config):
            return family
    raise UserError(f"{folder}: no known model family matches its configs; set model_arch "
                    f"({', '.join(f.name for f in families())})")


def detect_checkpoint_family(shapes: Mapping[str, list[int]], source: str) -> CheckpointFacts:
    for family in families():
        if family.auto_detect and family.claims_checkpoint(shapes):
            return family.checkpoint_facts(shapes, source)
    names = ", ".join(f.label for f in families() if f.auto_detect)
    raise UserError(f"{source}: not a checkpoint of a known model family ({names}) in the original single-file "
                    "layout")


def detect_architecture(shapes: Mapping[str, list[int]], source: str) -> CheckpointFacts:
    """The family of an original-format checkpoint, from its key names and shapes (header only)."""
    return detect_checkpoint_family(shapes, source)


def to_original_state_dict(arch: str, unet, vae, text_encoders: list) -> dict:
    """The whole pipeline of family `arch` as one original-format state dict (what A1111/ComfyUI load)."""
    return get_family(arch).original_state_dict(unet, vae, text_encoders)
