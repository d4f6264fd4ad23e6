"""The training job: load, prepare, run the optimizer steps with saves, samples and validation."""
from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from tqdm.auto import tqdm

from library.apt.indicator import bin_ranges
from library.config import Config
from library.config.loader import table_fields
from library.data.dataset import TrainingData
from library.data.latent_cache import LatentCache
from library.data.summary import log_dataset
from library.data.text_cache import TextCache
from library.errors import UserError
from library.lora.kohya_file import SAVE_DTYPES
from library.lora.network import LoraNetwork, NetworkSpec
from library.lora.compat import network_target, read_checked
from library.models.conditioning import TextConditioner, sdxl_time_ids
from library.models.loader import ModelBundle, load_models, plan_model
from library.train import checkpoint, resume
from library.train.apt_step import apt_forward, make_apt, observe
from library.train.batches import Batch, BatchBuilder, MicroBatches, StepPlan, VaeEncoder, micro_batch_stream
from library.train.diffusion import Diffusion, per_sample_mse, step_generator
from library.train.optimizers import build_optimizer
from library.train.output import Outputs
from library.train.schedules import build_scheduler
from library.train.setup import DTYPES, make_accelerator, set_attention
from library.train.tracking import TimestepLossTable, Tracker, peak_memory_gib, trackers_for
from library.train.validation import Validator

log = logging.getLogger(__name__)


class Trainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        t = cfg.training
        logging_dir = cfg.logging.logging_dir or str(Path(cfg.saving.output_dir) / "logs")
        self.accelerator, self.precision = make_accelerator(cfg, trackers_for(cfg.logging.log_with), logging_dir)
        acc = self.accelerator
        self.device = acc.device
        self.weight_dtype = DTYPES[self.precision]
        if t.full_bf16 and self.precision != "bf16":
            raise UserError('full_bf16 needs mixed_precision = "bf16" (this run uses "%s")' % self.precision)
        plan = plan_model(cfg.model)
        # The dataset is scanned (and every image decoded once) before any weights load.
        self.data = TrainingData(cfg.dataset, native_resolution=plan.native_resolution,
                                 default_batch_size=t.train_batch_size, seed=t.seed,
                                 skip_bad_images=cfg.data.skip_bad_images)
        if acc.is_main_process:
            log_dataset(self.data)
        self.plan = StepPlan(self.data, t.gradient_accumulation_steps, acc.num_processes, acc.process_index)
        self.total_steps = (t.max_train_epochs * self.plan.steps_per_epoch if t.max_train_epochs
                            else t.max_train_steps)
        self.bundle: ModelBundle = load_models(cfg.model, plan)
        self._check_buckets()
        self._prepare_models()
        self.diffusion = Diffusion(
            self.bundle.scheduler_config, cfg.model.v_parameterization, zero_terminal_snr=t.zero_terminal_snr,
            noise_offset=t.noise_offset, multires_iterations=t.multires_noise_iterations,
            multires_discount=t.multires_noise_discount, ip_noise_gamma=t.ip_noise_gamma,
            min_snr_gamma=t.min_snr_gamma, min_timestep=t.min_timestep, max_timestep=t.max_timestep)
        if t.zero_terminal_snr and not cfg.model.v_parameterization:
            log.warning("zero_terminal_snr without v_parameterization: an epsilon model cannot learn the last step")
        self.validator = Validator(self.data.validation, t.validation_timesteps, t.seed)
        self.outputs = Outputs(self, logging_dir)
        self.timestep_table = TimestepLossTable(self.diffusion.num_timesteps)
        self.step = 0
        self.step_stats: dict[str, float] = {}
        self._stream = None
        self._stream_next = -1
        self.losses: list[float] = []
        self.validation_history: list[tuple[int, float]] = []
        if cfg.saving.resume:
            self._resume(cfg.saving.resume)

    # --- setup --------------------------------------------------------------------------------
    def _check_buckets(self) -> None:
        if self.bundle.is_sdxl:
            for spec in self.data.specs:
                if spec.enable_bucket and spec.bucket_reso_steps % 32:
                    log.warning("bucket_reso_steps = %d is not a multiple of 32; SDXL may produce artefacts",
                                spec.bucket_reso_steps)
        factor = self.bundle.vae_scale_factor * 2 ** (len(self.bundle.unet.config.block_out_channels) - 1)
        for w, h, _ in self.data.bucket_table():
            if w % factor or h % factor:
                raise UserError(f"bucket {w}x{h} is not divisible by {factor}, which this model needs; use "
                                f"resolution and bucket_reso_steps multiples of {factor}")

    def _vae_dtype(self) -> torch.dtype:
        choice = self.cfg.training.no_half_vae
        if choice is None:  # the SDXL VAE overflows to NaN in fp16
            choice = self.bundle.is_sdxl and self.precision == "fp16"
        return torch.float32 if choice else self.weight_dtype

    def _prepare_models(self) -> None:
        cfg, b = self.cfg, self.bundle
        net, t = cfg.network, cfg.training
        self.train_te = not net.network_train_unet_only
        b.unet.to(self.device, self.weight_dtype)
        b.vae.to(self.device, self._vae_dtype())
        for te in b.text_encoders:
            te.to(self.device, self.weight_dtype)
        set_attention(b.unet, t.attention, self.device)
        torch.manual_seed(t.seed)  # LoRA initialisation
        spec = NetworkSpec(dim=net.network_dim, alpha=net.alpha, conv_dim=net.conv_dim,
                           conv_alpha=net.conv_alpha_value, dropout=net.network_dropout,
                           train_unet=True, train_text_encoders=self.train_te)
        self.network = LoraNetwork(b.unet, b.text_encoders, b.arch, spec)
        if t.full_bf16:
            for p in self.network.parameters():
                p.data = p.data.to(torch.bfloat16)
        if net.network_weights:
            weights, _ = read_checked(net.network_weights, network_target(self.network, "the network being trained"),
                                      net.network_weights_partial, "set network_weights_partial = true")
            self.network.load_modules(weights.modules, net.network_weights, allow_missing=net.network_weights_partial)
            log.info("continuing from %s (%s layout)", net.network_weights, weights.style)
        if t.gradient_checkpointing:
            b.unet.enable_gradient_checkpointing()
            if self.train_te:
                for te in b.text_encoders:
                    te.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        b.unet.train()
        for te in b.text_encoders:
            te.train(self.train_te)
        self.encoder = VaeEncoder(b.vae, self.device)
        self.apt = make_apt(self) if t.apt else None
        self.batches = BatchBuilder(self.data, self.encoder, t.prior_loss_weight, self._latent_cache())
        groups = [{"params": list(self.network.parameters("unet")), "lr": cfg.optimizer.unet_lr or
                   cfg.optimizer.learning_rate, "name": "unet"}]
        if self.train_te:
            for i, lr in enumerate(cfg.optimizer.text_encoder_lrs(len(b.text_encoders))):
                groups.append({"params": list(self.network.parameters(f"te{i + 1}")), "lr": lr, "name": f"te{i + 1}"})
        opt = cfg.optimizer
        self.optimizer = build_optimizer(opt.optimizer_type, opt.optimizer_args, groups, opt.learning_rate)
        models = [b.unet] + (b.text_encoders if self.train_te else [])
        prepared = self.accelerator.prepare(*models, self.optimizer)
        self.unet, self.optimizer = prepared[0], prepared[-1]
        self.base_unet = b.unet  # unwrapped: for no-grad passes on one process (validation, sampling)
        # Forward passes must go through the DDP wrappers so that gradients are synchronised.
        encoders = list(prepared[1:-1]) if self.train_te else b.text_encoders
        self.conditioner = TextConditioner(b.arch, b.tokenizers, encoders, t.clip_skip)
        self.text_cache = self._text_cache()
        self.scheduler = build_scheduler(opt.lr_scheduler, self.optimizer, self.total_steps, opt.lr_warmup_steps,
                                         opt.lr_scheduler_num_cycles, opt.lr_scheduler_power)

    def _latent_cache(self) -> LatentCache | None:
        opts = self.cfg.data
        if not (opts.cache_latents or opts.cache_latents_to_disk):
            return None
        cache = LatentCache(self.data, self.encoder, self.encoder.identity(), to_disk=opts.cache_latents_to_disk,
                            cache_dir=opts.latent_cache_dir)
        acc = self.accelerator
        shared = opts.cache_latents_to_disk and acc.num_processes > 1
        if shared and not acc.is_main_process:
            acc.wait_for_everyone()  # the main process writes the disk entries first, the others read them
        with tqdm(total=len(cache.wanted()), desc="caching latents", disable=not acc.is_main_process) as bar:
            cache.fill(bar.update)
        if shared and acc.is_main_process:
            acc.wait_for_everyone()
        if acc.is_main_process:
            log.info("latent cache: %d encoded, %d reused from disk", cache.encoded, cache.hits)
        self.bundle.vae.to("cpu")  # no longer needed on the device
        return cache

    def _text_cache(self) -> TextCache | None:
        if not self.cfg.data.cache_text_encoder_outputs:
            return None
        cache = TextCache(self.data, self.conditioner.encode)
        with self.accelerator.autocast():
            cache.fill()
        for te in self.bundle.text_encoders:
            te.to("cpu")
        return cache

    def _resume(self, where: str) -> None:
        folder, state = resume.restore(where, Path(self.cfg.saving.output_dir), self.cfg.saving.output_name,
                                       self.network, self.optimizer, self.scheduler, self.total_steps)
        self.step = state.step
        epoch, _ = self.plan.micro_batches(self.step)
        if (epoch, self.plan.steps_per_epoch) != (state.epoch, state.extra.get("steps_per_epoch")):
            log.warning("%s: the dataset or batch settings changed since this state was saved; the data order "
                        "continues from step %d of the current settings", folder, self.step)
        self.outputs.restore(state.extra)
        log.info("resumed from %s at step %d (epoch %d)", folder, self.step, epoch)

    # --- one micro-batch ----------------------------------------------------------------------
    def forward(self, batch: Batch, gen: torch.Generator, timesteps: torch.Tensor | None = None,
                unet=None, weighted: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(mean loss, unweighted per-sample MSE (detached), timesteps) of one batch.

        The per-sample values stay unweighted so the loss-by-timestep table shows how well each
        timestep is denoised, whatever loss weighting the user chose."""
        latents = batch.latents.to(self.device)
        if timesteps is None:
            timesteps = self.diffusion.sample_timesteps(latents.shape[0], gen)
        noise = self.diffusion.sample_noise(latents, gen)
        noisy = self.diffusion.add_noise(latents, self.diffusion.input_noise(noise, gen), timesteps)
        cond, kwargs = self.conditioning(batch)
        pred = (unet or self.unet)(noisy, timesteps.to(self.device), cond.hidden_states, **kwargs).sample
        target = self.diffusion.target(latents, noise, timesteps)
        mask = batch.mask.to(self.device) if batch.mask is not None else None
        raw = per_sample_mse(pred, target, mask)
        per_sample = self.weigh(raw, batch, timesteps) if weighted else raw
        return per_sample.mean(), raw.detach(), timesteps

    def conditioning(self, batch: Batch):
        """(text conditioning, extra UNet inputs) of a batch; the text encoders get gradients only
        when they are trained and gradients are on."""
        if self.text_cache is not None:
            cond = self.text_cache.get(batch.captions).to(self.device)
        else:
            with torch.set_grad_enabled(self.train_te and torch.is_grad_enabled()):
                cond = self.conditioner.encode(batch.captions)
        kwargs = {}
        if self.bundle.is_sdxl:
            kwargs["added_cond_kwargs"] = {
                "text_embeds": cond.pooled,
                "time_ids": sdxl_time_ids(batch.time_ids, self.device, cond.hidden_states.dtype),
            }
        return cond, kwargs

    def weigh(self, per_sample: torch.Tensor, batch: Batch, timesteps: torch.Tensor) -> torch.Tensor:
        """Per-sample losses times the image weights (loss_weight, regularisation) and Min-SNR."""
        per_sample = per_sample * batch.weights.to(self.device)
        snr = self.diffusion.loss_weights(timesteps)
        return per_sample if snr is None else per_sample * snr.to(self.device)

    # --- the run ------------------------------------------------------------------------------
    def micro_batches(self, step: int) -> list[list]:
        """The samples of each micro-batch of `step`, from the (possibly multi-process) loader."""
        if self._stream is None or self._stream_next != step:
            dataset = MicroBatches(self.data, self.plan, step, self.total_steps, self.batches.cache is None)
            workers = 0 if self.batches.cache is not None else self.cfg.training.max_data_loader_n_workers
            self._stream = micro_batch_stream(dataset, workers)
        out = []
        while True:
            got_step, m, count, samples = next(self._stream)
            assert got_step == step, (got_step, step)
            out.append(samples)
            if m == count - 1:
                break
        self._stream_next = step + 1
        return out

    def train_step(self, step: int) -> tuple[float, float] | None:
        """One optimizer step; returns (loss, grad norm), or None when a NaN step was skipped."""
        try:
            return self._train_step(step)
        finally:
            if self.apt is not None:
                self.apt.stop_recording()

    def _train_step(self, step: int) -> tuple[float, float] | None:
        acc, cfg = self.accelerator, self.cfg
        epoch = self.plan.epoch_of(step)
        micro = self.micro_batches(step)
        total = 0.0
        apt_results = []
        for m, samples in enumerate(micro):
            batch = self.batches.assemble(samples)
            gen = step_generator(cfg.training.seed, step, m, acc.process_index)
            sync = m == len(micro) - 1
            with (nullcontext() if sync else acc.no_sync(self.unet)), acc.autocast():
                if self.apt is not None:
                    result = apt_forward(self, self.apt, batch, gen)
                    loss, per_sample, timesteps = result.loss, result.loss_theta, result.timesteps
                    apt_results.append((result, batch))
                else:
                    loss, per_sample, timesteps = self.forward(batch, gen)
            bad = torch.tensor([0.0 if torch.isfinite(loss) else 1.0], device=self.device)
            if acc.num_processes > 1:
                bad = acc.reduce(bad, "sum")
            if bad.item() > 0:
                self.optimizer.zero_grad(set_to_none=True)
                if cfg.training.skip_nan_steps:
                    log.warning("loss is %s at step %d (epoch %d): step skipped", loss.item(), step + 1, epoch)
                    return None
                raise UserError(f"loss became {loss.item()} at step {step + 1} (epoch {epoch}); stopped without "
                                "saving anything new. Lower the learning rate, use mixed_precision = \"bf16\" or "
                                "\"no\", or set skip_nan_steps = true")
            acc.backward(loss / len(micro))
            self.timestep_table.update(per_sample.float().cpu(), timesteps)
            total += loss.item() / len(micro)
        for result, batch in apt_results:
            observe(self, result, batch)
        if self.apt is not None:
            self.apt.end_step(step + 1)
            self.step_stats = {k: sum(r.stats[k] for r, _ in apt_results) / len(apt_results)
                               for k in apt_results[0][0].stats}
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        max_norm = cfg.optimizer.max_grad_norm or float("inf")  # inf: measure without clipping
        grad_norm = float(acc.clip_grad_norm_(params, max_norm))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total, grad_norm

    def run(self) -> Path:
        acc, cfg = self.accelerator, self.cfg
        started = time.time()
        self.outputs.begin(started)
        if self.step == 0:
            self.outputs.at_start()
        bar = tqdm(total=self.total_steps, initial=self.step, desc="training", unit="step",
                   disable=not acc.is_main_process)
        samples_per_step = sum(len(ref.items) for _, ref in self.plan.micro_batches(self.step)[1]) * acc.num_processes
        try:
            self._train_loop(bar, samples_per_step)
        finally:
            bar.close()
            self._close_stream()
        return self.outputs.finish()

    def _close_stream(self) -> None:
        stream, self._stream = self._stream, None
        shutdown = getattr(stream, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()  # stop loader workers now; left to garbage collection it takes seconds

    def _train_loop(self, bar, samples_per_step: int) -> None:
        ema = None
        while self.step < self.total_steps:
            step = self.step
            tick = time.time()
            result = self.train_step(step)
            self.step = step + 1
            if result is not None:
                loss, grad_norm = result
                self.losses.append(loss)
                ema = loss if ema is None else 0.95 * ema + 0.05 * loss
                seconds = time.time() - tick
                metrics = {"loss": loss, "loss_avg": ema, "grad_norm": grad_norm, "s_per_it": seconds,
                           "samples_per_s": samples_per_step / max(seconds, 1e-9),
                           "peak_memory_gib": peak_memory_gib(self.device), "epoch": self.plan.epoch_of(step)}
                for group in self.optimizer.param_groups:
                    metrics[f"lr/{group.get('name', 'group')}"] = group["lr"] or 0.0
                if self.apt is not None:
                    metrics.update(self.step_stats)
                    gamma = self.apt.indicator.gamma()
                    ranges = bin_ranges(self.apt.indicator.bins, self.apt.indicator.num_timesteps)
                    metrics.update({f"apt/gamma_t{lo:03d}": float(g) for (lo, _), g in zip(ranges, gamma)})
                self.outputs.tracker.log({**metrics, **self.timestep_table.scalars()}, step=self.step)
                bar.set_postfix(loss=f"{loss:.4f}", avg=f"{ema:.4f}", epoch=self.plan.epoch_of(step))
            bar.update(1)
            self.outputs.after_step(step)

    # --- state --------------------------------------------------------------------------------
    def train_state(self) -> checkpoint.TrainState:
        epoch, micro = self.plan.micro_batches(self.step)  # where the next step will read
        return checkpoint.TrainState(
            step=self.step, consumed=self.step * self.plan.accumulation * self.plan.world, epoch=epoch,
            position=micro[0][0], network=checkpoint.describe_network(self.network),
            extra={"steps_per_epoch": self.plan.steps_per_epoch, **self.outputs.state()})

    def lora_tensors(self) -> dict[str, torch.Tensor]:
        return self.network.kohya_state_dict(SAVE_DTYPES[self.cfg.saving.save_precision])

    def config_summary(self) -> dict:
        return {f"{table}.{k}": v for table, values in table_fields(self.cfg).items() for k, v in values.items()}


def train(cfg: Config) -> Path:
    return Trainer(cfg).run()
