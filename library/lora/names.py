"""Which modules get a LoRA, and their names in kohya's file layout.

The tables are computed from the model *configs* (block structure, layer counts) with fixed
rules, never read from the installed library's module tree: transformers 5 renamed CLIPTextModel's
modules, and a table taken from `named_modules()` would silently change the file's keys. Golden
tests pin the full-size tables (SD1.5 264 / 350 with conv, SDXL 986 / 1,052).

Rules (those of kohya's `networks.lora`, which every WebUI loader expects):
- UNet: every Linear/1x1-conv in the transformer blocks (attention q/k/v/out, feed-forward,
  proj_in/proj_out). With conv LoRA also every Linear/Conv2d in ResNet blocks, downsamplers and
  upsamplers; 3x3 convolutions there use conv_dim/conv_alpha, the others network_dim/alpha.
- Text encoders: q/k/v/out projections and both MLP layers of every encoder layer.
- Names: prefix + module path with "." -> "_". SD1.x/SD2.x UNet paths are diffusers paths; SDXL
  UNet paths are the original SGM paths. Text encoder paths always include `text_model.`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from library.models.ldm_names import unet_path_to_ldm

TRANSFORMER_BLOCK_MODULES = (
    "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
    "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0",
    "ff.net.0.proj", "ff.net.2",
)
TEXT_LAYER_MODULES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                      "mlp.fc1", "mlp.fc2")
TEXT_PREFIXES = {"sd1": ("lora_te",), "sd2": ("lora_te",), "sdxl": ("lora_te1", "lora_te2")}


@dataclass(frozen=True)
class LoraTarget:
    component: str  # "unet", "te1" or "te2"
    path: str       # module path (text encoders: with "text_model.")
    name: str       # kohya module name, e.g. lora_unet_..._to_q
    conv_set: bool  # part of the conv (LoCon) set: ResNet/down/upsampler layers
    conv3x3: bool   # a spatial convolution: uses conv_dim / conv_alpha


def _per_block(value, count: int) -> list[int]:
    return list(value) if isinstance(value, (list, tuple)) else [value] * count


def _attention(prefix: str, n_blocks: int) -> list[tuple[str, bool]]:
    out = [(f"{prefix}.proj_in", False)]
    for k in range(n_blocks):
        out += [(f"{prefix}.transformer_blocks.{k}.{m}", False) for m in TRANSFORMER_BLOCK_MODULES]
    out.append((f"{prefix}.proj_out", False))
    return out


def _resnet(prefix: str, in_ch: int, out_ch: int) -> list[tuple[str, bool]]:
    out = [(f"{prefix}.conv1", True), (f"{prefix}.time_emb_proj", False), (f"{prefix}.conv2", True)]
    if in_ch != out_ch:
        out.append((f"{prefix}.conv_shortcut", False))
    return out


def unet_module_paths(config: Mapping, include_conv: bool) -> list[tuple[str, bool, bool]]:
    """(diffusers path, in conv set, is 3x3 conv) for every UNet LoRA module."""
    per = config["layers_per_block"]
    channels = list(config["block_out_channels"])
    n = len(channels)
    tlpb = _per_block(config.get("transformer_layers_per_block", 1), n)
    reverse_tlpb = config.get("reverse_transformer_layers_per_block") or tlpb[::-1]
    attn: list[tuple[str, bool]] = []
    conv: list[tuple[str, bool]] = []
    out_ch = channels[0]
    for i, kind in enumerate(config["down_block_types"]):
        in_ch, out_ch = out_ch, channels[i]
        for j in range(per):
            if "CrossAttn" in kind:
                attn += _attention(f"down_blocks.{i}.attentions.{j}", tlpb[i])
            conv += _resnet(f"down_blocks.{i}.resnets.{j}", in_ch if j == 0 else out_ch, out_ch)
        if i < n - 1:
            conv.append((f"down_blocks.{i}.downsamplers.0.conv", True))
    if config.get("mid_block_type", "UNetMidBlock2DCrossAttn") == "UNetMidBlock2DCrossAttn":
        attn += _attention("mid_block.attentions.0", tlpb[-1])
    conv += _resnet("mid_block.resnets.0", channels[-1], channels[-1])
    conv += _resnet("mid_block.resnets.1", channels[-1], channels[-1])
    rev = channels[::-1]
    prev = rev[0]
    for i, kind in enumerate(config["up_block_types"]):
        out_ch, skip_in = rev[i], rev[min(i + 1, n - 1)]
        for j in range(per + 1):
            if "CrossAttn" in kind:
                attn += _attention(f"up_blocks.{i}.attentions.{j}", reverse_tlpb[i])
            res_in = prev if j == 0 else out_ch
            skip = skip_in if j == per else out_ch
            conv += _resnet(f"up_blocks.{i}.resnets.{j}", res_in + skip, out_ch)
        if i < n - 1:
            conv.append((f"up_blocks.{i}.upsamplers.0.conv", True))
        prev = out_ch
    out = [(p, False, False) for p, _ in attn]
    if include_conv:
        out += [(p, True, is3x3) for p, is3x3 in conv]
    return out


def unet_targets(config: Mapping, arch: str, include_conv: bool) -> list[LoraTarget]:
    targets = []
    for path, conv_set, conv3x3 in unet_module_paths(config, include_conv):
        original = unet_path_to_ldm(path, config) if arch == "sdxl" else path
        targets.append(LoraTarget("unet", path, "lora_unet_" + original.replace(".", "_"), conv_set, conv3x3))
    return targets


def text_encoder_targets(arch: str, layer_counts: list[int]) -> list[LoraTarget]:
    """Targets of each text encoder; `layer_counts` = num_hidden_layers of each encoder."""
    targets = []
    for index, (prefix, layers) in enumerate(zip(TEXT_PREFIXES[arch], layer_counts)):
        for i in range(layers):
            for module in TEXT_LAYER_MODULES:
                path = f"text_model.encoder.layers.{i}.{module}"
                targets.append(LoraTarget(f"te{index + 1}", path, f"{prefix}_{path.replace('.', '_')}", False, False))
    return targets
