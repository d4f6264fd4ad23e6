"""Load SD1.x / SD2.x / SDXL from a diffusers folder or an original-format single file, offline.

Components are loaded with diffusers/transformers; what this module adds is architecture
detection, the shipped configs and tokenizers for single files, and one-line errors instead of
the libraries' tracebacks.
"""
from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from library.errors import UserError
from library.models import shipped
from library.models.single_file import detect_architecture, read_safetensors_header

log = logging.getLogger(__name__)

# ss_base_model_version values that WebUIs filter on.
BASE_MODEL_VERSION = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}
PIPELINES = {"sd1": "StableDiffusionPipeline", "sd2": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline"}


@dataclass
class ModelBundle:
    arch: str
    unet: Any
    vae: Any
    text_encoders: list
    tokenizers: list
    scheduler_config: dict
    source: str
    v_parameterization: bool = False
    extra: dict = field(default_factory=dict)

    @property
    def is_sdxl(self) -> bool:
        return self.arch == "sdxl"

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def native_resolution(self) -> int:
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    @property
    def base_model_version(self) -> str:
        if self.arch == "sd2" and self.v_parameterization:
            return "sd_v2_v"
        return BASE_MODEL_VERSION[self.arch]


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 300 else text[:297] + "..."


def detect_folder_arch(folder: Path) -> str:
    index = folder / "model_index.json"
    if index.is_file():
        name = shipped.read_json(index).get("_class_name", "")
        if "XL" in name:
            return "sdxl"
    elif not (folder / "unet" / "config.json").is_file():
        raise UserError(f"{folder}: not a diffusers model folder (no model_index.json or unet/config.json)")
    unet = shipped.read_json(folder / "unet" / "config.json")
    if unet.get("addition_embed_type") == "text_time":
        return "sdxl"
    return "sd2" if unet.get("cross_attention_dim") == 1024 else "sd1"


def _load_folder(folder: Path, arch: str, dtype) -> tuple:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    kw = dict(local_files_only=True, torch_dtype=dtype)
    unet = UNet2DConditionModel.from_pretrained(str(folder), subfolder="unet", **kw)
    vae = AutoencoderKL.from_pretrained(str(folder), subfolder="vae", **kw)
    encoders = [CLIPTextModel.from_pretrained(str(folder), subfolder="text_encoder", **kw)]
    tokenizers = [shipped.load_tokenizer(folder / "tokenizer")]
    if arch == "sdxl":
        encoders.append(CLIPTextModelWithProjection.from_pretrained(str(folder), subfolder="text_encoder_2", **kw))
        tokenizers.append(shipped.load_tokenizer(folder / "tokenizer_2"))
    scheduler_config = shipped.read_json(folder / "scheduler" / "scheduler_config.json")
    return unet, vae, encoders, tokenizers, scheduler_config


def _load_single_file(path: Path, arch: str, config_tree: Path, dtype) -> tuple:
    import diffusers

    pipe_cls = getattr(diffusers, PIPELINES[arch])
    tokenizers = [shipped.load_tokenizer(config_tree / "tokenizer")]
    kw: dict[str, Any] = {"tokenizer": tokenizers[0]}
    if arch == "sdxl":
        tokenizers.append(shipped.load_tokenizer(config_tree / "tokenizer_2"))
        kw["tokenizer_2"] = tokenizers[1]
    pipe = pipe_cls.from_single_file(str(path), config=str(config_tree), local_files_only=True, torch_dtype=dtype,
                                     **kw)
    encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if arch == "sdxl" else [])
    scheduler_config = shipped.read_json(config_tree / "scheduler" / "scheduler_config.json")
    return pipe.unet, pipe.vae, encoders, tokenizers, scheduler_config


def _single_file_plan(path: Path, forced_arch: str, model_config: str | None) -> tuple[str, Path]:
    if path.suffix.lower() == ".safetensors":
        shapes = {k: v["shape"] for k, v in read_safetensors_header(path).items() if k != "__metadata__"}
        found = detect_architecture(shapes, str(path))
        if found.in_channels != 4:
            raise UserError(f"{path}: the UNet takes {found.in_channels} input channels (an inpainting or "
                            "instruct model?); only 4-channel text-to-image models can be trained")
        if not found.has_text_encoders or not found.has_vae:
            missing = " and ".join(n for n, ok in (("text encoders", found.has_text_encoders),
                                                   ("VAE", found.has_vae)) if not ok)
            raise UserError(f"{path}: the checkpoint has no {missing}; use a full checkpoint "
                            "(UNet-only files cannot be trained)")
        arch = found.arch if forced_arch == "auto" else forced_arch
        if forced_arch != "auto" and forced_arch != found.arch:
            log.warning("model_arch = %s overrides the detected architecture %s", forced_arch, found.arch)
        tree = Path(model_config) if model_config else shipped.choose_tree(arch, found.unet_width)
    else:  # a pickle the user allowed; its keys cannot be read without unpickling
        if forced_arch == "auto" and not model_config:
            raise UserError(f"{path}: set model_arch (sd1, sd2 or sdxl) to load a pickle checkpoint")
        arch = forced_arch if forced_arch != "auto" else detect_folder_arch(Path(model_config))
        tree = Path(model_config) if model_config else shipped.choose_tree(arch, 320)
    return arch, tree


def load_vae(path: Path, reference_config: dict, dtype):
    """A separate VAE: diffusers folder, or .safetensors with diffusers or original keys."""
    from diffusers import AutoencoderKL

    if path.is_dir():
        sub = "vae" if (path / "vae" / "config.json").is_file() else None
        return AutoencoderKL.from_pretrained(str(path), subfolder=sub, local_files_only=True, torch_dtype=dtype)
    if path.suffix.lower() == ".safetensors" and any(
            k.startswith("encoder.down_blocks.") for k in read_safetensors_header(path)):
        from safetensors.torch import load_file

        vae = AutoencoderKL.from_config(reference_config)
        vae.load_state_dict(load_file(str(path)))
        return vae.to(dtype)
    # Original-layout VAE file: diffusers converts it, given the config as a folder.
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vae").mkdir()
        (Path(tmp) / "vae" / "config.json").write_text(json.dumps(reference_config))
        return AutoencoderKL.from_single_file(str(path), config=tmp, subfolder="vae", local_files_only=True,
                                              torch_dtype=dtype)


@dataclass(frozen=True)
class ModelPlan:
    """What will be loaded, known from configs and headers alone (cheap: no weights read)."""
    path: Path
    arch: str
    single_file: bool
    config_tree: Path  # diffusers folder holding the component configs
    unet_config: dict
    vae_config: dict

    @property
    def native_resolution(self) -> int:
        return int(self.unet_config["sample_size"]) * 2 ** (len(self.vae_config["block_out_channels"]) - 1)


def plan_model(opts) -> ModelPlan:
    """Detect the architecture and find the configs of the model named by `opts` (config.ModelOptions)."""
    path = Path(opts.pretrained_model_name_or_path)
    if not path.exists():
        raise UserError(f"{path}: no such model file or folder")
    if path.is_dir():
        arch = detect_folder_arch(path) if opts.model_arch == "auto" else opts.model_arch
        tree, single = path, False
    else:
        arch, tree = _single_file_plan(path, opts.model_arch, opts.model_config)
        single = True
    unet_config = shipped.read_json(tree / "unet" / "config.json")
    vae_config = shipped.read_json(tree / "vae" / "config.json")
    return ModelPlan(path, arch, single, tree, unet_config, vae_config)


def load_models(opts, plan: ModelPlan | None = None, dtype=None) -> ModelBundle:
    """Load the base model described by `opts` (config.ModelOptions) in `dtype` (default fp32)."""
    import torch

    dtype = dtype or torch.float32
    plan = plan or plan_model(opts)
    path = plan.path
    try:
        if plan.single_file:
            parts = _load_single_file(path, plan.arch, plan.config_tree, dtype)
        else:
            parts = _load_folder(path, plan.arch, dtype)
        unet, vae, encoders, tokenizers, scheduler_config = parts
        if opts.vae:
            vae = load_vae(Path(opts.vae), dict(vae.config), dtype)
    except UserError:
        raise
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as exc:
        raise UserError(f"{path}: could not load the model: {_short(exc)}") from None
    except Exception as exc:  # safetensors raises its own error type for corrupt files
        if type(exc).__name__ == "SafetensorError":
            raise UserError(f"{path}: corrupt or truncated safetensors file: {_short(exc)}") from None
        raise
    for module in [unet, vae, *encoders]:
        module.requires_grad_(False)
        module.eval()
    if not opts.v_parameterization and scheduler_config.get("prediction_type") == "v_prediction" and not plan.single_file:
        log.warning("%s: the model's scheduler predicts v; set v_parameterization = true if it is a v-model", path)
    return ModelBundle(arch=plan.arch, unet=unet, vae=vae, text_encoders=encoders, tokenizers=tokenizers,
                       scheduler_config=scheduler_config, source=str(path), v_parameterization=opts.v_parameterization)
