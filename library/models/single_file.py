"""Original-format ("single file") checkpoints of Stable Diffusion: header reading, key layout, writing.

diffusers reads single files (`from_single_file`) but has no writer; tools that emit a checkpoint
(tiny test models, merging a LoRA into a model) need one, so it is here. Which family a file
holds is decided from its header by the families (library.models.families.detect_architecture).
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Mapping

from library.errors import UserError
from library.models.ldm_names import unet_path_to_ldm, vae_path_to_ldm

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
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


# --- writing -----------------------------------------------------------------------------------

def clip_to_ldm(state: Mapping, prefix: str) -> dict:
    # transformers >= 5.6 flattened CLIPTextModel (no `text_model.`); the original layout keeps it.
    out = {}
    for key, value in state.items():
        if key.endswith("position_ids"):
            continue
        if not key.startswith("text_model.") and not key.startswith("text_projection"):
            key = "text_model." + key
        out[prefix + key] = value
    return out


def open_clip_to_ldm(state: Mapping, prefix: str) -> dict:
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


def unet_vae_to_ldm(unet, vae) -> dict:
    """The UNet and VAE of a Stable Diffusion model in the original layout."""
    out = {}
    for key, value in unet.state_dict().items():
        out[UNET_PREFIX + unet_path_to_ldm(key, unet.config)] = value
    for key, value in vae.state_dict().items():
        name = vae_path_to_ldm(key, vae.config)
        if ".mid.attn_1." in name and name.endswith(("q.weight", "k.weight", "v.weight", "proj_out.weight")) and value.ndim == 2:
            value = value[:, :, None, None]  # the original attention uses 1x1 convolutions
        out[VAE_PREFIX + name] = value
    return out
