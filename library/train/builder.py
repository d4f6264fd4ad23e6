"""Everything a training run needs, built in one explicit order.

The order matters and is written down here once: the data is scanned before any weights load;
the models are placed and the attention kernel chosen before the network is injected; the VAE is
on the device for APT's black border latent and for latent caching, which then parks it on the
CPU; the models are wrapped by accelerate before the text cache encodes through them; the
training method is chosen last, from the parts it extends.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from library.config import Config
from library.data.dataset import TrainingData
from library.data.latent_cache import LatentCache
from library.data.summary import log_dataset
from library.data.text_cache import TextCache
from library.errors import UserError
from library.lora.network import LoraNetwork, NetworkSpec
from library.lora.compat import network_target, read_checked
from library.models.conditioning import TextConditioner
from library.models.loader import ModelBundle, load_models, plan_model
from library.train.batches import BatchBuilder, StepPlan, VaeEncoder
from library.train.denoiser import Conditions, Denoiser
from library.train.diffusion import Diffusion
from library.train.method import TrainingMethod
from library.train.optimizers import build_optimizer
from library.train.schedules import build_scheduler
from library.train.setup import DTYPES, make_accelerator, set_attention, vae_dtype
from library.train.tracking import trackers_for
from library.train.validation import Validator

log = logging.getLogger(__name__)


@dataclass
class TrainingRun:
    cfg: Config
    accelerator: object
    precision: str
    data: TrainingData
    plan: StepPlan
    total_steps: int
    bundle: ModelBundle
    network: LoraNetwork
    batches: BatchBuilder
    optimizer: object
    scheduler: object
    wrapped: list                # the trained models as accelerate wrapped them (UNet, trained text encoders)
    denoiser: Denoiser
    method: TrainingMethod
    validator: Validator


def build_run(cfg: Config) -> TrainingRun:
    training = cfg.training
    logging_dir = cfg.logging.logging_dir or str(Path(cfg.saving.output_dir) / "logs")
    acc, precision = make_accelerator(cfg, trackers_for(cfg.logging.log_with), logging_dir)
    if training.full_bf16 and precision != "bf16":
        raise UserError('full_bf16 needs mixed_precision = "bf16" (this run uses "%s")' % precision)

    # 1. The dataset is scanned (and every image decoded once) before any weights load.
    model_plan = plan_model(cfg.model)
    data = TrainingData(cfg.dataset, native_resolution=model_plan.native_resolution,
                        default_batch_size=training.train_batch_size, seed=training.seed,
                        skip_bad_images=cfg.data.skip_bad_images)
    if acc.is_main_process:
        log_dataset(data)
    plan = StepPlan(data, training.gradient_accumulation_steps, acc.num_processes, acc.process_index)
    total_steps = (training.max_train_epochs * plan.steps_per_epoch if training.max_train_epochs
                   else training.max_train_steps)

    # 2. Models on the device in their dtypes, the attention kernel, then the network.
    bundle = load_models(cfg.model, model_plan)
    check_buckets(bundle, data)
    trains_text = not cfg.network.network_train_unet_only
    place_models(bundle, acc.device, DTYPES[precision], vae_dtype(training.no_half_vae, bundle.is_sdxl, precision))
    set_attention(bundle.unet, training.attention, acc.device)
    network = inject_network(cfg, bundle, trains_text)

    # 3. The VAE is on the device: APT's border fill, then the latent cache (which parks the VAE).
    encoder = VaeEncoder(bundle.vae, acc.device)
    fill = None
    if training.apt:
        from library.train.apt_method import black_fill

        fill = black_fill(encoder)
    batches = BatchBuilder(data, encoder, training.prior_loss_weight, latent_cache(cfg, data, encoder, acc, bundle))

    # 4. Optimizer, accelerate's wrappers, text conditioning (the text cache parks the encoders).
    optimizer = build_optimizer(cfg.optimizer.optimizer_type, cfg.optimizer.optimizer_args,
                                parameter_groups(cfg, network, len(bundle.text_encoders), trains_text),
                                cfg.optimizer.learning_rate)
    models = [bundle.unet] + (bundle.text_encoders if trains_text else [])
    prepared = acc.prepare(*models, optimizer)
    unet, optimizer = prepared[0], prepared[-1]
    # Training passes go through the DDP wrappers so that gradients are synchronised.
    train_encoders = list(prepared[1:-1]) if trains_text else bundle.text_encoders
    frozen_text = TextConditioner(bundle.arch, bundle.tokenizers, bundle.text_encoders, training.clip_skip)
    train_text = TextConditioner(bundle.arch, bundle.tokenizers, train_encoders, training.clip_skip) if trains_text \
        else frozen_text
    conditions = Conditions(train_text, frozen_text, trains_text, bundle.is_sdxl, acc.device,
                            text_cache(cfg, data, frozen_text, acc, bundle))
    diffusion = Diffusion(
        bundle.scheduler_config, cfg.model.v_parameterization, zero_terminal_snr=training.zero_terminal_snr,
        noise_offset=training.noise_offset, multires_iterations=training.multires_noise_iterations,
        multires_discount=training.multires_noise_discount, ip_noise_gamma=training.ip_noise_gamma,
        min_snr_gamma=training.min_snr_gamma, min_timestep=training.min_timestep, max_timestep=training.max_timestep)
    if training.zero_terminal_snr and not cfg.model.v_parameterization:
        log.warning("zero_terminal_snr without v_parameterization: an epsilon model cannot learn the last step")
    denoiser = Denoiser(diffusion, unet, bundle.unet, conditions, acc.device)

    # 5. The training method, from the parts it extends.
    method = TrainingMethod()
    if training.apt:
        from library.train.apt_method import make_apt

        def gather(rows: torch.Tensor) -> torch.Tensor:
            if acc.num_processes == 1:
                return rows
            return acc.gather(acc.pad_across_processes(rows.to(acc.device), dim=0, pad_index=0)).cpu()

        method = make_apt(cfg.apt, bundle, bundle.unet, denoiser, encoder, fill, network.set_enabled, trains_text,
                          xformers=training.attention == "xformers", gather=gather, settings=asdict(cfg.apt))
    scheduler = build_scheduler(cfg.optimizer.lr_scheduler, optimizer, total_steps, cfg.optimizer.lr_warmup_steps,
                                cfg.optimizer.lr_scheduler_num_cycles, cfg.optimizer.lr_scheduler_power)
    validator = Validator(data.validation, training.validation_timesteps, training.seed)
    return TrainingRun(cfg, acc, precision, data, plan, total_steps, bundle, network, batches, optimizer, scheduler,
                       list(prepared[:-1]), denoiser, method, validator)


def check_buckets(bundle: ModelBundle, data: TrainingData) -> None:
    if bundle.is_sdxl:
        for spec in data.specs:
            if spec.enable_bucket and spec.bucket_reso_steps % 32:
                log.warning("bucket_reso_steps = %d is not a multiple of 32; SDXL may produce artefacts",
                            spec.bucket_reso_steps)
    factor = bundle.vae_scale_factor * 2 ** (len(bundle.unet.config.block_out_channels) - 1)
    for w, h, _ in data.bucket_table():
        if w % factor or h % factor:
            raise UserError(f"bucket {w}x{h} is not divisible by {factor}, which this model needs; use "
                            f"resolution and bucket_reso_steps multiples of {factor}")


def place_models(bundle: ModelBundle, device: torch.device, dtype: torch.dtype, vae: torch.dtype) -> None:
    bundle.unet.to(device, dtype)
    bundle.vae.to(device, vae)
    for te in bundle.text_encoders:
        te.to(device, dtype)


def inject_network(cfg: Config, bundle: ModelBundle, trains_text: bool) -> LoraNetwork:
    net, training = cfg.network, cfg.training
    torch.manual_seed(training.seed)  # LoRA initialisation
    network = LoraNetwork(bundle.unet, bundle.text_encoders, bundle.arch, NetworkSpec.from_options(net, trains_text))
    if training.full_bf16:
        for p in network.parameters():
            p.data = p.data.to(torch.bfloat16)
    if net.network_weights:
        weights, _ = read_checked(net.network_weights, network_target(network, "the network being trained"),
                                  net.network_weights_partial, "set network_weights_partial = true")
        network.load_modules(weights.modules, net.network_weights, allow_missing=net.network_weights_partial)
        log.info("continuing from %s (%s layout)", net.network_weights, weights.style)
    if training.gradient_checkpointing:
        bundle.unet.enable_gradient_checkpointing()
        if trains_text:
            for te in bundle.text_encoders:
                te.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    bundle.unet.train()
    for te in bundle.text_encoders:
        te.train(trains_text)
    return network


def parameter_groups(cfg: Config, network: LoraNetwork, encoders: int, trains_text: bool) -> list[dict]:
    opt = cfg.optimizer
    groups = [{"params": list(network.parameters("unet")), "lr": opt.unet_lr or opt.learning_rate, "name": "unet"}]
    if trains_text:
        for i, lr in enumerate(opt.text_encoder_lrs(encoders)):
            groups.append({"params": list(network.parameters(f"te{i + 1}")), "lr": lr, "name": f"te{i + 1}"})
    return groups


def latent_cache(cfg: Config, data: TrainingData, encoder: VaeEncoder, acc, bundle: ModelBundle) -> LatentCache | None:
    opts = cfg.data
    if not (opts.cache_latents or opts.cache_latents_to_disk):
        return None
    cache = LatentCache(data, encoder, encoder.identity(), to_disk=opts.cache_latents_to_disk,
                        cache_dir=opts.latent_cache_dir, batch_size=opts.vae_batch_size)
    shared = opts.cache_latents_to_disk and acc.num_processes > 1
    if shared and not acc.is_main_process:
        acc.wait_for_everyone()  # the main process writes the disk entries first, the others read them
    with tqdm(total=len(cache.wanted()), desc="caching latents", disable=not acc.is_main_process) as bar:
        cache.fill(bar.update)
    if shared and acc.is_main_process:
        acc.wait_for_everyone()
    if acc.is_main_process:
        log.info("latent cache: %d encoded, %d reused from disk", cache.encoded, cache.hits)
    bundle.vae.to("cpu")  # no longer needed on the device
    return cache


def text_cache(cfg: Config, data: TrainingData, conditioner: TextConditioner, acc, bundle: ModelBundle):
    if not cfg.data.cache_text_encoder_outputs:
        return None
    cache = TextCache(data, conditioner.encode)
    with acc.autocast():
        cache.fill()
    for te in bundle.text_encoders:
        te.to("cpu")
    return cache
