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
    block_dims: Optional[tuple[int, ...]] = option(
        None, "rank of each UNet block's linear layers, one value per kohya block: 25 for SD1.x/2.x (IN00-IN11, "
              "MID, OUT00-OUT11), 23 for SDXL (BASE, IN00-IN08, MID00-MID02, OUT00-OUT08, OUT; the original "
              "UNet's block lists); 0 = no LoRA in that block. The text encoders keep network_dim", ge=0)
    block_alphas: Optional[tuple[float, ...]] = option(
        None, "alpha of each block (as block_dims); unset = network_alpha, or each block's rank when that is "
              "unset too", ge=0)
    conv_block_dims: Optional[tuple[int, ...]] = option(
        None, "rank of each block's 3x3 convolutions (as block_dims; trains them as conv_dim does)", ge=0)
    conv_block_alphas: Optional[tuple[float, ...]] = option(
        None, "alpha of each block's 3x3 convolutions; unset = conv_alpha, or each block's conv rank", ge=0)
    down_lr_weight: Optional[Union[tuple[float, ...], str]] = option(
        None, "learning-rate factor of each input block (IN00..., shallow to deep; missing values are 1), or "
              "a curve: \"cosine\", \"sine\", \"linear\", \"reverse_linear\", \"zeros\", with \"+0.5\" added "
              "to every value. Each block becomes its own optimizer parameter group (lr/unet_IN04 in the logs)")
    mid_lr_weight: Optional[tuple[float, ...]] = option(
        None, "learning-rate factor of the middle block (SDXL: of MID00-MID02)")
    up_lr_weight: Optional[Union[tuple[float, ...], str]] = option(
        None, "learning-rate factor of each output block (OUT00..., deep to shallow), or a curve as down_lr_weight")
    block_lr_zero_threshold: float = option(
        0.0, "block learning-rate factors at or below this become 0, and those blocks get no LoRA at all", ge=0)
    loraplus_lr_ratio: Optional[float] = option(
        None, "LoRA+: the up (B) matrices learn this many times faster than the down (A) ones (16 is common); "
              "separate parameter groups, shown as lr/<group>_plus", gt=0)
    loraplus_unet_lr_ratio: Optional[float] = option(None, "LoRA+ ratio of the UNet (unset = loraplus_lr_ratio)",
                                                     gt=0)
    loraplus_text_encoder_lr_ratio: Optional[float] = option(
        None, "LoRA+ ratio of the text encoders (unset = loraplus_lr_ratio)", gt=0)
    rank_dropout: float = option(
        0.0, "during training, drop each rank of a LoRA module with this probability per sample (the rest "
             "scaled up to keep the mean)", ge=0, lt=1)
    module_dropout: float = option(
        0.0, "during training, skip a whole LoRA module with this probability per step", ge=0, lt=1)
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


# The optimizers built in by name (library.train.optimizers has their classes).
OPTIMIZER_NAMES = ("AdamW", "AdamW8bit", "PagedAdamW", "PagedAdamW8bit", "PagedAdamW32bit", "Lion", "Lion8bit",
                   "PagedLion8bit", "Prodigy", "Adafactor", "SGD")


@dataclass(frozen=True)
class OptimizerOptions:
    optimizer_type: str = option(
        "AdamW", f"optimizer: {', '.join(OPTIMIZER_NAMES)} (any case), or a class as \"package.module.Class\" "
                 "(kohya's spelling; bitsandbytes.optim.AdamW8bit and prodigyopt.Prodigy are the built-in ones); "
                 "AdamW8bit, Lion8bit and the Paged* ones (state in paged GPU memory) need bitsandbytes, Lion "
                 "lion-pytorch, Prodigy prodigyopt")
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
    lr_scheduler_type: Optional[str] = option(
        None, "a scheduler class instead of lr_scheduler, as \"package.module.Class\" (e.g. "
              "\"torch.optim.lr_scheduler.CosineAnnealingLR\"), built with the optimizer and lr_scheduler_args and "
              "stepped once per optimizer step (lr_warmup_steps does not apply)")
    lr_scheduler_args: Union[tuple[str, ...], dict] = option(
        (), 'arguments of lr_scheduler_type: "key=value" strings as in kohya (["T_max=1000", "eta_min=1e-6"]) or a '
            "table")
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
    loss_type: Literal["l2", "l1", "huber", "smooth_l1"] = option(
        "l2", "element-wise loss: l2 (squared error), l1, or kohya's pseudo-Huber huber / smooth_l1 with the "
              "threshold of huber_schedule")
    huber_schedule: Literal["constant", "exponential", "snr"] = option(
        "snr", "threshold c of huber / smooth_l1 per timestep: constant (huber_c * huber_scale), exponential "
               "(huber_scale at t = 0 down to huber_c * huber_scale at t = T), snr ((1 - huber_c) / (1 + sigma)^2 "
               "+ huber_c)")
    huber_c: float = option(0.1, "the Huber threshold parameter of huber_schedule", gt=0, le=1)
    huber_scale: float = option(1.0, "scale of the constant and exponential Huber thresholds", gt=0)
    debiased_estimation_loss: bool = option(
        False, "weight each sample's loss by 1 / sqrt(SNR) (1 / (SNR + 1) with v-prediction): debiased estimation")
    scale_v_pred_loss_like_noise_pred: bool = option(
        False, "v-prediction: weight the loss by SNR / (SNR + 1), so each timestep weighs as with noise prediction")
    v_pred_like_loss: Optional[float] = option(
        None, "add this much of a v-prediction-like loss: each sample's loss times 1 + value * (SNR + 1) / SNR",
        gt=0)
    timestep_sampling: Literal["uniform", "logit_normal", "sigmoid", "shift"] = option(
        "uniform", "distribution of the training timesteps in [min_timestep, max_timestep): uniform; logit_normal "
                   "(sigmoid of a normal with logit_mean, logit_std); sigmoid (sigmoid of sigmoid_scale times a "
                   "standard normal); shift (sigmoid, then moved towards noise by timestep_shift)")
    logit_mean: float = option(0.0, "mean of the normal of timestep_sampling = \"logit_normal\" (> 0: noisier)")
    logit_std: float = option(1.0, "standard deviation of the normal of timestep_sampling = \"logit_normal\"", gt=0)
    sigmoid_scale: float = option(1.0, "scale of the normal of timestep_sampling = \"sigmoid\" and \"shift\"", gt=0)
    timestep_shift: float = option(
        3.0, "shift of timestep_sampling = \"shift\": u becomes u * s / (1 + (s - 1) * u) (> 1: noisier)", gt=0,
        kohya=False)
    zero_terminal_snr: bool = option(False, "rescale the noise schedule to zero terminal SNR (use with v-prediction)")
    ip_noise_gamma: Optional[float] = option(
        None, "input perturbation: noise the latents with extra noise of this strength (0.1 is common)", gt=0)
    min_timestep: int = option(0, "lowest training timestep", ge=0, le=999)
    max_timestep: int = option(1000, "highest training timestep (exclusive)", ge=1, le=1000)
    masked_loss: bool = option(
        False, "masked training: a mask image per training image (the subset's conditioning_data_dir, or "
               "<stem>_mask.png beside the image) weighs the loss per pixel; white trains, black does not")
    unmasked_probability: float = option(
        0.0, "masked training: probability that a sample trains without its mask (OneTrainer's; 0.1 is common)",
        ge=0, le=1, kohya=False)
    unmasked_weight: float = option(
        0.0, "masked training: loss weight of the masked-out area (the mask is raised to at least this; "
             "OneTrainer's; 0.1 is common)", ge=0, le=1, kohya=False)
    ema: bool = option(False, "keep an exponential moving average (EMA) of the LoRA weights; every save writes "
                              "it too (name-ema.safetensors) and samples use it", kohya=False)
    ema_decay: float = option(0.999, "EMA decay per update (closer to 1: a longer average)", gt=0, lt=1,
                              kohya=False)
    ema_warmup: bool = option(
        True, "warm the EMA up: update k uses decay min(ema_decay, (1 + k) / (10 + k)), so early weights fade "
              "fast", kohya=False)
    ema_update_every: int = option(1, "update the EMA every N optimizer steps", ge=1, kohya=False)
    ema_device: Literal["device", "cpu"] = option(
        "device", "where the EMA weights live: the training device, or the CPU (saves GPU memory, slower)",
        kohya=False)
    gradient_checkpointing: bool = option(False, "recompute activations in backward to save memory")
    max_token_length: Optional[int] = option(
        None, "caption length in tokens: unset = 75 (one CLIP window); 150 or 225 encode a longer caption as kohya "
              "does, in 75-token chunks each wrapped in BOS/EOS, concatenated (SDXL's pooled output from the first "
              "chunk)", choices=(75, 150, 225))
    attention: Literal["sdpa", "xformers"] = option(
        "sdpa", "attention kernel; xformers needs the xformers package and a CUDA GPU", kohya=False)
    apt: bool = option(False, "train with APT (adaptive augmentation and loss weighting, representation "
                              "stabilisation, attention alignment); its settings are the [apt] table", kohya=False)
    full_bf16: bool = option(False, "keep the LoRA weights and optimizer state in bf16 too (needs mixed_precision "
                                    "bf16; saves memory, slightly less precise)")
    torch_compile: bool = option(False, "compile the UNet with torch.compile (accelerate's dynamo plugin): faster "
                                        "steps after a first slow one; where compiling fails, that part runs "
                                        "uncompiled with a warning")
    dynamo_backend: Literal["inductor", "eager", "aot_eager", "cudagraphs", "no"] = option(
        "inductor", "torch.compile's backend with torch_compile (inductor generates kernels; eager and aot_eager "
                    "only trace, for checking; \"no\", as kohya_ss writes it: not compiled)")
    fp8_base: bool = option(False, "store the frozen UNet's and text encoders' Linear/Conv weights in float8 "
                                   "(one byte per weight, dequantised per layer for its matmul): about half the "
                                   "base weights' memory, slightly less precise")
    fp8_base_unet: bool = option(False, "as fp8_base, for the UNet only (the text encoders stay in the run's dtype)")
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

    # kohya's meaning of the two fp8 keys: fp8_base stores the UNet and the text encoders in float8,
    # fp8_base_unet the UNet alone.
    @property
    def fp8_unet(self) -> bool:
        return self.fp8_base or self.fp8_base_unet

    @property
    def fp8_text_encoders(self) -> bool:
        return self.fp8_base


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
    metadata_title: Optional[str] = option(None, "modelspec.title of the file; unset = output_name")
    metadata_author: Optional[str] = option(None, "modelspec.author of the file")
    metadata_description: Optional[str] = option(None, "modelspec.description of the file")
    metadata_license: Optional[str] = option(None, "modelspec.license of the file")
    metadata_tags: Optional[str] = option(None, "modelspec.tags of the file (comma-separated)")
    metadata_trigger_phrase: Optional[str] = option(None, "modelspec.trigger_phrase of the file")
    metadata_usage_hint: Optional[str] = option(None, "modelspec.usage_hint of the file")
    training_comment: Optional[str] = option(None, "ss_training_comment of the file: a free note")
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
    indicator: Literal["relative", "paper", "views"] = option(
        "relative", "overfitting indicator: \"relative\" compares the tuned model's loss with the base model's, "
                    "as a ratio (scale-free); \"paper\" reads their absolute gap, as the APT paper; \"views\" "
                    "compares the tuned model's loss on the training images with its loss on shifted views of "
                    "them that are never trained on (rises when it memorises, not while it learns)")
    indicator_scale: Optional[float] = option(
        None, "k: gamma = 1 - (L_theta / L_other)^k for the relative and views indicators (unset = 0.5), "
              "1 - exp(-k * (L_ref - L_theta)) for the paper's (unset = the number of training timesteps, 1000)",
        gt=0)
    view_shift: float = option(
        0.1, "views indicator: largest shift of a held-out view, as a fraction of the image (whole pixels, the "
             "image mirrored at its edges)", gt=0, le=0.5)
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
    translate_max: float = option(
        0.0, "largest translation of an augmented image, as a fraction of its size, either way", ge=0, le=0.5)
    augment_fill: Literal["black", "zeros", "reflect"] = option(
        "black", "fill of the uncovered border: the latent of black pixels (black pixels in pixel space), zeros, "
                 "or the image mirrored at its edge (no border)")
    loss_weighting: bool = option(True, "adaptive loss weighting: each sample's loss times (1 - gamma)")
    min_weight: float = option(0.0, "floor of the adaptive loss weight (the paper: 0)", ge=0, le=1)
    regularisers_scale: Literal["constant", "gamma"] = option(
        "constant", "strength of RS and AA: lambda_dist and lambda_attn as set, or times the mean gamma of the "
                    "batch's training images (the regularisers then grow with the indicator)")
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
