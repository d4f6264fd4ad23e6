"""Everything a training run needs, built in one explicit order.

The order matters and is written down here once: the data is scanned before any weights load;
the models are placed and the attention kernel chosen before the network is injected; the
training method is built while the VAE is still on the device (APT encodes its black border) and
before latent caching parks the VAE on the CPU; with latent caching, the denoiser and the text
encoders wait on the CPU (already in their dtype) until the VAE has left the device, so that the
caching phase holds the VAE alone (as kohya's scripts do); the models are wrapped by accelerate before the
text cache encodes through them; the denoiser is assembled from the model family's objective and
the loss, noise and timestep options; the reporting (tracker, sampler, outputs, metric sources)
comes last, from the parts it reports on.
"""
from __future__ import annotations

import logging
import os
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from library.config import Config
from library.config.network_kinds import network_kind
from library.data.dataset import TrainingData
from library.data.latent_cache import LatentCache
from library.data.summary import dataset_summary, log_dataset, tag_frequency
from library.data.text_cache import TextCache
from library.errors import UserError
from library.lora.compat import network_target, read_checked
from library.lora.kohya_file import SAVE_DTYPES
from library.lora.metadata import TrainingFacts
from library.lora.network import LoraNetwork, NetworkSpec
from library.models.fp8 import leave_to_ddp_alone, store_in_fp8
from library.models.loader import ModelBundle, load_models, plan_model
import library.train.apt_method  # noqa: F401  registers APT as a training method
from library.train import metrics as step_metrics
from library.train.batches import BatchBuilder, StepPlan, VaeEncoder
from library.train.denoiser import ConditioningSource, Denoiser
from library.train.diffusion import NoiseSampler, TimestepSampler
from library.train.ema import LoraEma
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
    ema: LoraEma | None = None   # the moving average of the LoRA weights (ema = true)

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
                        skip_bad_images=cfg.data.skip_bad_images, masked_loss=training.masked_loss)
    check_masks(cfg, data)
    check_multipliers(cfg, data)
    # Before the model loads: every bucket on the model's grid, said per dataset.
    data.check_grid(model_plan.family.latent_multiple(model_plan.unet_config, model_plan.vae_config),
                    model_plan.family.label)
    if acc.is_main_process:
        log_dataset(data, training.max_token_length)
    plan = StepPlan(data, training.gradient_accumulation_steps, acc.num_processes, acc.process_index)
    total_steps = (training.max_train_epochs * plan.steps_per_epoch if training.max_train_epochs
                   else training.max_train_steps)

    # 2. Models on the device in their dtypes, the attention kernel, then the network.
    # The processes of one machine load in turn, in the run's dtype where the VAE's allows it, and
    # each places its models before the next one loads: one fp32 copy per machine at most.
    weights, vae = DTYPES[precision], vae_dtype(training.no_half_vae, model_plan.family.vae_overflows_in_fp16,
                                                precision)
    caches_latents = cfg.data.cache_latents or cfg.data.cache_latents_to_disk

    def load_and_place() -> ModelBundle:
        loaded = load_models(cfg.model, model_plan, dtype=weights if vae == weights else torch.float32)
        place_models(loaded, acc.device, weights, vae, vae_only=caches_latents, fp8_unet=training.fp8_unet,
                     fp8_text=training.fp8_text_encoders)
        return loaded

    bundle = in_turns(acc, load_and_place)
    family = bundle.family
    check_buckets(bundle, data)
    trains_text = not cfg.network.network_train_unet_only
    family.use_attention_backend(bundle.unet, training.attention, acc.device)
    network = inject_network(cfg, bundle, trains_text)

    # 3. The training method, while the VAE is on the device; then the latent cache (which parks it).
    encoder = VaeEncoder(bundle.vae, acc.device)
    objective = family.objective(bundle.scheduler_config, cfg.model.v_parameterization, training.zero_terminal_snr)
    setup = MethodSetup(cfg, family, bundle.unet, bundle.tokenizers, objective.num_timesteps, encoder,
                        gatherer(acc), trains_text)
    method = build_method(selected_method(cfg), setup)
    batches = BatchBuilder(data, encoder, training.prior_loss_weight, latent_cache(cfg, data, encoder, acc, bundle))
    if caches_latents:
        move_models(bundle, acc.device)

    # 4. Optimizer, accelerate's wrappers, text conditioning (the text cache parks the encoders).
    optimizer = build_optimizer(cfg.optimizer.optimizer_type, cfg.optimizer.optimizer_args,
                                parameter_groups(cfg, network, len(bundle.text_encoders), trains_text),
                                cfg.optimizer.learning_rate)
    prepared = prepare_models(acc, bundle.unet, bundle.text_encoders if trains_text else [], optimizer)
    unet, optimizer = prepared[0], prepared[-1]
    # Training passes go through the DDP wrappers so that gradients are synchronised.
    train_encoders = list(prepared[1:-1]) if trains_text else bundle.text_encoders
    local_text = family.caption_encoder(bundle.tokenizers, bundle.text_encoders, training.clip_skip,
                                        training.max_token_length)
    trained_text = family.caption_encoder(bundle.tokenizers, train_encoders, training.clip_skip,
                                          training.max_token_length) if trains_text \
        else local_text
    conditioning = ConditioningSource(trained_text, local_text, trains_text, acc.device,
                                      text_cache(cfg, data, local_text, acc, bundle))

    # 5. The denoiser: the family's objective, the noise, timestep and loss options.
    if training.zero_terminal_snr and not cfg.model.v_parameterization:
        log.warning("zero_terminal_snr without v_parameterization: an epsilon model cannot learn the last step")
    denoiser = Denoiser(family, unet, bundle.unet, conditioning, objective, NoiseSampler.from_options(training),
                        TimestepSampler.from_options(training, objective.num_timesteps),
                        Loss.from_options(training, objective), acc.device, network.set_enabled, network.multiplied)
    scheduler = build_scheduler(cfg.optimizer.lr_scheduler, optimizer, total_steps, cfg.optimizer.lr_warmup_steps,
                                cfg.optimizer.lr_scheduler_num_cycles, cfg.optimizer.lr_scheduler_power,
                                cfg.optimizer.lr_scheduler_type, cfg.optimizer.lr_scheduler_args)
    # Uncached validation images are VAE-encoded a chunk at a time: no larger than a training batch.
    validator = Validator(data.validation, training.validation_timesteps, training.seed,
                          batch_size=min(4, training.train_batch_size))
    # From the starting weights (network_weights or the fresh initialisation), after accelerate placed them.
    ema = LoraEma.from_options(training, list(network.parameters()), acc.device)
    return TrainingRun(cfg, acc, precision, trackers, data, plan, total_steps, bundle, network, batches, optimizer,
                       scheduler, list(prepared[:-1]), denoiser, setup, method, validator, ema)


def check_masks(cfg: Config, data: TrainingData) -> None:
    """Mask options that would change nothing are refused: no image of the run has a mask."""
    if data.has_masks():
        return
    t = cfg.training
    if t.masked_loss:
        raise UserError(f"{data.source}: masked_loss = true, but no image has a mask: put <stem>_mask.png beside "
                        "the images, set conditioning_data_dir in the subset, or use alpha_mask = true")
    for key in ("unmasked_probability", "unmasked_weight"):
        if getattr(t, key):
            raise UserError(f"{data.source}: {key} = {getattr(t, key)}: no image has a loss mask (masked_loss or "
                            "alpha_mask); remove it")


def check_multipliers(cfg: Config, data: TrainingData) -> None:
    kind = network_kind(cfg.network.network_type)
    for spec in data.specs:
        if spec.network_multiplier != 1.0 and kind.dora == kind.name:  # a DoRA kind
            raise UserError(f"{data.source}: [[datasets]] #{spec.index + 1}: network_multiplier: DoRA's weight change "
                            "is not proportional to a multiplier; use 1, or another network_type")


def prepare_models(acc, unet, text_encoders: list, optimizer) -> list:
    """accelerate's wrappers: [unet, *text_encoders, optimizer]. Each DDP wrapper is told whether
    some of its parameters may get no gradient: never in the UNet (every LoRA layer is used each
    step), in the text encoders yes (the layers after clip_skip's). find_unused_parameters costs a
    graph walk each backward pass, so only the encoders pay it."""
    handler = getattr(acc, "ddp_handler", None)
    chosen = None if handler is None else handler.find_unused_parameters

    def wrap(model, find_unused: bool):
        leave_to_ddp_alone(model)
        if handler is not None:
            handler.find_unused_parameters = find_unused and chosen
        return acc.prepare(model)

    try:
        out = [wrap(unet, False)] + [wrap(te, True) for te in text_encoders]
    finally:
        if handler is not None:
            handler.find_unused_parameters = chosen
    return out + [acc.prepare(optimizer)]


def in_turns(acc, work: Callable[[], object]):
    """`work()` on each process of this machine in turn (the others wait): kohya's way of keeping
    several processes from holding the freshly loaded weights in host memory at once."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", acc.num_processes))
    if acc.num_processes == 1 or local == 1:
        return work()
    result = None
    for turn in range(local):
        if acc.local_process_index == turn:
            result = work()
        acc.wait_for_everyone()
    return result


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


def place_models(bundle: ModelBundle, device: torch.device, dtype: torch.dtype, vae: torch.dtype,
                 vae_only: bool = False, fp8_unet: bool = False, fp8_text: bool = False) -> None:
    """Every model in its dtype; on the device, or only the VAE there (`vae_only`: the others
    follow with `move_models` after latent caching). Models stored in float8 (`fp8_unet`,
    `fp8_text`) are converted on the host first, so their full-precision weights never reach the device."""
    bundle.vae.to(device, vae)
    for name, model, fp8 in [("UNet", bundle.unet, fp8_unet),
                             *((f"text encoder {i + 1}", te, fp8_text) for i, te in enumerate(bundle.text_encoders))]:
        model.to(dtype)
        if fp8:
            log.info("%s: %.1fM frozen weights stored in float8", name, store_in_fp8(model) / 1e6)
        if not vae_only:
            model.to(device)


def move_models(bundle: ModelBundle, device: torch.device) -> None:
    for model in [bundle.unet, *bundle.text_encoders]:
        model.to(device)


def release_cached_memory(device: torch.device) -> None:
    """Hand the allocator's cached blocks back after a model left the device: otherwise they stay
    reserved (the caching phase's peak) and the next phase cannot reuse them as one block."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


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
    """One group per component; with kohya's block learning-rate factors one per UNet block
    ("unet_IN04"), and with LoRA+ the up matrices of each in a group of their own ("..._plus")."""
    opt, net = cfg.optimizer, cfg.network
    base = {"unet": opt.unet_lr or opt.learning_rate}
    if trains_text:
        base.update({f"te{i + 1}": lr for i, lr in enumerate(opt.text_encoder_lrs(encoders))})
    ratios = {c: (net.loraplus_unet_lr_ratio if c == "unet" else net.loraplus_text_encoder_lr_ratio)
              or net.loraplus_lr_ratio for c in base}
    groups: dict[str, dict] = {name: {"params": [], "lr": lr, "name": name} for name, lr in base.items()}
    for component, block, weight, plus, param in network.parameter_sets():
        if component not in base:
            continue
        ratio = ratios[component] if plus else None
        name = component + (f"_{block}" if block else "") + ("_plus" if ratio else "")
        group = groups.setdefault(name, {"params": [], "lr": base[component] * weight * (ratio or 1.0), "name": name})
        group["params"].append(param)
    out = [g for g in groups.values() if g["params"] or g["name"] in base]
    if len(out) > len(base):
        log.info("optimizer parameter groups: %s", ", ".join(f"{g['name']} lr={g['lr']:g}" for g in out if g["params"]))
    return [g for g in out if g["params"]] if len(out) > len(base) else out


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
    release_cached_memory(acc.device)
    return cache


def text_cache(cfg: Config, data: TrainingData, conditioner, acc, bundle: ModelBundle):
    if not cfg.data.cache_text_encoder_outputs:
        return None
    cache = TextCache(data, conditioner.encode)
    with acc.autocast():
        cache.fill()
    for te in bundle.text_encoders:
        te.to("cpu")
    release_cached_memory(acc.device)
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
    training = cfg.training
    # Prompts are encoded as captions are in training (clip_skip, max_token_length's chunks; the
    # pipelines would ignore the first and cut at 77 tokens), and before the images are made, so
    # that the text encoders and the VAE are never on the device together.
    text = bundle.family.caption_encoder(bundle.tokenizers, bundle.text_encoders, training.clip_skip,
                                         training.max_token_length)
    # With EMA the samples show the average, and their names say so.
    name = cfg.saving.output_name + ("_ema" if training.ema else "")
    return Sampler(load_prompts(cfg.sampling.sample_prompts), Path(cfg.saving.output_dir) / "sample",
                   name, resolution_of(data, bundle), cfg.sampling.sample_sampler, training.seed,
                   cfg.model.v_parameterization, training.zero_terminal_snr, text=text,
                   compare_base=cfg.sampling.sample_compare_base, vae_tiling=cfg.sampling.sample_vae_tiling)


def training_facts(run: TrainingRun) -> TrainingFacts:
    bundle, family = run.bundle, run.bundle.family
    denoiser = run.denoiser
    components = {**denoiser.objective.metadata(), **denoiser.noise.metadata(), **denoiser.timesteps.metadata(),
                  **denoiser.loss_fn.metadata(), **(run.ema.metadata() if run.ema is not None else {"ss_ema": "False"}),
                  "ss_masked_loss": str(run.cfg.training.masked_loss)}
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
        with run.ema.applied() if run.ema is not None else nullcontext():
            return sampler.run(run.bundle, run.bundle.unet, run.device, n, acc.autocast, run.network.set_enabled)

    def ema_tensors() -> dict[str, torch.Tensor]:
        with run.ema.applied():
            return run.network.kohya_state_dict(SAVE_DTYPES[cfg.saving.save_precision])

    def validate() -> dict[str, float]:
        with acc.autocast():
            return run.validator.run(run.batches, run.denoiser)

    handles = RunHandles(
        lora_tensors=lambda: run.network.kohya_state_dict(SAVE_DTYPES[cfg.saving.save_precision]),
        write_state=write_state, facts=training_facts(run), loss_table=table.render,
        sample=sample if sampler is not None else None, validate=validate if run.validator else None,
        ema_tensors=ema_tensors if run.ema is not None else None,
        sample_records=(lambda n: sampler.records(n, base=sampler.compare_base)) if sampler is not None else None)
    outputs = Outputs(cfg, acc, tracker, run.plan, run.total_steps, run.method, handles)
    sources = [step_metrics.LossAverage(), step_metrics.throughput, step_metrics.MemoryPeaks(run.device),
               step_metrics.LearningRates(run.optimizer), step_metrics.from_callable(lambda: outputs.method.metrics()),
               step_metrics.from_callable(table.scalars)]
    return Reporting(outputs, tracker, sampler, table, sources)
