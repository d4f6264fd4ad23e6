"""Random-weight SD1.5 / SDXL pipelines built from the shipped config trees: tiny ones for tests,
full-size ones for the GPU check (bench/gpu_check.py).

The tiny trees have the same block structure as the real architectures (so LoRA name tables,
single-file conversion and SDXL conditioning are exercised for real) at widths that make a
training step take milliseconds.
"""
from __future__ import annotations

from pathlib import Path

from library.models import shipped

TINY_TREES = {"sd15": "tiny_sd15", "sdxl": "tiny_sdxl"}


def build_tiny_pipeline(arch: str, seed: int = 0):
    """A diffusers pipeline with random weights, deterministic for a given seed."""
    return build_random_pipeline(TINY_TREES[arch], arch, seed)


def build_random_pipeline(tree: str, arch: str, seed: int = 0, device: str = "cpu"):
    """A pipeline of a shipped config tree (tiny or full-size) with random weights, built on
    `device` (a full-size SDXL initialises in seconds on a GPU, minutes on a CPU)."""
    import torch
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        PNDMScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    root = shipped.tree(tree)
    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet2DConditionModel.from_config(shipped.read_json(root / "unet" / "config.json"))
        vae = AutoencoderKL.from_config(shipped.read_json(root / "vae" / "config.json"))
        te1 = CLIPTextModel(CLIPTextConfig.from_pretrained(str(root / "text_encoder")))
        te2 = None
        if arch != "sd15":
            te2 = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(str(root / "text_encoder_2")))
    tok1 = shipped.load_tokenizer(root / "tokenizer")
    if arch == "sd15":
        scheduler = PNDMScheduler.from_config(shipped.read_json(root / "scheduler" / "scheduler_config.json"))
        return StableDiffusionPipeline(
            vae=vae, text_encoder=te1, tokenizer=tok1, unet=unet, scheduler=scheduler,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
    tok2 = shipped.load_tokenizer(root / "tokenizer_2")
    scheduler = EulerDiscreteScheduler.from_config(shipped.read_json(root / "scheduler" / "scheduler_config.json"))
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tok1, tokenizer_2=tok2, unet=unet, scheduler=scheduler,
    )


def save_diffusers(pipe, out: Path) -> None:
    """Write a complete diffusers folder (safetensors weights, tokenizer vocabularies included)."""
    pipe.save_pretrained(str(out), safe_serialization=True)
    for sub in ("tokenizer", "tokenizer_2"):
        if (out / sub).is_dir():
            shipped.copy_tokenizer_files(out / sub)
