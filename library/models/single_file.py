"""Original-format ("single file") checkpoints: key layout, architecture detection, writing.

diffusers reads single files (`from_single_file`) but has no writer; tools that emit a checkpoint
(tiny test models, merging a LoRA into a model) need one, so it is here. Detection works on key
names and shapes only (read from the safetensors header, no tensor is loaded).
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from library.errors import UserError
from library.models.ldm_names import unet_path_to_ldm, vae_path_to_ldm

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
# Where each architecture keeps its text encoders, and in which format (HF CLIP or OpenCLIP).
TEXT_ENCODER_PREFIXES = {
    "sd1": [("cond_stage_model.transformer.", "clip")],
    "sd2": [("cond_stage_model.model.", "open_clip")],
    "sdxl": [("conditioner.embedders.0.transformer.", "clip"), ("conditioner.embedders.1.model.", "open_clip")],
}
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


def read_safetensors_header(path: Path) -> dict:
    """Tensor names, dtypes and shapes (and `__metadata__`) without reading any tensor data."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read(8)
            if len(raw) != 8:
                raise ValueError("file shorter than a safetensors header")
            (n,) = struct.unpack("<Q", raw)
            size = os.fstat(fh.fileno()).st_size
            if n > min(100_000_000, size - 8):  # never allocate what a damaged length claims
                raise ValueError(f"the header claims {n} bytes but the file has {size}")
            header = json.loads(fh.read(n))
        if not isinstance(header, dict) or not all(isinstance(v, dict) for v in header.values()):
            raise ValueError("the header is not a table of tensors")
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: not a readable .safetensors file ({exc})") from None
    return header


@dataclass(frozen=True)
class Detected:
    arch: str  # "sd1" | "sd2" | "sdxl"
    unet_width: int  # block_out_channels[0], tells full-size models from tiny ones
    cross_attention_dim: int | None
    in_channels: int
    has_text_encoders: bool
    has_vae: bool


def detect_architecture(shapes: Mapping[str, list[int]], source: str) -> Detected:
    """Tell SD1.x, SD2.x and SDXL apart from an original-format checkpoint's key names and shapes."""
    conv_in = shapes.get(UNET_PREFIX + "input_blocks.0.0.weight")
    if conv_in is None:
        raise UserError(
            f"{source}: no Stable Diffusion UNet found (key {UNET_PREFIX}input_blocks.0.0.weight missing); "
            "expected an SD1.x, SD2.x or SDXL checkpoint in the original single-file layout"
        )
    if any(k.startswith("conditioner.embedders.1.model.") for k in shapes) or UNET_PREFIX + "label_emb.0.0.weight" in shapes:
        arch = "sdxl"
    elif any(k.startswith("cond_stage_model.model.") for k in shapes):
        arch = "sd2"
    else:
        arch = "sd1"
    cross = None
    for key, shape in shapes.items():
        if key.startswith(UNET_PREFIX) and key.endswith("attn2.to_k.weight"):
            cross = shape[1]
            break
    if arch == "sd1" and cross == 1024:
        arch = "sd2"  # an SD2 UNet saved without its text encoder
    return Detected(
        arch=arch,
        unet_width=conv_in[0],
        cross_attention_dim=cross,
        in_channels=conv_in[1],
        has_text_encoders=any(k.startswith(("cond_stage_model.", "conditioner.")) for k in shapes),
        has_vae=any(k.startswith(VAE_PREFIX) for k in shapes),
    )


# --- writing -----------------------------------------------------------------------------------

def _clip_to_ldm(state: Mapping, prefix: str) -> dict:
    # transformers >= 5.6 flattened CLIPTextModel (no `text_model.`); the original layout keeps it.
    out = {}
    for key, value in state.items():
        if key.endswith("position_ids"):
            continue
        if not key.startswith("text_model.") and not key.startswith("text_projection"):
            key = "text_model." + key
        out[prefix + key] = value
    return out


def _open_clip_to_ldm(state: Mapping, prefix: str) -> dict:
    import torch

    state = {(k if k.startswith(("text_model.", "text_projection")) else "text_model." + k): v for k, v in state.items()}
    out = {
        prefix + "token_embedding.weight": state["text_model.embeddings.token_embedding.weight"],
        prefix + "positional_embedding": state["text_model.embeddings.position_embedding.weight"],
        prefix + "ln_final.weight": state["text_model.final_layer_norm.weight"],
        prefix + "ln_final.bias": state["text_model.final_layer_norm.bias"],
    }
    if "text_projection.weight" in state:
        out[prefix + "text_projection"] = state["text_projection.weight"].T.contiguous()
    n_layers = 1 + max(int(k.split(".")[3]) for k in state if k.startswith("text_model.encoder.layers."))
    rename = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj", "self_attn.out_proj": "attn.out_proj"}
    for i in range(n_layers):
        src = f"text_model.encoder.layers.{i}."
        dst = f"{prefix}transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[dst + f"attn.in_proj_{kind}"] = torch.cat([state[src + f"self_attn.{p}_proj.{kind}"] for p in "qkv"])
            for a, b in rename.items():
                out[dst + f"{b}.{kind}"] = state[src + f"{a}.{kind}"]
    return out


def to_original_state_dict(arch: str, unet, vae, text_encoders: list) -> dict:
    """The whole pipeline as one original-format state dict (what A1111/ComfyUI load)."""
    out = {}
    for key, value in unet.state_dict().items():
        out[UNET_PREFIX + unet_path_to_ldm(key, unet.config)] = value
    for key, value in vae.state_dict().items():
        name = vae_path_to_ldm(key, vae.config)
        if ".mid.attn_1." in name and name.endswith(("q.weight", "k.weight", "v.weight", "proj_out.weight")) and value.ndim == 2:
            value = value[:, :, None, None]  # the original attention uses 1x1 convolutions
        out[VAE_PREFIX + name] = value
    for (prefix, kind), encoder in zip(TEXT_ENCODER_PREFIXES[arch], text_encoders):
        state = encoder.state_dict()
        out.update(_clip_to_ldm(state, prefix) if kind == "clip" else _open_clip_to_ldm(state, prefix))
    return {k: v.contiguous() for k, v in out.items()}
