"""Model families: everything that differs between model architectures, behind one interface.

A family (SD1.x, SD2.x and SDXL live in library.models.stable_diffusion) knows how to recognise its
checkpoints and load them, how captions become conditioning, how its denoiser is called and with
which diffusion objective it is trained, where LoRA goes and how those layers are named in files,
which attention layers APT may record, which diffusers pipeline samples it and how WebUIs label
it. The rest of the trainer asks the family instead of testing an architecture string, so a new
family (a flow-matching transformer, say) is one implementation registered here; nothing else in
the core changes (tests/test_families.py registers a toy family that way). Lookup and detection
are in library.models.families, which also registers the built-in families.

`ModelFamily` is an abstract base: its methods raise until a family implements them.
`register_family` adds one; families are tried for automatic detection in registration order,
a `catch_all` family (SD1.x: any Stable Diffusion UNet) after all the others, so it can give the
precise error for a file that is no model at all.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from library.errors import UserError


@dataclass(frozen=True)
class CheckpointFacts:
    """What an original-format checkpoint's key names and shapes tell (no tensor is read)."""
    family: "ModelFamily"
    unet_width: int                 # first block's width: tells full-size models from tiny ones
    cross_attention_dim: int | None
    in_channels: int
    has_text_encoders: bool
    has_vae: bool

    @property
    def arch(self) -> str:
        return self.family.name


@dataclass
class Components:
    """A loaded model's parts, as the family's loader returns them."""
    unet: Any                  # the denoiser (a UNet for the Stable Diffusion families)
    vae: Any
    text_encoders: list
    tokenizers: list
    scheduler_config: dict


@dataclass(frozen=True)
class AttentionLayer:
    """An attention layer APT may record: its path and whether it attends to the text."""
    name: str
    cross: bool


class ModelFamily:
    """The interface. Attributes are facts; methods do what needs the family's model classes."""

    name: str = ""                         # model_arch value, metadata and file checks ("sd1", "sdxl")
    label: str = ""                        # for messages ("SD1.x")
    text_encoder_folders: tuple[str, ...] = ()   # diffusers subfolders of the text encoders, in order
    tokenizer_folders: tuple[str, ...] = ()
    lora_te_prefixes: tuple[str, ...] = ()       # kohya name prefix of each text encoder's LoRA
    lora_unet_naming: str = "diffusers"          # "diffusers" or "sgm": the module paths in LoRA names
    vae_overflows_in_fp16: bool = False          # keep the VAE in fp32 under fp16 unless told otherwise
    bucket_step_multiple: int | None = None      # bucket edges should be multiples of this (warned)
    auto_detect: bool = True                     # tried when model_arch = "auto"
    catch_all: bool = False                      # tried after every other family (the most general one)

    # --- identity and metadata ----------------------------------------------------------------
    def base_model_version(self, v_parameterization: bool) -> str:
        """ss_base_model_version, by which WebUIs filter LoRA lists."""
        raise NotImplementedError

    def modelspec_architecture(self, v_parameterization: bool) -> str:
        """modelspec.architecture of a LoRA for this family."""
        raise NotImplementedError

    # --- recognising and loading --------------------------------------------------------------
    def claims_folder(self, model_index: dict, unet_config: dict) -> bool:
        """Whether a diffusers folder (its model_index.json, unet/config.json) holds this family."""
        raise NotImplementedError

    def claims_checkpoint(self, shapes: Mapping[str, list[int]]) -> bool:
        """Whether an original-format checkpoint (key -> shape) holds this family."""
        raise NotImplementedError

    def checkpoint_facts(self, shapes: Mapping[str, list[int]], source: str) -> CheckpointFacts:
        raise NotImplementedError

    def shipped_tree(self, facts: CheckpointFacts) -> Path:
        """The shipped config tree (library/models/configs) for a single-file checkpoint."""
        raise NotImplementedError

    def load_folder(self, folder: Path, dtype) -> Components:
        raise NotImplementedError

    def load_single_file(self, path: Path, config_tree: Path, dtype) -> Components:
        raise NotImplementedError

    def original_state_dict(self, unet, vae, text_encoders: list) -> dict:
        """The whole model as one original-format state dict (what A1111/ComfyUI load)."""
        raise NotImplementedError

    def empty_components(self, tree: Path) -> dict:
        """{"unet": ..., "te1": ...} built on the meta device from a config tree (shapes only)."""
        raise NotImplementedError

    # --- training -----------------------------------------------------------------------------
    def caption_encoder(self, tokenizers: list, encoders: list, clip_skip: int = 1,
                        max_token_length: int | None = None):
        """The object that turns captions into Conditioning (library.models.conditioning);
        `max_token_length` (150, 225) lets captions run over the encoders' window in chunks."""
        raise NotImplementedError

    def predict(self, model, noisy, timesteps, cond, size_info: list[tuple[int, ...]]):
        """The denoiser's prediction for noisy latents at timesteps under `cond`. `size_info` holds
        each sample's (original h, w, crop top, left, target h, w), for families that condition on it."""
        raise NotImplementedError

    def objective(self, scheduler_config: dict, v_parameterization: bool, zero_terminal_snr: bool):
        """The diffusion objective it trains with (library.models.objectives)."""
        raise NotImplementedError

    def latent_multiple(self, unet_config: dict, vae_config: dict) -> int:
        """Image edges must be multiples of this (VAE downsampling times the denoiser's)."""
        raise NotImplementedError

    def use_attention_backend(self, model, backend: str, device) -> None:
        """Install the attention kernel ("sdpa" or "xformers") in every attention layer."""
        raise NotImplementedError

    def attention_layers(self, model) -> list[AttentionLayer]:
        raise NotImplementedError

    def attention_processors(self, model) -> dict:
        """{layer name: processor} of every attention layer (to restore them later)."""
        raise NotImplementedError

    def set_attention_processors(self, model, processors: dict) -> None:
        raise NotImplementedError

    def default_attention_processor(self, backend: str):
        """A stock processor of the backend, for layers a recorder does not take over."""
        raise NotImplementedError

    # --- LoRA ---------------------------------------------------------------------------------
    def lora_module_paths(self, unet_config: Mapping, include_conv: bool) -> list[tuple[str, bool, bool]]:
        """(module path, in the conv/LoCon set, is a spatial conv) of every denoiser LoRA target."""
        raise NotImplementedError

    def lora_text_encoder_paths(self, layers: int) -> list[str]:
        """Module paths of the LoRA targets in a text encoder with `layers` layers."""
        raise NotImplementedError

    def lora_unet_path(self, path: str, unet_config: Mapping) -> str:
        """The module path written into kohya names (diffusers or original layout)."""
        raise NotImplementedError

    def lora_alias_paths(self, path: str, unet_config: Mapping) -> list[str]:
        """Other spellings of a denoiser module that other trainers' files use."""
        raise NotImplementedError

    def original_weight_key(self, component: str, path: str, unet_config: Mapping) -> tuple[str, int | None]:
        """(key in an original-format checkpoint, q/k/v row block or None) of a LoRA target's weight."""
        raise NotImplementedError

    def lora_blocks(self, unet_config: Mapping) -> list[str]:
        """The labels of kohya's UNet blocks (block_dims, down/mid/up_lr_weight), in index order."""
        raise NotImplementedError

    def lora_block_index(self, path: str, unet_config: Mapping) -> int | None:
        """The kohya block (an index into `lora_blocks`) of a denoiser module path, or None."""
        raise NotImplementedError

    def lora_file_problems(self, naming: str, names: list[str]) -> dict[str, list[str]]:
        """Loader problems ({"a1111": [...], ...}) this family's names cause in WebUIs."""
        return {}

    def diffusers_lora_state_dict(self, tensors: dict) -> None:
        """Run diffusers' own conversion of a kohya file for this family (raises on rejection)."""
        raise NotImplementedError

    # --- sampling -----------------------------------------------------------------------------
    def pipeline(self, bundle, unet, scheduler):
        """A diffusers pipeline over loaded components (the denoiser may carry an active LoRA)."""
        raise NotImplementedError


_FAMILIES: dict[str, ModelFamily] = {}


def register_family(family: ModelFamily, replace: bool = False) -> ModelFamily:
    if not family.name or family.name == "auto":
        raise ValueError(f"a model family needs a name other than 'auto' (got {family.name!r})")
    if family.name in _FAMILIES and not replace:
        raise ValueError(f"model family {family.name!r} is registered already")
    _FAMILIES[family.name] = family
    return family


def unregister_family(name: str) -> None:
    _FAMILIES.pop(name, None)


def registered() -> dict[str, ModelFamily]:
    """The registry itself, by name, in registration order (library.models.families reads it)."""
    return _FAMILIES
