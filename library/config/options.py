"""The trainer's options, table by table.

Names follow kohya sd-scripts wherever kohya has the option, so users can bring their habits and
most of their config files. Every option of the flat tables below can be set in its table, at the
top level of the TOML file, or on the command line as `--name value`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, Union

from library.config import network_kinds
from library.config.schema import option

# Names of UNet block groups accepted by [apt] rs_layers/aa_layers, and the path prefix each stands for.
LAYER_ALIASES = {"all": "", "down": "down_blocks.", "mid": "mid_block.", "up": "up_blocks."}
# network_args of the options only some network kinds read ("factor, " for LoKr's lokr_factor).
_KIND_ARGS = "".join(f"{o.arg}, " for o in network_kinds.kind_options().values())


@dataclass(frozen=True)
class ModelOptions:
    pretrained_model_name_or_path: str = option(
        None, "base model: a diffusers folder or a single-file .safetensors (SD1.x, SD2.x or SDXL)", required=True)
    model_arch: str = option(
        "auto", "model family: auto detects it from the checkpoint; or sd1, sd2, sdxl (any registered family, "
                "checked when the model is planned)", kohya=False)
    model_config: Optional[str] = option(
        None, "diffusers folder with the configs of a single-file model whose architecture is not a shipped one",
        kohya=False)
    vae: Optional[str] = option(None, "separate VAE: a .safetensors file (original or diffusers keys) or a diffusers folder")
    v_parameterization: bool = option(False, "train with v-prediction targets (SD2.x 768-v style models)")
    allow_pickle: bool = option(
        False, "allow loading pickled .ckpt/.pt/.bin checkpoints (they can run arbitrary code)", kohya=False)


@dataclass(frozen=True)
class NetworkOptions:
    # the kinds and their network_args come from the table (library.config.network_kinds)
    network_type: str = option(
        network_kinds.DEFAULT_KIND, f"adapter: {network_kinds.summary()}; files in LyCORIS's layout, which WebUIs "
                                    "load", choices=network_kinds.kind_names, kohya=False)
    network_module: Literal["networks.lora", "lycoris.kohya"] = option(
        "networks.lora", "kohya's spelling of the network: networks.lora, or lycoris.kohya with "
                         "network_args = [\"algo=loha\", ...] (mapped to network_type and the options here)")
    network_args: tuple[str, ...] = option(
        (), f'kohya\'s "key=value" network arguments: algo ({", ".join(network_kinds.algorithms())}), conv_dim, '
            f"conv_alpha, {_KIND_ARGS}dora_wd / use_dora, dropout; each mapped to the option of the same meaning")
    network_dim: int = option(16, "LoRA rank of the linear layers", ge=1)
    network_alpha: Optional[float] = option(
        None, "LoRA alpha (scale = alpha / dim); unset = network_dim, i.e. scale 1. Written to the file as trained",
        gt=0)
    network_dropout: float = option(0.0, "dropout probability on the LoRA branch input during training", ge=0, lt=1)
    conv_dim: Optional[int] = option(
        None, "also train LoRA on ResNet, down- and upsampler convolutions (LoCon) with this rank", ge=1)
    conv_alpha: Optional[float] = option(None, "alpha of the convolution LoRA; unset = conv_dim", gt=0)
    lokr_factor: int = option(
        -1, "LoKr: split each layer's input and output size as factor x (size / factor); -1 picks the most "
            "balanced split per layer. The factor must divide every trained layer's sizes", kohya=False)
    network_train_unet_only: bool = option(True, "train the UNet only; false also trains the text encoder(s)")
    network_weights: Optional[str] = option(None, "start from this kohya-format LoRA file (same dim and targets)")
    network_weights_partial: bool = option(
        False, "let network_weights start only the layers it fits (others start fresh); unset = a file that does "
               "not fit every trained layer is refused", kohya=False)

    @property
    def alpha(self) -> float:
        return float(self.network_dim) if self.network_alpha is None else self.network_alpha

    @property
    def conv_alpha_value(self) -> float | None:
        if self.conv_dim is None:
            return None
        return float(self.conv_dim) if self.conv_alpha is None else self.conv_alpha


@dataclass(frozen=True)
class OptimizerOptions:
    optimizer_type: Literal["AdamW", "AdamW8bit", "PagedAdamW", "PagedAdamW8bit", "PagedAdamW32bit", "Lion",
                            "Lion8bit", "PagedLion8bit", "Prodigy", "Adafactor", "SGD"] = option(
        "AdamW", "optimizer; AdamW8bit, Lion8bit and the Paged* ones (state in paged GPU memory) need bitsandbytes, "
                 "Lion lion-pytorch, Prodigy prodigyopt")
    optimizer_args: Union[tuple[str, ...], dict] = option(
        (), 'extra optimizer arguments: "key=value" strings as in kohya (["weight_decay=0.01", "betas=(0.9,0.99)"]) '
            "or a table ({ weight_decay = 0.01 })")
    learning_rate: float = option(1e-4, "learning rate (default for every parameter group)", gt=0)
    unet_lr: Optional[float] = option(None, "learning rate of the UNet LoRA; unset = learning_rate", gt=0)
    text_encoder_lr: Optional[tuple[float, ...]] = option(
        None, "learning rate of the text-encoder LoRA; one value, or [te1, te2] for SDXL; unset = learning_rate", gt=0)
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts",
                          "polynomial"] = option("constant", "learning-rate schedule over the training steps")
    lr_warmup_steps: Union[int, float] = option(
        0, "warm-up steps from 0 to the learning rate; a value below 1 is a fraction of the training steps", ge=0)
    lr_scheduler_num_cycles: int = option(1, "restarts of cosine_with_restarts", ge=1)
    lr_scheduler_power: float = option(1.0, "power of the polynomial schedule", gt=0)
    max_grad_norm: float = option(1.0, "clip the gradient norm to this value; 0 disables clipping", ge=0)

    def text_encoder_lrs(self, count: int) -> list[float]:
        """Learning rate of each of `count` text encoders."""
        if not self.text_encoder_lr:
            return [self.learning_rate] * count
        values = list(self.text_encoder_lr)
        return (values + [values[-1]] * count)[:count]


@dataclass(frozen=True)
class TrainingOptions:
    max_train_steps: int = option(1600, "number of optimizer steps", ge=1)
    max_train_epochs: Optional[int] = option(None, "train this many epochs instead (overrides max_train_steps)", ge=1)
    train_batch_size: int = option(1, "batch size where the dataset does not set batch_size", ge=1)
    gradient_accumulation_steps: int = option(1, "micro-batches per optimizer step", ge=1)
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = option(
        "auto", "auto = bf16 on GPUs that support it, fp16 on older GPUs, no (fp32) on CPU")
    seed: int = option(42, "random seed: the same seed and config give the same LoRA", ge=0)
    clip_skip: int = option(1, "use the output of the n-th last text-encoder layer (SD1.x/2.x; 2 for anime models)",
                            ge=1)
    prior_loss_weight: float = option(1.0, "loss weight of regularisation images (is_reg subsets)", ge=0)
    noise_offset: float = option(0.0, "add this much per-channel constant noise (brighter darks and lighter lights)",
                                 ge=0)
    multires_noise_iterations: int = option(0, "pyramid (multi-resolution) noise levels; 0 = off", ge=0)
    multires_noise_discount: float = option(0.3, "weight decay per pyramid noise level", gt=0, le=1)
    min_snr_gamma: Optional[float] = option(None, "Min-SNR loss weighting with this gamma (5 is common)", gt=0)
    zero_terminal_snr: bool = option(False, "rescale the noise schedule to zero terminal SNR (use with v-prediction)")
    ip_noise_gamma: Optional[float] = option(
        None, "input perturbation: noise the latents with extra noise of this strength (0.1 is common)", gt=0)
    min_timestep: int = option(0, "lowest training timestep", ge=0, le=999)
    max_timestep: int = option(1000, "highest training timestep (exclusive)", ge=1, le=1000)
    gradient_checkpointing: bool = option(False, "recompute activations in backward to save memory")
    attention: Literal["sdpa", "xformers"] = option(
        "sdpa", "attention kernel; xformers needs the xformers package and a CUDA GPU", kohya=False)
    apt: bool = option(False, "train with APT (adaptive augmentation and loss weighting, representation "
                              "stabilisation, attention alignment); its settings are the [apt] table", kohya=False)
    full_bf16: bool = option(False, "keep the LoRA weights and optimizer state in bf16 too (needs mixed_precision "
                                    "bf16; saves memory, slightly less precise)")
    no_half_vae: Optional[bool] = option(
        None, "keep the VAE in fp32; unset = fp32 for the SDXL VAE under fp16 (it overflows), else the training "
              "precision")
    skip_nan_steps: bool = option(False, "skip an optimizer step whose loss is NaN/inf instead of stopping", kohya=False)
    max_data_loader_n_workers: int = option(
        2, "background processes decoding images ahead of the GPU (0 = in the main process; unused with cached "
           "latents)", ge=0)
    ddp_timeout: int = option(
        180, "minutes a process waits for the others (multi-GPU) before the job fails; long enough for the main "
             "process's disk caching, sample rounds and saves (accelerate's default is 10 minutes)", ge=1)
    cpu_threads: int = option(
        0, "torch threads per process when training on the CPU (0 = the cores divided among the processes on "
           "this machine; accelerate launch alone would start one thread)", ge=0, kohya=False)
    validate_every_n_steps: Optional[int] = option(
        None, "validation loss on the validation_split images every N steps (and at start and end)", ge=1,
        kohya=False)
    validation_timesteps: tuple[int, ...] = option(
        (100, 300, 500, 700, 900), "timesteps at which the validation loss is measured (fixed noise per image)",
        ge=0, le=999, kohya=False)


@dataclass(frozen=True)
class DataOptions:
    dataset_config: Optional[str] = option(
        None, "kohya-style dataset TOML ([general], [[datasets]], [[datasets.subsets]]); "
              "or put those tables in this config")
    train_data_dir: Optional[str] = option(
        None, "kohya folder convention instead of a dataset config: subfolders named N_tokens "
              "(e.g. 10_sks dog = 10 repeats, caption fallback \"sks dog\")")
    reg_data_dir: Optional[str] = option(None, "regularisation images in N_tokens subfolders (with train_data_dir)")
    cache_latents: bool = option(False, "encode every image once before training and keep the latents in memory")
    cache_latents_to_disk: bool = option(
        False, "keep the latent cache on disk between runs (implies cache_latents); entries are keyed on the image, "
               "its bucket and crop, and the VAE, so stale entries are never used")
    vae_batch_size: int = option(
        1, "images per VAE call while caching latents; more is a little faster but needs more GPU memory (SDXL at "
           "1024 px: several GiB per image in fp32, on top of the model already on the GPU)", ge=1)
    latent_cache_dir: Optional[str] = option(
        None, "folder for the disk latent cache; unset = a .latent_cache folder inside each image folder", kohya=False)
    cache_text_encoder_outputs: bool = option(
        False, "encode every caption once before training (frozen text encoders and fixed captions only); "
               "the text encoders then leave the GPU")
    skip_bad_images: bool = option(
        False, "skip unreadable images with a warning instead of stopping before training", kohya=False)


@dataclass(frozen=True)
class SavingOptions:
    output_dir: str = option("output", "folder for the LoRA file (created if missing)")
    output_name: str = option("lora", "file name of the LoRA, without .safetensors")
    save_precision: Literal["float", "fp16", "bf16"] = option("fp16", "dtype of the saved LoRA tensors")
    save_every_n_steps: Optional[int] = option(None, "also save the LoRA every N steps (name-00000N.safetensors)",
                                               ge=1)
    save_every_n_epochs: Optional[int] = option(None, "also save the LoRA every N epochs (name-00000N.safetensors)",
                                                ge=1)
    save_last_n_steps: Optional[int] = option(
        None, "keep only the step saves of the last N steps (older ones are deleted)", ge=1)
    save_last_n_epochs: Optional[int] = option(None, "keep only the last N epoch saves (older ones are deleted)", ge=1)
    save_state: bool = option(False, "with every save, write the training state (optimizer, schedule, data position, "
                                     "step) to a -state folder for resume")
    resume: Optional[str] = option(
        None, 'continue from a state folder, or "latest" for the newest one in output_dir (a damaged newest state '
              'stops the run), or "latest_intact" for the newest intact one (damaged newer ones are skipped)')


@dataclass(frozen=True)
class SamplingOptions:
    sample_prompts: Optional[str] = option(
        None, "prompts for sample images: kohya's text format (one per line, --n --w --h --s --l --d --ss), "
              ".toml or .json")
    sample_every_n_steps: Optional[int] = option(None, "make sample images every N steps", ge=1)
    sample_every_n_epochs: Optional[int] = option(None, "make sample images every N epochs", ge=1)
    sample_at_first: bool = option(False, "make sample images before training starts (the base model's output)")
    sample_sampler: Literal["euler_a", "euler", "ddim", "dpm++_2m", "dpm++_2m_karras"] = option(
        "euler_a", "sampler of the sample images (a prompt's --ss overrides it)")
    sample_compare_base: bool = option(
        False, "also render each prompt with the LoRA off (same seed), side by side in the grid", kohya=False)
    sample_vae_tiling: bool = option(
        False, "decode sample images in overlapping 512 px tiles (a fraction of the VAE's memory at 1024 px and "
               "above; tile seams are blended)", kohya=False)


@dataclass(frozen=True)
class LoggingOptions:
    log_with: Literal["none", "tensorboard", "wandb", "all"] = option(
        "tensorboard", "where to log losses, learning rates and samples; wandb needs the wandb package")
    logging_dir: Optional[str] = option(None, "folder of the logs; unset = output_dir/logs")


@dataclass(frozen=True)
class AptOptions:
    """The [apt] table: every choice APT leaves open (docs/apt.md). Used when apt = true."""
    bins: int = option(10, "timestep bins of the overfitting indicator", ge=2, le=100)
    ema_alpha: float = option(0.1, "EMA rate of the per-bin losses behind the indicator", gt=0, le=1)
    indicator: Literal["relative", "paper"] = option(
        "relative", "overfitting indicator: \"relative\" reads the loss gap as a fraction of the reference loss "
                    "(scale-free: the same default for every model); \"paper\" reads the absolute gap, as the APT "
                    "paper")
    indicator_scale: Optional[float] = option(
        None, "k: gamma = 1 - (L_theta / L_ref)^k for the relative indicator (unset = 0.5), 1 - exp(-k * "
              "(L_ref - L_theta)) for the paper's (unset = the number of training timesteps, 1000)", gt=0)
    reference_every: int = option(
        4, "run the reference pass, the RS/AA terms and the indicator update every N-th step only; the steps "
           "between train with the last indicator (cheaper; 1 = every step, as the paper)", ge=1)
    indicator_includes_reg: bool = option(False, "let regularisation images update the indicator too")
    augment: bool = option(True, "adaptive augmentation: zoom-out and rotation with probability min(gamma, p_max)")
    p_max: float = option(0.8, "highest augmentation probability", ge=0, le=1)
    zoom_max: float = option(3.0, "largest zoom-out factor (the image shrinks to 1/zoom)", ge=1)
    rotation_max: float = option(15.0, "largest rotation in degrees, either way", ge=0, le=180)
    augment_space: Literal["latent", "pixel"] = option(
        "latent", "transform latents (works with cached latents) or pixels before the VAE")
    augment_fill: Literal["black", "zeros"] = option(
        "black", "fill of the uncovered border: the latent of black pixels (black pixels in pixel space), or zeros")
    loss_weighting: bool = option(True, "adaptive loss weighting: each sample's loss times (1 - gamma)")
    min_weight: float = option(0.0, "floor of the adaptive loss weight (the paper: 0)", ge=0, le=1)
    rs: bool = option(True, "representation stabilisation: match feature mean/std to the frozen model")
    lambda_dist: float = option(1.0, "weight of the representation-stabilisation loss", ge=0)
    rs_layers: tuple[str, ...] = option(
        ("all",), 'self-attention layers for RS: "all", "down", "mid", "up" or path prefixes like "up_blocks.1"')
    rs_features: Literal["output", "qkv"] = option(
        "output", "statistics of each attn1 output, or of its Q, K and V projections")
    aa: bool = option(True, "attention alignment: match cross-attention maps to the frozen model")
    lambda_attn: float = option(1.0, "weight of the attention-alignment loss", ge=0)
    aa_layers: tuple[str, ...] = option(
        ("all",), 'cross-attention layers for AA: "all", "down", "mid", "up" or path prefixes')
    aa_distance: Literal["mse", "kl", "logits"] = option(
        "mse", "distance between attention maps: squared error of probabilities, KL(ref || tuned), or squared "
               "error of logits")
    aa_exclude_padding: bool = option(True, "leave out the padding tokens after the end of the caption")
    aa_exclude_token: Optional[str] = option(
        None, "leave out this word's tokens too (e.g. the trigger word, free to change its attention)")


# Flat tables: table name -> options class. Their option names are unique across all of them.
FLAT_TABLES: dict[str, type] = {
    "model": ModelOptions,
    "network": NetworkOptions,
    "optimizer": OptimizerOptions,
    "training": TrainingOptions,
    "data": DataOptions,
    "saving": SavingOptions,
    "sampling": SamplingOptions,
    "logging": LoggingOptions,
}
# Named tables: their options are addressed as `table.option` on the command line.
NAMED_TABLES: dict[str, type] = {"apt": AptOptions}
