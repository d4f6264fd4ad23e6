"""Load SD1.x / SD2.x / SDXL from a diffusers folder or an original-format single file, offline.

Components are loaded with diffusers/transformers; what this module adds is architecture
detection, the shipped configs and tokenizers for single files, and one-line errors instead of
the libraries' tracebacks.
"""
from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from library.errors import UserError
from library.models import shipped
from library.models.families import detect_folder_family as family_of_folder
from library.models.families import families, get_family
from library.models.family import CheckpointFacts, ModelFamily
from library.models.families import detect_architecture
from library.models.single_file import read_safetensors_header

log = logging.getLogger(__name__)

@dataclass
class ModelBundle:
    family: ModelFamily
    unet: Any
    vae: Any
    text_encoders: list
    tokenizers: list
    scheduler_config: dict
    source: str
    v_parameterization: bool = False
    extra: dict = field(default_factory=dict)

    @property
    def arch(self) -> str:
        """The family's name: what model_arch and LoRA files call the architecture."""
        return self.family.name

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def native_resolution(self) -> int:
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    @property
    def base_model_version(self) -> str:
        return self.family.base_model_version(self.v_parameterization)


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 300 else text[:297] + "..."


def detect_folder_family(folder: Path) -> ModelFamily:
    index = folder / "model_index.json"
    if not index.is_file() and not (folder / "unet" / "config.json").is_file():
        raise UserError(f"{folder}: not a diffusers model folder (no model_index.json or unet/config.json)")
    model_index = shipped.read_json(index) if index.is_file() else {}
    unet = folder / "unet" / "config.json"
    return family_of_folder(folder, model_index, shipped.read_json(unet) if unet.is_file() else {})


def detect_folder_arch(folder: Path) -> str:
    return detect_folder_family(folder).name


def _single_file_plan(path: Path, forced: ModelFamily | None, model_config: str | None) -> tuple[ModelFamily, Path]:
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
        family = forced or found.family
        if forced is not None and forced is not found.family:
            log.warning("model_arch = %s overrides the detected architecture %s", forced.name, found.arch)
        if model_config:
            tree = Path(model_config)
        else:
            tree = family.shipped_tree(replace(found, family=family))
    else:  # a pickle the user allowed; its keys cannot be read without unpickling
        if forced is None and not model_config:
            names = ", ".join(f.name for f in families())
            raise UserError(f"{path}: set model_arch ({names}) to load a pickle checkpoint")
        family = forced or detect_folder_family(Path(model_config))
        tree = Path(model_config) if model_config else family.shipped_tree(
            CheckpointFacts(family, 320, None, 4, True, True))
    return family, tree


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
    family: ModelFamily
    single_file: bool
    config_tree: Path  # diffusers folder holding the component configs
    unet_config: dict
    vae_config: dict

    @property
    def arch(self) -> str:
        return self.family.name

    @property
    def native_resolution(self) -> int:
        return int(self.unet_config["sample_size"]) * 2 ** (len(self.vae_config["block_out_channels"]) - 1)


def plan_model(opts) -> ModelPlan:
    """Detect the architecture and find the configs of the model named by `opts` (config.ModelOptions)."""
    path = Path(opts.pretrained_model_name_or_path)
    if not path.exists():
        raise UserError(f"{path}: no such model file or folder")
    forced = None if opts.model_arch == "auto" else get_family(opts.model_arch)
    if path.is_dir():
        family = forced or detect_folder_family(path)
        tree, single = path, False
    else:
        family, tree = _single_file_plan(path, forced, opts.model_config)
        single = True
    unet_config = shipped.read_json(tree / "unet" / "config.json")
    vae_config = shipped.read_json(tree / "vae" / "config.json")
    return ModelPlan(path, family, single, tree, unet_config, vae_config)


def load_models(opts, plan: ModelPlan | None = None, dtype=None) -> ModelBundle:
    """Load the base model described by `opts` (config.ModelOptions) in `dtype` (default fp32)."""
    import torch

    dtype = dtype or torch.float32
    plan = plan or plan_model(opts)
    path = plan.path
    try:
        if plan.single_file:
            parts = plan.family.load_single_file(path, plan.config_tree, dtype)
        else:
            parts = plan.family.load_folder(path, dtype)
        unet, vae, encoders, tokenizers = parts.unet, parts.vae, parts.text_encoders, parts.tokenizers
        scheduler_config = parts.scheduler_config
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
    return ModelBundle(family=plan.family, unet=unet, vae=vae, text_encoders=encoders, tokenizers=tokenizers,
                       scheduler_config=scheduler_config, source=str(path), v_parameterization=opts.v_parameterization)
