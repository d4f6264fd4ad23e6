#!/usr/bin/env python
"""Expected GPU memory of a training step, plain LoRA and APT, counted in bytes on the CPU.

    python bench/memory_estimate.py                 # the table for docs/training.md
    python bench/memory_estimate.py --json out.json

Each row builds the full-size UNet on PyTorch's meta device (no storage, no arithmetic), injects
the network (rank 16, alpha 8, kohya's default targets) and, for APT, the recording processors
with the default [apt] settings, and counts with saved-tensor hooks what one forward at the real
resolution keeps for backward (library.train.memory_estimate), with attention counted as the GPU's
flash / memory-efficient SDPA kernels keep it (not the math path's full attention matrix that the
meta and CPU dispatch would take). The APT rows run the reference
pass first, as training does, and add both passes' recordings. Batch size 1, bf16 weights and
autocast. The same count is checked against a second resolution (saved bytes grow with the
number of latent positions; attention maps over the text tokens, too) and, in the tests,
against a real CPU forward of the tiny models.

The figure is allocated memory at the step's peak without the CUDA context, the allocator's
reserve, library workspaces and single kernels' temporaries: on a GPU add roughly 1-1.5 GiB for
reserved memory (bench/gpu_check.py measures it).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def count(tree_name: str, resolution: int, apt: bool, checkpointing: bool, rank: int = 16):
    import torch

    from library.apt.controller import AptController
    from library.config.options import AptOptions
    from library.lora.network import LoraNetwork, NetworkSpec
    from library.models import shipped
    from library.models.families import get_family
    from library.train import memory_estimate as me

    family = get_family(shipped.SHIPPED_TREES[tree_name])
    unet_config = shipped.read_json(shipped.tree(tree_name) / "unet" / "config.json")
    unet = me.meta_denoiser(unet_config)
    base = sum(p.numel() * p.element_size() for p in unet.parameters())
    network = LoraNetwork(unet, [], family, NetworkSpec(dim=rank, alpha=rank / 2))
    params = list(network.parameters())
    for p in params:  # under autocast the adapters compute in bf16: count them so
        p.data = p.data.to(torch.bfloat16)
    recorder = None
    if apt:
        controller = AptController(AptOptions(), family.attention_layers(unet), 1000)
        family.set_attention_processors(unet, {**family.attention_processors(unet), **controller.processors})
        recorder = controller.recorder
    else:
        family.use_attention_backend(unet, "sdpa", torch.device("meta"))
    latent = resolution // 8
    inputs = me.step_inputs(unet, 1, (latent, latent), torch.bfloat16)
    with me.flash_like_attention():
        full = me.activations(family, unet, inputs, False, recorder, network.set_enabled)
        kept = me.activations(family, unet, inputs, True, recorder, network.set_enabled) if checkpointing else None
    if checkpointing:
        saved = kept["saved"] + full["largest_block"]
        recorded = kept["recorded"]
    else:
        saved, recorded = full["saved"], full["recorded"]
    return base, params, saved, recorded


def text_encoder_bytes(tree_name: str) -> int:
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    from library.models import shipped

    total = 0
    for sub in ("text_encoder", "text_encoder_2"):
        path = shipped.tree(tree_name) / sub / "config.json"
        if path.is_file():
            with torch.device("meta"):
                model = CLIPTextModel(CLIPTextConfig.from_json_file(str(path)))
            total += sum(p.numel() for p in model.parameters()) * 2  # bf16
    return total


def estimate(tree_name: str, resolution: int, apt: bool, checkpointing: bool, optimizer: str,
             text_on_device: bool) -> dict:
    from library.train import memory_estimate as me

    base, params, saved, recorded = count(tree_name, resolution, apt, checkpointing)
    parts = {"unet": base, **me.trained_bytes(params, optimizer), "activations": saved, "apt_recordings": recorded,
             "text_encoders": text_encoder_bytes(tree_name) if text_on_device else 0}
    memory = me.StepMemory(parts)
    return {"model": tree_name, "resolution": resolution, "method": "apt" if apt else "plain",
            "checkpointing": checkpointing, "optimizer": optimizer, "text_encoders_on_device": text_on_device,
            "gib": {k: round(v, 3) for k, v in memory.gib().items()}}


# The ladder: one row per (model, card), plain and APT each. Latents are always cached here.
LADDER = [
    ("sd15", 512, "8 GB", True, "AdamW8bit", False),
    ("sd15", 512, "12 GB", False, "AdamW", True),
    ("sdxl", 1024, "8 GB", True, "AdamW8bit", False),
    ("sdxl", 1024, "12 GB", True, "AdamW", False),
    ("sdxl", 1024, "24 GB", True, "AdamW", True),
    ("sdxl", 1024, "24 GB, no checkpointing", False, "AdamW", True),
]


def scaling_check(tree_name: str, small: int, large: int) -> float:
    """Saved bytes at `large` over those at `small`, against the ratio of latent positions."""
    _, _, a, _ = count(tree_name, small, True, False)
    _, _, b, _ = count(tree_name, large, True, False)
    return (b / a) / ((large / small) ** 2)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path, help="also write the rows as JSON")
    ap.add_argument("--no_check", action="store_true", help="skip the second-resolution check")
    args = ap.parse_args(argv)

    from library.utils.runtime import offline_and_quiet

    offline_and_quiet()
    rows = []
    print("| model | px | card | checkpointing | optimizer | text encoders | plain GiB | APT GiB | APT - plain |")
    print("|---|---|---|---|---|---|---|---|---|")
    for tree_name, px, card, ckpt, optimizer, text in LADDER:
        plain = estimate(tree_name, px, False, ckpt, optimizer, text)
        apt = estimate(tree_name, px, True, ckpt, optimizer, text)
        rows += [dict(plain, card=card), dict(apt, card=card)]
        p, a = plain["gib"]["total"], apt["gib"]["total"]
        print(f"| {tree_name} | {px} | {card} | {'on' if ckpt else 'off'} | {optimizer} | "
              f"{'on the GPU' if text else 'cached'} | {p:.2f} | {a:.2f} | {a - p:+.2f} |", flush=True)
    if not args.no_check:
        for tree_name, small, large in (("sd15", 256, 512), ("sdxl", 512, 1024)):
            ratio = scaling_check(tree_name, small, large)
            print(f"- check {tree_name}: saved bytes {small} -> {large} px grow {ratio:.3f}x the latent positions")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
