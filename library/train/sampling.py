"""Sample images during training with diffusers' own pipelines and the LoRA active.

Defaults users expect: the training resolution (SDXL previews at 1024, not 512), an Euler-type
sampler, and the same seed for a prompt in every round so rounds can be compared. The global RNG
state is saved before and restored after sampling, so sampling never changes the training.
"""
from __future__ import annotations

import inspect
import logging
import math
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from library.train.checkpoint import rng_state, set_rng_state
from library.train.prompts import SamplePrompt
from library.utils.atomic import atomic_path

log = logging.getLogger(__name__)


def make_scheduler(sampler: str, base_config: dict, v_prediction: bool, zero_terminal_snr: bool):
    import diffusers

    classes = {"euler_a": "EulerAncestralDiscreteScheduler", "euler": "EulerDiscreteScheduler",
               "ddim": "DDIMScheduler", "dpm++_2m": "DPMSolverMultistepScheduler",
               "dpm++_2m_karras": "DPMSolverMultistepScheduler"}
    cls = getattr(diffusers, classes[sampler])
    config = {k: v for k, v in base_config.items() if not k.startswith("_")}
    config["prediction_type"] = "v_prediction" if v_prediction else "epsilon"
    accepted = inspect.signature(cls.__init__).parameters
    if zero_terminal_snr and "rescale_betas_zero_snr" in accepted:
        config["rescale_betas_zero_snr"] = True
        if "timestep_spacing" in accepted:
            config["timestep_spacing"] = "trailing"  # needed to reach the zero-SNR step
    if "clip_sample" in accepted:
        config["clip_sample"] = False  # latents are not clipped in Stable Diffusion
    if sampler.startswith("dpm++"):
        config.update(algorithm_type="dpmsolver++", solver_order=2, use_karras_sigmas=sampler.endswith("karras"))
    return cls.from_config({k: v for k, v in config.items() if k in accepted})


def build_pipeline(bundle, unet, scheduler):
    """The model family's diffusers pipeline over the loaded components."""
    return bundle.family.pipeline(bundle, unet, scheduler)


TILE_PX = 512  # decoded tile size with tiling: about a quarter of a 1024 px decode's memory


@torch.no_grad()
def decode(pipe, latents: torch.Tensor, tiled: bool = False) -> list[Image.Image]:
    """Latents from a pipeline (output_type="latent") -> images, decoded by the VAE in its own dtype
    with autocast off.

    The pipelines decode inside whatever autocast the caller set, so an fp32 VAE (no_half_vae, the
    SDXL VAE under fp16) would silently run in half precision; and without autocast they hand
    half-precision latents to an fp32 VAE, which fails. Decoding here avoids both."""
    vae = pipe.vae
    param = next(vae.parameters())
    config = vae.config
    mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
    with torch.autocast(param.device.type, enabled=False):
        latents = latents.to(param.device, param.dtype)
        if mean is not None and std is not None:
            shape = (1, -1, 1, 1)
            mean = torch.tensor(mean, device=latents.device, dtype=latents.dtype).view(shape)
            std = torch.tensor(std, device=latents.device, dtype=latents.dtype).view(shape)
            latents = latents * std / config.scaling_factor + mean
        else:
            latents = latents / config.scaling_factor
        if tiled and max(latents.shape[-2:]) * pipe.vae_scale_factor > TILE_PX:
            pixels = tiled_decode(vae, latents, pipe.vae_scale_factor)
        else:
            pixels = vae.decode(latents).sample
    return pipe.image_processor.postprocess(pixels.float(), output_type="pil")


def tiled_decode(vae, latents: torch.Tensor, scale: int) -> torch.Tensor:
    """diffusers' tiled decode with TILE_PX tiles (its default tile is the VAE's whole training
    size, 1024 px for SDXL: no tiling at the sizes that need it), the VAE's settings restored."""
    saved = vae.tile_sample_min_size, vae.tile_latent_min_size
    vae.tile_sample_min_size, vae.tile_latent_min_size = TILE_PX, TILE_PX // scale
    try:
        return vae.tiled_decode(latents).sample
    finally:
        vae.tile_sample_min_size, vae.tile_latent_min_size = saved


@contextmanager
def on_device(modules: list[torch.nn.Module], device):
    """Temporarily move modules (the VAE or text encoders parked on the CPU by caching) to `device`."""
    homes = [next(m.parameters()).device for m in modules]
    for m in modules:
        m.to(device)
    try:
        yield
    finally:
        for m, home in zip(modules, homes):
            m.to(home)


@contextmanager
def _lora_off(set_enabled):
    """The LoRA switched off for the base model's image, and on again whatever happens."""
    set_enabled(False)
    try:
        yield
    finally:
        set_enabled(True)


def grid(images: list[Image.Image], columns: int | None = None, row_labels: list[str] | None = None,
         column_labels: list[str] | None = None) -> Image.Image:
    """Images in rows of `columns` (default: a square layout), with optional text labels."""
    from PIL import ImageDraw, ImageFont

    cols = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    cw, ch = max(i.width for i in images), max(i.height for i in images)
    font = ImageFont.load_default()
    left = 0
    if row_labels:
        left = 8 + max(int(font.getlength(t)) for t in row_labels)
    top = 14 if column_labels else 0
    out = Image.new("RGB", (left + cols * cw, top + rows * ch), (0, 0, 0))
    draw = ImageDraw.Draw(out)
    for c, text in enumerate(column_labels or []):
        draw.text((left + c * cw + 2, 1), text, fill=(255, 255, 255), font=font)
    for r, text in enumerate(row_labels or []):
        draw.text((4, top + r * ch + ch // 2 - 6), text, fill=(255, 255, 255), font=font)
    for n, img in enumerate(images):
        out.paste(img, (left + (n % cols) * cw + (cw - img.width) // 2, top + (n // cols) * ch + (ch - img.height) // 2))
    return out


class Sampler:
    def __init__(self, prompts: list[SamplePrompt], folder: Path, output_name: str, default_size: tuple[int, int],
                 default_sampler: str, seed: int, v_prediction: bool, zero_terminal_snr: bool, *, text,
                 compare_base: bool = False, vae_tiling: bool = False):
        self.prompts = prompts
        self.text = text  # a CaptionEncoder: prompts are encoded as training encodes captions
        self.folder = folder
        self.output_name = output_name
        self.default_size = default_size
        self.default_sampler = default_sampler
        self.seed = seed
        self.v_prediction = v_prediction
        self.zero_terminal_snr = zero_terminal_snr
        self.compare_base = compare_base
        self.vae_tiling = vae_tiling

    def file_name(self, step: int | None, index: int, seed: int) -> str:
        return f"{self.stem(step)}_{index:02d}_{seed}.png"

    def stem(self, step: int | None) -> str:
        """output_name_000400 during training; output_name alone for one-off sampling (step None)."""
        return self.output_name if step is None else f"{self.output_name}_{step:06d}"

    def prompt_kwargs(self, p: SamplePrompt) -> dict:
        cond, neg = self.text.encode([p.prompt]), self.text.encode([p.negative_prompt or ""])
        out = {"prompt_embeds": cond.hidden_states, "negative_prompt_embeds": neg.hidden_states}
        if cond.pooled is not None:
            out.update(pooled_prompt_embeds=cond.pooled, negative_pooled_prompt_embeds=neg.pooled)
        return out

    def seed_of(self, index: int, prompt: SamplePrompt) -> int:
        return prompt.seed if prompt.seed is not None else self.seed + index

    def records(self, step: int | None, base: bool = False) -> list[dict]:
        """What `run` writes for `step`, grid aside: {"path", "prompt", "seed"} per image in the order
        written ("base": true marks the base model's image of a prompt, with `base`)."""
        out = []
        for index, p in enumerate(self.prompts):
            seed = self.seed_of(index, p)
            name = self.file_name(step, index, seed)
            if base:
                out.append({"path": str(self.folder / name.replace(".png", "_base.png")), "prompt": p.prompt,
                            "seed": seed, "base": True})
            out.append({"path": str(self.folder / name), "prompt": p.prompt, "seed": seed})
        return out

    @torch.no_grad()
    def run(self, bundle, unet, device, step: int | None, autocast, set_enabled=None) -> list[tuple[str, Image.Image]]:
        """Make every prompt's image (and, with compare_base, the base model's for the same seed, the
        LoRA switched off through `set_enabled`); returns (file name, image) pairs, grid last."""
        saved = rng_state()
        was_training = unet.training
        unet.eval()
        results = []
        try:
            # The prompts are encoded first, with only the text encoders moved to the device, and the
            # images made after they left, with only the VAE there (SDXL's encoders are 1.6 GiB
            # in bf16: never beside the training state, the VAE and a decode at once).
            compare = self.compare_base and set_enabled is not None
            with on_device(bundle.text_encoders, device), autocast():
                encoded = [self.prompt_kwargs(p) for p in self.prompts]
                if compare:  # the base text encoders' own encoding
                    with _lora_off(set_enabled):
                        base_encoded = [self.prompt_kwargs(p) for p in self.prompts]
            with on_device([bundle.vae], device), autocast():
                for index, p in enumerate(self.prompts):
                    sampler = p.sampler or self.default_sampler
                    scheduler = make_scheduler(sampler, bundle.scheduler_config, self.v_prediction,
                                               self.zero_terminal_snr)
                    pipe = build_pipeline(bundle, unet, scheduler)
                    seed = self.seed_of(index, p)
                    width = p.width or self.default_size[0]
                    height = p.height or self.default_size[1]
                    def generate(kwargs: dict):
                        gen = torch.Generator(device="cpu").manual_seed(seed)
                        latents = pipe(**kwargs, width=width,
                                       height=height, num_inference_steps=p.steps, guidance_scale=p.scale,
                                       generator=gen, output_type="latent").images
                        return decode(pipe, latents, self.vae_tiling)[0]

                    if compare:
                        with _lora_off(set_enabled):
                            base = generate(base_encoded[index])
                        results.append((self.file_name(step, index, seed).replace(".png", "_base.png"), base))
                    results.append((self.file_name(step, index, seed), generate(encoded[index])))
        finally:
            unet.train(was_training)
            set_rng_state(saved)
            if device.type == "cuda":  # the round's blocks go back: training cannot reuse them as one
                torch.cuda.empty_cache()
        self.folder.mkdir(parents=True, exist_ok=True)
        for name, image in results:
            with atomic_path(self.folder / name) as tmp:
                image.save(tmp, format="PNG")
        if self.compare_base and set_enabled is not None:
            sheet = grid([img for _, img in results], columns=2, row_labels=[p.prompt for p in self.prompts],
                         column_labels=["base model", "with LoRA"])
        else:
            sheet = grid([img for _, img in results])
        with atomic_path(self.folder / f"{self.stem(step)}_grid.png") as tmp:
            sheet.save(tmp, format="PNG")
        return results + [(f"{self.stem(step)}_grid.png", sheet)]


def to_array(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))
