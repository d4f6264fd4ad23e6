"""The Stable Diffusion families: SD1.x, SD2.x and SDXL (library.models.family's interface).

All three share diffusers' UNet2DConditionModel, AutoencoderKL and CLIP text encoders, DDPM
training (epsilon or v) and the original single-file layout (library.models.single_file). They
differ in text conditioning (SDXL: two encoders' penultimate states, a pooled projection and the
size/crop micro-conditioning), in how kohya names their LoRA modules (SDXL: the original SGM
paths; SD1.x/2.x: diffusers paths), in how single files store their text encoders, and in what
WebUIs call them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

from library.errors import UserError
from library.models import shipped
from library.models.family import AttentionLayer, CheckpointFacts, Components, ModelFamily, register_family
from library.models.ldm_names import unet_path_to_ldm
from library.models.single_file import (
    UNET_PREFIX, VAE_PREFIX, clip_to_ldm, open_clip_to_ldm, unet_vae_to_ldm,
)

_OPEN_CLIP = {"self_attn.out_proj": "attn.out_proj", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}


# --- UNet2DConditionModel's LoRA targets (kohya's networks.lora rules) ---------------------------

TRANSFORMER_BLOCK_MODULES = (
    "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
    "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0",
    "ff.net.0.proj", "ff.net.2",
)


TEXT_LAYER_MODULES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                      "mlp.fc1", "mlp.fc2")


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
    """(diffusers path, in conv set, is 3x3 conv) for every UNet LoRA module, from the UNet config:
    every Linear/1x1 conv of the transformer blocks; with conv LoRA also every Linear/Conv2d of the
    ResNet blocks, down- and upsamplers (3x3 convolutions use conv_dim/conv_alpha)."""
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


class StableDiffusion(ModelFamily):
    """What SD1.x, SD2.x and SDXL share; the subclasses set what differs."""

    pipeline_class = "StableDiffusionPipeline"
    diffusers_lora_loader = "StableDiffusionLoraLoaderMixin"
    text_encoder_classes: tuple[str, ...] = ("CLIPTextModel",)
    # Where single files keep the text encoders, and in which format (HF CLIP or OpenCLIP).
    single_file_text_encoders: tuple[tuple[str, str], ...] = ()
    shipped_trees: tuple[str, ...] = ()

    # --- recognising and loading --------------------------------------------------------------
    def checkpoint_facts(self, shapes, source) -> CheckpointFacts:
        conv_in = shapes.get(UNET_PREFIX + "input_blocks.0.0.weight")
        if conv_in is None:
            raise UserError(
                f"{source}: no Stable Diffusion UNet found (key {UNET_PREFIX}input_blocks.0.0.weight missing); "
                "expected an SD1.x, SD2.x or SDXL checkpoint in the original single-file layout")
        cross = None
        for key, shape in shapes.items():
            if key.startswith(UNET_PREFIX) and key.endswith("attn2.to_k.weight"):
                cross = shape[1]
                break
        return CheckpointFacts(
            family=self, unet_width=conv_in[0], cross_attention_dim=cross, in_channels=conv_in[1],
            has_text_encoders=any(k.startswith(("cond_stage_model.", "conditioner.")) for k in shapes),
            has_vae=any(k.startswith(VAE_PREFIX) for k in shapes))

    def shipped_tree(self, facts: CheckpointFacts) -> Path:
        for name in self.shipped_trees:
            unet = shipped.read_json(shipped.tree(name) / "unet" / "config.json")
            if unet["block_out_channels"][0] == facts.unet_width:
                return shipped.tree(name)
        raise UserError(f"no shipped {self.name} config has a UNet of width {facts.unet_width}; "
                        "pass `model_config = \"<diffusers folder with the model's configs>\"`")

    def load_folder(self, folder: Path, dtype) -> Components:
        import transformers
        from diffusers import AutoencoderKL, UNet2DConditionModel

        kw = dict(local_files_only=True, torch_dtype=dtype)
        unet = UNet2DConditionModel.from_pretrained(str(folder), subfolder="unet", **kw)
        vae = AutoencoderKL.from_pretrained(str(folder), subfolder="vae", **kw)
        encoders = [getattr(transformers, cls).from_pretrained(str(folder), subfolder=sub, **kw)
                    for cls, sub in zip(self.text_encoder_classes, self.text_encoder_folders)]
        tokenizers = [shipped.load_tokenizer(folder / sub) for sub in self.tokenizer_folders]
        return Components(unet, vae, encoders, tokenizers,
                          shipped.read_json(folder / "scheduler" / "scheduler_config.json"))

    def load_single_file(self, path: Path, config_tree: Path, dtype) -> Components:
        import diffusers

        tokenizers = [shipped.load_tokenizer(config_tree / sub) for sub in self.tokenizer_folders]
        names = ["tokenizer", "tokenizer_2"][:len(tokenizers)]
        pipe = getattr(diffusers, self.pipeline_class).from_single_file(
            str(path), config=str(config_tree), local_files_only=True, torch_dtype=dtype,
            **dict(zip(names, tokenizers)))
        encoders = [getattr(pipe, n) for n in ["text_encoder", "text_encoder_2"][:len(self.text_encoder_folders)]]
        return Components(pipe.unet, pipe.vae, encoders, tokenizers,
                          shipped.read_json(config_tree / "scheduler" / "scheduler_config.json"))

    def original_state_dict(self, unet, vae, text_encoders: list) -> dict:
        out = unet_vae_to_ldm(unet, vae)
        for (prefix, kind), encoder in zip(self.single_file_text_encoders, text_encoders):
            state = encoder.state_dict()
            out.update(clip_to_ldm(state, prefix) if kind == "clip" else open_clip_to_ldm(state, prefix))
        return {k: v.contiguous() for k, v in out.items()}

    def empty_components(self, tree: Path) -> dict:
        from accelerate import init_empty_weights
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel

        with init_empty_weights():
            out = {"unet": UNet2DConditionModel.from_config(shipped.read_json(tree / "unet" / "config.json"))}
            for i, sub in enumerate(self.text_encoder_folders):
                out[f"te{i + 1}"] = CLIPTextModel(CLIPTextConfig(**shipped.read_json(tree / sub / "config.json")))
        return out

    # --- training -----------------------------------------------------------------------------
    def caption_encoder(self, tokenizers, encoders, clip_skip: int = 1, max_token_length=None):
        from library.models.conditioning import ClipCaptionEncoder

        return ClipCaptionEncoder(tokenizers, encoders, clip_skip, max_token_length)

    def model_kwargs(self, cond, size_info, device) -> dict:
        return {}

    def predict(self, model, noisy, timesteps, cond, size_info):
        kwargs = self.model_kwargs(cond, size_info, noisy.device)
        return model(noisy, timesteps, cond.hidden_states, **kwargs).sample

    def objective(self, scheduler_config: dict, v_parameterization: bool, zero_terminal_snr: bool):
        from library.models.objectives import DDPMObjective

        return DDPMObjective(scheduler_config, v_parameterization, zero_terminal_snr)

    def latent_multiple(self, unet_config: dict, vae_config: dict) -> int:
        return 2 ** (len(vae_config["block_out_channels"]) - 1) * 2 ** (len(unet_config["block_out_channels"]) - 1)

    def use_attention_backend(self, model, backend: str, device) -> None:
        if backend == "xformers":
            try:
                import xformers  # noqa: F401
            except ImportError:
                raise UserError('attention = "xformers" needs the xformers package (pip install xformers, CUDA '
                                'only); or use attention = "sdpa"') from None
            if device.type != "cuda":
                raise UserError('attention = "xformers" runs only on a CUDA GPU; use attention = "sdpa" here')
            model.enable_xformers_memory_efficient_attention()
            return
        model.set_attn_processor(self.default_attention_processor("sdpa"))

    def attention_processors(self, model) -> dict:
        return {key.removesuffix(".processor"): proc for key, proc in model.attn_processors.items()}

    def attention_layers(self, model) -> list[AttentionLayer]:
        return [AttentionLayer(name, name.endswith("attn2")) for name in self.attention_processors(model)
                if name.endswith(("attn1", "attn2"))]

    def set_attention_processors(self, model, processors: dict) -> None:
        model.set_attn_processor({f"{name}.processor": proc for name, proc in processors.items()})

    def default_attention_processor(self, backend: str):
        from diffusers.models.attention_processor import AttnProcessor2_0, XFormersAttnProcessor

        return XFormersAttnProcessor() if backend == "xformers" else AttnProcessor2_0()

    # --- LoRA ---------------------------------------------------------------------------------
    def lora_module_paths(self, unet_config, include_conv):
        return unet_module_paths(unet_config, include_conv)

    def lora_text_encoder_paths(self, layers: int) -> list[str]:
        """q/k/v/out projections and both MLP layers of every CLIP encoder layer."""
        return [f"text_model.encoder.layers.{i}.{m}" for i in range(layers) for m in TEXT_LAYER_MODULES]

    def lora_unet_path(self, path, unet_config):
        return unet_path_to_ldm(path, unet_config) if self.lora_unet_naming == "sgm" else path

    def lora_alias_paths(self, path, unet_config):
        # Other trainers' spellings: diffusers paths (SDXL) and original SGM paths (SD1.x).
        return [path, unet_path_to_ldm(path, unet_config)]

    def original_weight_key(self, component, path, unet_config):
        if component == "unet":
            return UNET_PREFIX + unet_path_to_ldm(path, unet_config) + ".weight", None
        prefix, kind = self.single_file_text_encoders[int(component[-1]) - 1]
        if kind == "clip":
            return prefix + path + ".weight", None
        layer, module = path.removeprefix("text_model.encoder.layers.").split(".", 1)
        base = f"{prefix}transformer.resblocks.{layer}."
        if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            return base + "attn.in_proj_weight", "qkv".index(module[-6])  # OpenCLIP stacks q, k, v
        return base + _OPEN_CLIP[module] + ".weight", None

    # kohya's blocks follow the original UNet's block lists (input_blocks, middle_block,
    # output_blocks). SD1.x/2.x: IN00-IN11, one MID, OUT00-OUT11 (25). SDXL (split_mid_block): a
    # BASE slot (the embeddings), IN00-IN08, MID00-MID02, OUT00-OUT08 and an OUT slot (23).
    split_mid_block = False

    def _ldm_block_counts(self, unet_config) -> tuple[int, int]:
        per = unet_config["layers_per_block"]
        per = per[0] if isinstance(per, (list, tuple)) else per
        n = len(unet_config["down_block_types"])
        return n * (per + 1), n * (per + 1)  # input_blocks (conv_in is input_blocks.0), output_blocks

    def lora_blocks(self, unet_config):
        ins, outs = self._ldm_block_counts(unet_config)
        if self.split_mid_block:
            return (["BASE"] + [f"IN{i:02d}" for i in range(ins)] + ["MID00", "MID01", "MID02"]
                    + [f"OUT{i:02d}" for i in range(outs)] + ["OUT"])
        return [f"IN{i:02d}" for i in range(ins)] + ["MID"] + [f"OUT{i:02d}" for i in range(outs)]

    def lora_block_index(self, path, unet_config):
        try:
            ldm = unet_path_to_ldm(path, unet_config)
        except KeyError:
            return None
        parts = ldm.split(".")
        ins, _ = self._ldm_block_counts(unet_config)
        base = 1 if self.split_mid_block else 0
        mid = base + ins
        out = mid + (3 if self.split_mid_block else 1)
        if parts[0] == "input_blocks":
            return base + int(parts[1])
        if parts[0] == "middle_block":
            return mid + (int(parts[1]) if self.split_mid_block else 0)
        if parts[0] == "output_blocks":
            return out + int(parts[1])
        if self.split_mid_block and parts[0] in ("time_embed", "label_emb"):
            return 0
        if self.split_mid_block and parts[0] == "out":
            return len(self.lora_blocks(unet_config)) - 1
        return None

    def lora_file_problems(self, naming, names):
        if self.lora_unet_naming == "diffusers" and naming == "sgm":
            return {"diffusers": ["SD1.x/2.x UNet with SGM names (input_blocks...): diffusers does not load them"]}
        return {}

    def diffusers_lora_state_dict(self, tensors: dict) -> None:
        from diffusers.loaders import lora_pipeline

        getattr(lora_pipeline, self.diffusers_lora_loader).lora_state_dict(tensors)

    # --- sampling -----------------------------------------------------------------------------
    def pipeline(self, bundle, unet, scheduler):
        import diffusers

        pipe = getattr(diffusers, self.pipeline_class)(
            vae=bundle.vae, text_encoder=bundle.text_encoders[0], tokenizer=bundle.tokenizers[0], unet=unet,
            scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        return pipe


class SD1(StableDiffusion):
    name, label = "sd1", "SD1.x"
    text_encoder_folders, tokenizer_folders = ("text_encoder",), ("tokenizer",)
    lora_te_prefixes = ("lora_te",)
    single_file_text_encoders = (("cond_stage_model.transformer.", "clip"),)
    shipped_trees = ("sd15", "tiny_sd15")
    catch_all = True  # any Stable Diffusion UNet that no other family claims

    def base_model_version(self, v_parameterization):
        return "sd_v1"

    def modelspec_architecture(self, v_parameterization):
        return "stable-diffusion-v1/lora"

    def claims_folder(self, model_index, unet_config):
        return True

    def claims_checkpoint(self, shapes):
        return True  # checkpoint_facts says precisely what is missing from a file that is no model


class SD2(SD1):
    name, label = "sd2", "SD2.x"
    catch_all = False
    single_file_text_encoders = (("cond_stage_model.model.", "open_clip"),)
    shipped_trees = ("sd2",)

    def base_model_version(self, v_parameterization):
        return "sd_v2_v" if v_parameterization else "sd_v2"

    def modelspec_architecture(self, v_parameterization):
        return "stable-diffusion-v2-768-v/lora" if v_parameterization else "stable-diffusion-v2-512/lora"

    def claims_folder(self, model_index, unet_config):
        return unet_config.get("cross_attention_dim") == 1024

    def claims_checkpoint(self, shapes):
        if UNET_PREFIX + "input_blocks.0.0.weight" not in shapes:
            return False
        if any(k.startswith("cond_stage_model.model.") for k in shapes):
            return True
        # an SD2 UNet saved without its text encoder: told by the width of its cross-attention keys
        return any(k.startswith(UNET_PREFIX) and k.endswith("attn2.to_k.weight") and v[1] == 1024
                   for k, v in shapes.items())


class SDXL(StableDiffusion):
    name, label = "sdxl", "SDXL"
    pipeline_class = "StableDiffusionXLPipeline"
    diffusers_lora_loader = "StableDiffusionXLLoraLoaderMixin"
    text_encoder_classes = ("CLIPTextModel", "CLIPTextModelWithProjection")
    text_encoder_folders, tokenizer_folders = ("text_encoder", "text_encoder_2"), ("tokenizer", "tokenizer_2")
    lora_te_prefixes = ("lora_te1", "lora_te2")
    lora_unet_naming = "sgm"
    single_file_text_encoders = (("conditioner.embedders.0.transformer.", "clip"),
                                 ("conditioner.embedders.1.model.", "open_clip"))
    shipped_trees = ("sdxl", "tiny_sdxl")
    split_mid_block = True
    vae_overflows_in_fp16 = True  # the SDXL VAE gives NaN in fp16
    bucket_step_multiple = 32

    def base_model_version(self, v_parameterization):
        return "sdxl_base_v1-0"

    def modelspec_architecture(self, v_parameterization):
        return "stable-diffusion-xl-v1-base/lora"

    def claims_folder(self, model_index, unet_config):
        return "XL" in model_index.get("_class_name", "") or unet_config.get("addition_embed_type") == "text_time"

    def claims_checkpoint(self, shapes):
        return any(k.startswith("conditioner.embedders.1.model.") for k in shapes) or \
            UNET_PREFIX + "label_emb.0.0.weight" in shapes

    def caption_encoder(self, tokenizers, encoders, clip_skip: int = 1, max_token_length=None):
        from library.models.conditioning import SdxlCaptionEncoder

        return SdxlCaptionEncoder(tokenizers, encoders, clip_skip, max_token_length)

    def model_kwargs(self, cond, size_info, device) -> dict:
        import torch

        # Micro-conditioning: original (h, w), crop (top, left), target (h, w) of each sample.
        time_ids = torch.tensor(size_info, device=device, dtype=cond.hidden_states.dtype)
        return {"added_cond_kwargs": {"text_embeds": cond.pooled, "time_ids": time_ids}}

    def lora_file_problems(self, naming, names):
        if naming == "diffusers" and any("up_blocks_0_upsamplers_0_conv" in n for n in names):
            return {"a1111": ["SDXL names in diffusers style include up_blocks_0_upsamplers_0_conv, which A1111 "
                              "maps to the wrong layer"]}
        return {}

    def pipeline(self, bundle, unet, scheduler):
        from diffusers import StableDiffusionXLPipeline

        pipe = StableDiffusionXLPipeline(vae=bundle.vae, text_encoder=bundle.text_encoders[0],
                                         text_encoder_2=bundle.text_encoders[1], tokenizer=bundle.tokenizers[0],
                                         tokenizer_2=bundle.tokenizers[1], unet=unet, scheduler=scheduler)
        pipe.set_progress_bar_config(disable=True)
        return pipe


# Detection order: the specific families before SD1.x, which takes any Stable Diffusion UNet.
for _family in (SDXL(), SD2(), SD1()):
    register_family(_family)

