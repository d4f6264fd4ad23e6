#!/usr/bin/env python
"""Expected GPU memory of a training step, plain LoRA and APT, counted in bytes on the CPU.

    python bench/memory_estimate.py                 # the table for docs/training.md
    python bench/memory_estimate.py --json out.json

The rows are the shipped presets (LADDER), read by the trainer's config reader: rank, alpha,
batch size, optimizer, gradient checkpointing, fp8_base and the text-encoder cache come from the
file. Each row builds the full-size UNet on PyTorch's meta device (no storage, no arithmetic),
stores it in float8 where the preset says fp8_base, injects the network (kohya's default targets)
and, for APT, the recording processors with the default [apt] settings, and counts with saved-tensor hooks what one forward at the real
resolution keeps for backward (library.train.memory_estimate), with attention counted as the GPU's
flash / memory-efficient SDPA kernels keep it (not the math path's full attention matrix that the
meta and CPU dispatch would take). The APT rows run the reference
pass first, as training does, and add both passes' recordings. bf16 weights and autocast. The same count is checked against a second resolution (saved bytes grow with the
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


def count(tree_name: str, resolution: int, apt: bool, checkpointing: bool, rank: int = 16, alpha: float | None = None,
          fp8: bool = False, batch: int = 1):
    import torch

    from library.apt.controller import AptController
    from library.config.options import AptOptions
    from library.lora.network import LoraNetwork, NetworkSpec
    from library.models import shipped
    from library.models.families import get_family
    from library.models.fp8 import store_in_fp8
    from library.train import memory_estimate as me

    family = get_family(shipped.SHIPPED_TREES[tree_name])
    unet_config = shipped.read_json(shipped.tree(tree_name) / "unet" / "config.json")
    unet = me.meta_denoiser(unet_config)
    if fp8:  # as training stores it (fp8_base): the frozen Linear/Conv weights in one byte
        store_in_fp8(unet)
    base = sum(p.numel() * p.element_size() for p in [*unet.parameters(), *unet.buffers()])
    network = LoraNetwork(unet, [], family, NetworkSpec(dim=rank, alpha=rank / 2 if alpha is None else alpha))
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
    inputs = me.step_inputs(unet, batch, (latent, latent), torch.bfloat16)
    with me.flash_like_attention():
        full = me.activations(family, unet, inputs, False, recorder, network.set_enabled)
        kept = me.activations(family, unet, inputs, True, recorder, network.set_enabled) if checkpointing else None
    if checkpointing:
        saved = kept["saved"] + full["largest_block"]
        recorded = kept["recorded"]
    else:
        saved, recorded = full["saved"], full["recorded"]
    return base, params, saved, recorded


def text_encoder_bytes(tree_name: str, fp8: bool = False) -> int:
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    from library.models import shipped
    from library.models.fp8 import store_in_fp8

    total = 0
    for sub in ("text_encoder", "text_encoder_2"):
        path = shipped.tree(tree_name) / sub / "config.json"
        if path.is_file():
            with torch.device("meta"):
                model = CLIPTextModel(CLIPTextConfig.from_json_file(str(path)))
            model.to(torch.bfloat16).requires_grad_(False)
            if fp8:
                store_in_fp8(model)
            total += sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    return total


def estimate(tree_name: str, resolution: int, apt: bool, checkpointing: bool, optimizer: str,
             text_on_device: bool, rank: int = 16, alpha: float | None = None, fp8_unet: bool = False,
             fp8_text: bool = False, batch: int = 1) -> dict:
    from library.train import memory_estimate as me

    base, params, saved, recorded = count(tree_name, resolution, apt, checkpointing, rank, alpha, fp8_unet, batch)
    parts = {"unet": base, **me.trained_bytes(params, optimizer), "activations": saved, "apt_recordings": recorded,
             "text_encoders": text_encoder_bytes(tree_name, fp8_text) if text_on_device else 0}
    memory = me.StepMemory(parts)
    return {"model": tree_name, "resolution": resolution, "method": "apt" if apt else "plain",
            "checkpointing": checkpointing, "optimizer": optimizer, "text_encoders_on_device": text_on_device,
            "rank": rank, "fp8_unet": fp8_unet, "batch": batch,
            "gib": {k: round(v, 3) for k, v in memory.gib().items()}}


PRESETS = Path(__file__).resolve().parents[1] / "presets"
# The ladder: the shipped presets, each for the card its header names, read by the trainer's own
# config reader (so the rows follow the files), at the family's native resolution.
LADDER = [
    ("sd15.toml", "sd15", 512, "8 GB", []),
    ("sdxl_8gb.toml", "sdxl", 1024, "8 GB", []),
    ("sdxl_lowvram.toml", "sdxl", 1024, "12 GB", []),
    ("sdxl.toml", "sdxl", 1024, "24 GB", []),
    ("sdxl.toml", "sdxl", 1024, "24 GB", [("gradient_checkpointing", "false")]),
]
# What a GPU adds to allocated memory: the CUDA context and the caching allocator's reserve
# (bench/gpu_check.py measures both); a card "fits" a row when estimate + this is below its size.
GPU_OVERHEAD_GIB = 1.5
CARD_GIB = {"8 GB": 8 * 10 ** 9 / 2 ** 30, "12 GB": 12 * 10 ** 9 / 2 ** 30, "24 GB": 24 * 10 ** 9 / 2 ** 30}


def preset_settings(preset: str, tree_name: str, overrides: list[tuple[str, str]]) -> dict:
    """What the estimate needs from a preset, through the trainer's config reader."""
    from library.config import build_config
    from library.models import shipped

    cfg = build_config(str(PRESETS / preset), [("pretrained_model_name_or_path", str(shipped.tree(tree_name))),
                                               *overrides], need_dataset=False)
    t, net, data = cfg.training, cfg.network, cfg.data
    return {"checkpointing": t.gradient_checkpointing, "optimizer": cfg.optimizer.optimizer_type,
            "text_on_device": not data.cache_text_encoder_outputs, "rank": net.network_dim,
            "alpha": net.network_alpha, "fp8_unet": t.fp8_unet, "fp8_text": t.fp8_text_encoders,
            "batch": t.train_batch_size}



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
    print("| preset | px | card | rank | UNet | checkpointing | optimizer | text encoders | plain GiB | APT GiB | "
          f"APT - plain | fits the card (+ {GPU_OVERHEAD_GIB} GiB) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for preset, tree_name, px, card, overrides in LADDER:
        s = preset_settings(preset, tree_name, overrides)
        plain = estimate(tree_name, px, False, **s)
        apt = estimate(tree_name, px, True, **s)
        name = preset + "".join(f" --{k} {v}" for k, v in overrides)
        rows += [dict(plain, card=card, preset=name), dict(apt, card=card, preset=name)]
        p, a = plain["gib"]["total"], apt["gib"]["total"]
        fits = "yes" if a + GPU_OVERHEAD_GIB <= CARD_GIB[card] else "no"
        text = "cached" if not s["text_on_device"] else "fp8 on the GPU" if s["fp8_text"] else "on the GPU"
        print(f"| `{name}` | {px} | {card} | {s['rank']} | {'fp8' if s['fp8_unet'] else 'bf16'} | "
              f"{'on' if s['checkpointing'] else 'off'} | {s['optimizer']} | {text} | {p:.2f} | {a:.2f} | "
              f"{a - p:+.2f} | {fits} |", flush=True)
    if not args.no_check:
        for tree_name, small, large in (("sd15", 256, 512), ("sdxl", 512, 1024)):
            ratio = scaling_check(tree_name, small, large)
            print(f"- check {tree_name}: saved bytes {small} -> {large} px grow {ratio:.3f}x the latent positions")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
