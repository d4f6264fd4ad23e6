"""Random-weight SD1.5 / SDXL pipelines built from the shipped config trees: tiny ones for tests,
full-size ones for the GPU check (bench/gpu_check.py).

The tiny trees have the same block structure as the real architectures (so LoRA name tables,
single-file conversion and SDXL conditioning are exercised for real) at widths that make a
training step take milliseconds.
"""
from __future__ import annotations

from pathlib import Path

from library.models import shipped

TINY_TREES = {"sd1": "tiny_sd15", "sdxl": "tiny_sdxl"}  # family -> shipped tree


def build_tiny_pipeline(arch: str, seed: int = 0):
    """A diffusers pipeline of family `arch` ("sd1" or "sdxl") with random weights, deterministic
    for a given seed."""
    return build_random_pipeline(TINY_TREES[arch], seed)


def build_random_pipeline(tree: str, seed: int = 0, device: str = "cpu"):
    """A pipeline of a shipped config tree (tiny or full-size) with random weights, built on
    `device` (a full-size SDXL initialises in seconds on a GPU, minutes on a CPU)."""
    import diffusers
    import torch
    import transformers
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig

    from library.models.families import get_family
    from library.models.family import Components

    family = get_family(shipped.SHIPPED_TREES[tree])
    root = shipped.tree(tree)
    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet2DConditionModel.from_config(shipped.read_json(root / "unet" / "config.json"))
        vae = AutoencoderKL.from_config(shipped.read_json(root / "vae" / "config.json"))
        encoders = [getattr(transformers, cls)(CLIPTextConfig.from_pretrained(str(root / sub)))
                    for cls, sub in zip(family.text_encoder_classes, family.text_encoder_folders)]
    tokenizers = [shipped.load_tokenizer(root / sub) for sub in family.tokenizer_folders]
    scheduler_config = shipped.read_json(root / "scheduler" / "scheduler_config.json")
    scheduler = getattr(diffusers, scheduler_config["_class_name"]).from_config(scheduler_config)
    pipe = family.pipeline(Components(unet, vae, encoders, tokenizers, scheduler_config), unet, scheduler)
    return pipe


def save_diffusers(pipe, out: Path) -> None:
    """Write a complete diffusers folder (safetensors weights, tokenizer vocabularies included)."""
    pipe.save_pretrained(str(out), safe_serialization=True)
    for sub in ("tokenizer", "tokenizer_2"):
        if (out / sub).is_dir():
            shipped.copy_tokenizer_files(out / sub)
