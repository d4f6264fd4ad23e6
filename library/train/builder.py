"""Everything a training run needs, built in one explicit order.

The order matters and is written down here once: the data is scanned before any weights load;
the models are placed and the attention kernel chosen before the network is injected; the
training method is built while the VAE is still on the device (APT encodes its black border) and
before latent caching parks the VAE on the CPU; the models are wrapped by accelerate before the
text cache encodes through them; the denoiser is assembled from the model family's objective and
the loss, noise and timestep options; the reporting (tracker, sampler, outputs, metric sources)
comes last, from the parts it reports on.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from library.config import Config
from library.data.dataset import TrainingData
from library.data.latent_cache import LatentCache
from library.data.summary import dataset_summary, log_dataset, tag_frequency
from library.data.text_cache import TextCache
from library.errors import UserError
from library.lora.compat import network_target, read_checked
from library.lora.kohya_file import SAVE_DTYPES
from library.lora.metadata import TrainingFacts
from library.lora.network import LoraNetwork, NetworkSpec
from library.models.loader import ModelBundle, load_models, plan_model
import library.train.apt_method  # noqa: F401  registers APT as a training method
from library.train import metrics as step_metrics
from library.train.batches import BatchBuilder, StepPlan, VaeEncoder
from library.train.denoiser import ConditioningSource, Denoiser
from library.train.diffusion import NoiseSampler, TimestepSampler
from library.train.loss import Loss
from library.train.method import MethodSetup, TrainingMethod, build_method, selected_method
from library.train.optimizers import build_optimizer, optimizer_description
from library.train.output import Outputs, RunHandles
from library.train.prompts import load_prompts
from library.train.sampling import Sampler
from library.train.schedules import build_scheduler
from library.train.setup import DTYPES, make_accelerator, vae_dtype
from library.train.tracking import TimestepLossTable, Tracker, trackers_for
from library.train.validation import Validator

log = logging.getLogger(__name__)


@dataclass
class TrainingRun:
    cfg: Config
    accelerator: object
    precision: str
    trackers: list[str]
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
    method_setup: MethodSetup    # to build another method on the same model (benchmarks)
    method: TrainingMethod
    validator: Validator

    @property
    def device(self) -> torch.device:
        return self.accelerator.device


def build_run(cfg: Config) -> TrainingRun:
    training = cfg.training
    logging_dir = cfg.logging.logging_dir or str(Path(cfg.saving.output_dir) / "logs")
    trackers = trackers_for(cfg.logging.log_with)
    acc, precision = make_accelerator(cfg, trackers, logging_dir)
    if training.full_bf16 and precision != "bf16":
        raise UserError('full_bf16 needs mixed_precision = "bf16" (this run uses "%s")' % precision)

    # 1. The dataset is scanned (and every image decoded once) before any weights load.
    model_plan = plan_model(cfg.model)
    data = TrainingData(cfg.dataset, native_resolution=model_plan.native_resolution,
                        default_batch_size=training.train_batch_size, seed=training.seed,
                        skip_bad_images=cfg.data.skip_bad_images)
    # Before the model loads: every bucket on the model's grid, said per dataset.
    data.check_grid(model_plan.family.latent_multiple(model_plan.unet_config, model_plan.vae_config),
                    model_plan.family.label)
    if acc.is_main_process:
        log_dataset(data)
    plan = StepPlan(data, training.gradient_accumulation_steps, acc.num_processes, acc.process_index)
    total_steps = (training.max_train_epochs * plan.steps_per_epoch if training.max_train_epochs
                   else training.max_train_steps)

    # 2. Models on the device in their dtypes, the attention kernel, then the network.
    bundle = load_models(cfg.model, model_plan)
    family = bundle.family
    check_buckets(bundle, data)
    trains_text = not cfg.network.network_train_unet_only
    place_models(bundle, acc.device, DTYPES[precision],
                 vae_dtype(training.no_half_vae, family.vae_overflows_in_fp16, precision))
    family.use_attention_backend(bundle.unet, training.attention, acc.device)
    network = inject_network(cfg, bundle, trains_text)

    # 3. The training method, while the VAE is on the device; then the latent cache (which parks it).
    encoder = VaeEncoder(bundle.vae, acc.device)
    objective = family.objective(bundle.scheduler_config, cfg.model.v_parameterization, training.zero_terminal_snr)
    setup = MethodSetup(cfg, family, bundle.unet, bundle.tokenizers, objective.num_timesteps, encoder,
                        gatherer(acc), trains_text)
    method = build_method(selected_method(cfg), setup)
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
    local_text = family.caption_encoder(bundle.tokenizers, bundle.text_encoders, training.clip_skip)
    trained_text = family.caption_encoder(bundle.tokenizers, train_encoders, training.clip_skip) if trains_text \
        else local_text
    conditioning = ConditioningSource(trained_text, local_text, trains_text, acc.device,
                                      text_cache(cfg, data, local_text, acc, bundle))

    # 5. The denoiser: the family's objective, the noise, timestep and loss options.
    if training.zero_terminal_snr and not cfg.model.v_parameterization:
        log.warning("zero_terminal_snr without v_parameterization: an epsilon model cannot learn the last step")
    denoiser = Denoiser(family, unet, bundle.unet, conditioning, objective, NoiseSampler.from_options(training),
                        TimestepSampler.from_options(training, objective.num_timesteps),
                        Loss.from_options(training, objective), acc.device, network.set_enabled)
    scheduler = build_scheduler(cfg.optimizer.lr_scheduler, optimizer, total_steps, cfg.optimizer.lr_warmup_steps,
                                cfg.optimizer.lr_scheduler_num_cycles, cfg.optimizer.lr_scheduler_power)
    validator = Validator(data.validation, training.validation_timesteps, training.seed)
    return TrainingRun(cfg, acc, precision, trackers, data, plan, total_steps, bundle, network, batches, optimizer,
                       scheduler, list(prepared[:-1]), denoiser, setup, method, validator)


def gatherer(acc) -> Callable[[torch.Tensor], torch.Tensor]:
    """Rows of a tensor from every process, concatenated (padding rows are all zeros)."""
    def gather(rows: torch.Tensor) -> torch.Tensor:
        if acc.num_processes == 1:
            return rows
        return acc.gather(acc.pad_across_processes(rows.to(acc.device), dim=0, pad_index=0)).cpu()

    return gather


def check_buckets(bundle: ModelBundle, data: TrainingData) -> None:
    multiple = bundle.family.bucket_step_multiple
    if multiple:
        for spec in data.specs:
            if spec.enable_bucket and spec.bucket_reso_steps % multiple:
                log.warning("bucket_reso_steps = %d is not a multiple of %d; %s may produce artefacts",
                            spec.bucket_reso_steps, multiple, bundle.family.label)


def place_models(bundle: ModelBundle, device: torch.device, dtype: torch.dtype, vae: torch.dtype) -> None:
    bundle.unet.to(device, dtype)
    bundle.vae.to(device, vae)
    for te in bundle.text_encoders:
        te.to(device, dtype)


def inject_network(cfg: Config, bundle: ModelBundle, trains_text: bool) -> LoraNetwork:
    net, training = cfg.network, cfg.training
    torch.manual_seed(training.seed)  # LoRA initialisation
    network = LoraNetwork(bundle.unet, bundle.text_encoders, bundle.family, NetworkSpec.from_options(net, trains_text))
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


def text_cache(cfg: Config, data: TrainingData, conditioner, acc, bundle: ModelBundle):
    if not cfg.data.cache_text_encoder_outputs:
        return None
    cache = TextCache(data, conditioner.encode)
    with acc.autocast():
        cache.fill()
    for te in bundle.text_encoders:
        te.to("cpu")
    return cache


# --- reporting -----------------------------------------------------------------------------------

@dataclass
class Reporting:
    """What a run writes and logs besides its weights."""
    outputs: Outputs
    tracker: Tracker
    sampler: Sampler | None
    timestep_table: TimestepLossTable
    metrics: list                # step metric sources (library.train.metrics)


def resolution_of(data, bundle) -> tuple[int, int]:
    """The training resolution: the first dataset's, or the model's native one."""
    size = data.specs[0].resolution or (bundle.native_resolution,) * 2
    return tuple(size)


def make_sampler(cfg: Config, data, bundle) -> Sampler | None:
    if not cfg.sampling.sample_prompts:
        return None
    return Sampler(load_prompts(cfg.sampling.sample_prompts), Path(cfg.saving.output_dir) / "sample",
                   cfg.saving.output_name, resolution_of(data, bundle), cfg.sampling.sample_sampler, cfg.training.seed,
                   cfg.model.v_parameterization, cfg.training.zero_terminal_snr, cfg.sampling.sample_compare_base)


def training_facts(run: TrainingRun) -> TrainingFacts:
    bundle, family = run.bundle, run.bundle.family
    denoiser = run.denoiser
    components = {**denoiser.objective.metadata(), **denoiser.noise.metadata(), **denoiser.timesteps.metadata(),
                  **denoiser.loss_fn.metadata()}
    return TrainingFacts(
        base_model_version=bundle.base_model_version,
        architecture=family.modelspec_architecture(bundle.v_parameterization),
        text_encoders=len(bundle.text_encoders), resolution=resolution_of(run.data, bundle), steps=0, epochs=0,
        started_at=0.0, mixed_precision=run.precision, batches_per_epoch=run.plan.batches,
        optimizer=optimizer_description(run.optimizer, run.cfg.optimizer.optimizer_args),
        **dataset_summary(run.data), tag_frequency=tag_frequency(run.data), components=components)


def build_reporting(run: TrainingRun, write_state: Callable[[Path], None], config_summary: dict) -> Reporting:
    """`write_state(folder)` writes a resumable training state (the trainer knows its step)."""
    cfg, acc = run.cfg, run.accelerator
    sampler = make_sampler(cfg, run.data, run.bundle)
    table = TimestepLossTable(run.denoiser.objective.num_timesteps)
    tracker = Tracker(acc, run.trackers, cfg.saving.output_name, config_summary)

    def sample(n: int) -> list:
        return sampler.run(run.bundle, run.bundle.unet, run.device, n, acc.autocast, run.network.set_enabled)

    def validate() -> dict[str, float]:
        with acc.autocast():
            return run.validator.run(run.batches, run.denoiser)

    handles = RunHandles(
        lora_tensors=lambda: run.network.kohya_state_dict(SAVE_DTYPES[cfg.saving.save_precision]),
        write_state=write_state, facts=training_facts(run), loss_table=table.render,
        sample=sample if sampler is not None else None, validate=validate if run.validator else None,
        sample_records=(lambda n: sampler.records(n, base=sampler.compare_base)) if sampler is not None else None)
    outputs = Outputs(cfg, acc, tracker, run.plan, run.total_steps, run.method, handles)
    sources = [step_metrics.LossAverage(), step_metrics.throughput, step_metrics.MemoryPeaks(run.device),
               step_metrics.LearningRates(run.optimizer), step_metrics.from_callable(lambda: outputs.method.metrics()),
               step_metrics.from_callable(table.scalars)]
    return Reporting(outputs, tracker, sampler, table, sources)
