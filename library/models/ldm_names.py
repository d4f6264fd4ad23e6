"""Module paths of the original (LDM / SGM) Stable Diffusion layout, from diffusers module paths.

Single-file checkpoints and SDXL LoRA files name UNet modules the way the original
`ldm`/`sgm` code did (`input_blocks.4.1...`); diffusers names them by block (`down_blocks.1...`).
The mapping is fixed by the UNet's block structure (layers per block, which blocks have
attention), so it is computed from the UNet *config*, never from an installed library's module
tree. Pure string functions: no torch, usable for tables built on the meta device.
"""
from __future__ import annotations

from typing import Mapping

# ResnetBlock2D attribute -> ResBlock attribute in the original code.
UNET_RESNET_NAMES = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}

UNET_TOP_LEVEL = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}

VAE_RESNET_NAMES = {"conv_shortcut": "nin_shortcut"}
VAE_ATTENTION_NAMES = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


class UnmappedName(KeyError):
    """A diffusers path with no counterpart in the original layout."""


def _replace_prefix(path: str, table: Mapping[str, str]) -> str | None:
    for src in sorted(table, key=len, reverse=True):
        if path == src or path.startswith(src + "."):
            return table[src] + path[len(src):]
    return None


def _resnet_inner(rest: str, names: Mapping[str, str]) -> str:
    head, _, tail = rest.partition(".")
    return ".".join(filter(None, [names.get(head, head), tail]))


def unet_path_to_ldm(path: str, config: Mapping) -> str:
    """Map a diffusers UNet2DConditionModel path (module or parameter) to its LDM/SGM path.

    `config` is the UNet config (needs `layers_per_block`, `down_block_types`, `up_block_types`).
    """
    top = _replace_prefix(path, UNET_TOP_LEVEL)
    if top is not None:
        return top
    per = config["layers_per_block"]
    if isinstance(per, (list, tuple)):
        if len(set(per)) != 1:
            raise UnmappedName(f"{path}: per-block layers_per_block has no original layout")
        per = per[0]
    parts = path.split(".")
    kind = parts[0]
    if kind == "mid_block":
        sub, idx, rest = parts[1], int(parts[2]), ".".join(parts[3:])
        if sub == "resnets":
            return f"middle_block.{2 * idx}." + _resnet_inner(rest, UNET_RESNET_NAMES)
        if sub == "attentions":
            return "middle_block.1." + rest
        raise UnmappedName(path)
    if kind not in ("down_blocks", "up_blocks") or len(parts) < 4:
        raise UnmappedName(path)
    block, sub, idx, rest = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
    if kind == "down_blocks":
        if sub == "resnets":
            return f"input_blocks.{(per + 1) * block + idx + 1}.0." + _resnet_inner(rest, UNET_RESNET_NAMES)
        if sub == "attentions":
            return f"input_blocks.{(per + 1) * block + idx + 1}.1." + rest
        if sub == "downsamplers":
            # Downsample2D.conv is called `op` in the original code.
            return f"input_blocks.{(per + 1) * (block + 1)}.0." + rest.replace("conv", "op", 1)
        raise UnmappedName(path)
    layers = per + 1  # up blocks have one more resnet (the skip connection of the downsampler)
    if sub == "resnets":
        return f"output_blocks.{layers * block + idx}.0." + _resnet_inner(rest, UNET_RESNET_NAMES)
    if sub == "attentions":
        return f"output_blocks.{layers * block + idx}.1." + rest
    if sub == "upsamplers":
        has_attention = "CrossAttn" in config["up_block_types"][block]
        return f"output_blocks.{layers * block + layers - 1}.{2 if has_attention else 1}." + rest
    raise UnmappedName(path)


def vae_path_to_ldm(path: str, config: Mapping) -> str:
    """Map a diffusers AutoencoderKL parameter path to the original `first_stage_model` layout."""
    parts = path.split(".")
    coder = parts[0]
    if coder not in ("encoder", "decoder"):
        return path  # quant_conv, post_quant_conv
    rest = parts[1:]
    head = rest[0]
    if head == "mid_block":
        sub, idx, inner = rest[1], int(rest[2]), ".".join(rest[3:])
        if sub == "resnets":
            return f"{coder}.mid.block_{idx + 1}." + _resnet_inner(inner, VAE_RESNET_NAMES)
        return f"{coder}.mid.attn_{idx + 1}." + (_replace_prefix(inner, VAE_ATTENTION_NAMES) or inner)
    if head == "conv_norm_out":
        return f"{coder}.norm_out." + ".".join(rest[1:])
    if head in ("down_blocks", "up_blocks"):
        block, sub, idx, inner = int(rest[1]), rest[2], rest[3], ".".join(rest[4:])
        if head == "up_blocks":
            block = len(config["up_block_types"]) - 1 - block  # the original decoder counts upwards
        level = f"{coder}.{'down' if head == 'down_blocks' else 'up'}.{block}."
        if sub == "resnets":
            return level + f"block.{idx}." + _resnet_inner(inner, VAE_RESNET_NAMES)
        if sub == "downsamplers":
            return level + "downsample." + inner
        if sub == "upsamplers":
            return level + "upsample." + inner
        raise UnmappedName(path)
    return path  # conv_in, conv_out
