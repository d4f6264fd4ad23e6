"""The training job: load, prepare, run the optimizer steps, save the LoRA."""
from __future__ import annotations

import logging
import math
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Iterator

import torch
from tqdm.auto import tqdm

from library.config import Config
from library.data.dataset import BatchRef, TrainingData
from library.data.latent_cache import LatentCache
from library.data.text_cache import TextCache
from library.errors import UserError
from library.lora.kohya_file import SAVE_DTYPES, read_lora, write_lora
from library.lora.metadata import TrainingFacts, build_metadata
from library.lora.network import LoraNetwork, NetworkSpec
from library.models.conditioning import TextConditioner, sdxl_time_ids
from library.models.loader import ModelBundle, load_models, plan_model
from library.train.batches import Batch, BatchBuilder, VaeEncoder
from library.train.diffusion import Diffusion, per_sample_mse, step_generator
from library.data.summary import dataset_summary, log_dataset, tag_frequency
from library.train.setup import DTYPES, build_optimizer, make_accelerator, set_attention

log = logging.getLogger(__name__)


def batch_stream(data: TrainingData, epoch: int = 1, position: int = 0) -> Iterator[tuple[int, int, BatchRef]]:
    """(epoch, position, batch) forever, starting at `position` of `epoch`."""
    while True:
        order = data.epoch_batches(epoch)
        for pos in range(position, len(order)):
            yield epoch, pos, order[pos]
        epoch, position = epoch + 1, 0


class Trainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.accelerator, self.precision = make_accelerator(cfg)
        self.device = self.accelerator.device
        self.weight_dtype = DTYPES[self.precision]
        t = cfg.training
        plan = plan_model(cfg.model)
        # The dataset is scanned (and every image decoded once) before any weights load.
        self.data = TrainingData(cfg.dataset, native_resolution=plan.native_resolution,
                                 default_batch_size=t.train_batch_size, seed=t.seed,
                                 skip_bad_images=cfg.data.skip_bad_images)
        if self.accelerator.is_main_process:
            log_dataset(self.data)
        self.bundle: ModelBundle = load_models(cfg.model, plan)
        self._check_buckets()
        self._prepare_models()

    def _check_buckets(self) -> None:
        if self.bundle.is_sdxl:
            for spec in self.data.specs:
                if spec.enable_bucket and spec.bucket_reso_steps % 32:
                    log.warning("bucket_reso_steps = %d is not a multiple of 32; SDXL may produce artefacts",
                                spec.bucket_reso_steps)
        factor = self.bundle.vae_scale_factor * 2 ** (len(self.bundle.unet.config.block_out_channels) - 1)
        for w, h, _ in self.data.bucket_table():
            if w % factor or h % factor:
                raise UserError(f"bucket {w}x{h} is not divisible by {factor}, "
                                f"which this model needs; use resolution and bucket_reso_steps multiples of {factor}")

    def _prepare_models(self) -> None:
        cfg, b = self.cfg, self.bundle
        net = cfg.network
        train_te = not net.network_train_unet_only
        b.unet.to(self.device, self.weight_dtype)
        b.vae.to(self.device, torch.float32)  # fp16 VAEs (SDXL's especially) overflow to NaN
        for te in b.text_encoders:
            te.to(self.device, self.weight_dtype)
        set_attention(b.unet, cfg.training.attention, self.device)
        torch.manual_seed(cfg.training.seed)  # LoRA initialisation
        spec = NetworkSpec(dim=net.network_dim, alpha=net.alpha, conv_dim=net.conv_dim,
                           conv_alpha=net.conv_alpha_value, dropout=net.network_dropout,
                           train_unet=True, train_text_encoders=train_te)
        self.network = LoraNetwork(b.unet, b.text_encoders, b.arch, spec)
        if net.network_weights:
            tensors, _ = read_lora(net.network_weights)
            self.network.load_kohya_state_dict(tensors, net.network_weights)
            log.info("continuing from %s", net.network_weights)
        if cfg.training.gradient_checkpointing:
            b.unet.enable_gradient_checkpointing()
            if train_te:
                for te in b.text_encoders:
                    te.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        b.unet.train()
        for te in b.text_encoders:
            te.train(train_te)
        self.train_te = train_te
        self.conditioner = TextConditioner(b.arch, b.tokenizers, b.text_encoders, cfg.training.clip_skip)
        self.encoder = VaeEncoder(b.vae, self.device)
        self.batches = BatchBuilder(self.data, self.encoder, cfg.training.prior_loss_weight, self._latent_cache())
        self.text_cache = self._text_cache()
        groups = [{"params": list(self.network.parameters("unet")), "lr": cfg.optimizer.unet_lr or
                   cfg.optimizer.learning_rate, "name": "unet"}]
        if train_te:
            lrs = cfg.optimizer.text_encoder_lrs(len(b.text_encoders))
            for i, lr in enumerate(lrs):
                groups.append({"params": list(self.network.parameters(f"te{i + 1}")), "lr": lr, "name": f"te{i + 1}"})
        self.optimizer = build_optimizer(cfg, groups)
        models = [b.unet] + (b.text_encoders if train_te else [])
        prepared = self.accelerator.prepare(*models, self.optimizer)
        self.models = list(prepared[:-1])
        self.optimizer = prepared[-1]
        self.unet = self.models[0]
        self.diffusion = Diffusion(b.scheduler_config, cfg.model.v_parameterization)

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

    # --- one micro-batch ----------------------------------------------------------------------
    def forward(self, batch: Batch, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        latents = batch.latents.to(self.device)
        bsz = latents.shape[0]
        timesteps = self.diffusion.sample_timesteps(bsz, gen)
        noise = self.diffusion.noise_like(latents, gen)
        noisy = self.diffusion.add_noise(latents, noise, timesteps)
        if self.text_cache is not None:
            cond = self.text_cache.get(batch.captions).to(self.device)
        else:
            with torch.set_grad_enabled(self.train_te):
                cond = self.conditioner.encode(batch.captions)
        kwargs = {}
        if self.bundle.is_sdxl:
            kwargs["added_cond_kwargs"] = {
                "text_embeds": cond.pooled,
                "time_ids": sdxl_time_ids(batch.time_ids, self.device, cond.hidden_states.dtype),
            }
        pred = self.unet(noisy, timesteps.to(self.device), cond.hidden_states, **kwargs).sample
        target = self.diffusion.target(latents, noise, timesteps)
        mask = batch.mask.to(self.device) if batch.mask is not None else None
        per_sample = per_sample_mse(pred, target, mask) * batch.weights.to(self.device)
        return per_sample.mean(), per_sample.detach(), timesteps

    # --- the run ------------------------------------------------------------------------------
    def run(self) -> Path:
        cfg = self.cfg
        acc = self.accelerator
        steps = cfg.training.max_train_steps
        gas = cfg.training.gradient_accumulation_steps
        per_epoch = self.data.batches_per_epoch()
        started = time.time()
        stream = batch_stream(self.data)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        bar = tqdm(total=steps, desc="training", unit="step", disable=not acc.is_main_process)
        ema_loss = None
        epoch = 1
        self.losses: list[float] = []
        for step in range(steps):
            step_loss = 0.0
            for micro in range(gas):
                epoch, position, ref = next(stream)
                batch = self.batches.build(ref, epoch, position)
                gen = step_generator(cfg.training.seed, step, micro, acc.process_index)
                sync = micro == gas - 1
                with (nullcontext() if sync else acc.no_sync(self.unet)), acc.autocast():
                    loss, _per_sample, _t = self.forward(batch, gen)
                if not torch.isfinite(loss):
                    raise UserError(f"loss became {loss.item()} at step {step + 1} (epoch {epoch}); nothing was saved. "
                                    "Lower the learning rate, or use mixed_precision = \"bf16\" or \"no\"")
                acc.backward(loss / gas)
                step_loss += loss.item() / gas
            if cfg.optimizer.max_grad_norm > 0:
                acc.clip_grad_norm_(params, cfg.optimizer.max_grad_norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.losses.append(step_loss)
            ema_loss = step_loss if ema_loss is None else 0.9 * ema_loss + 0.1 * step_loss
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.4f}", avg=f"{ema_loss:.4f}", epoch=epoch)
        bar.close()
        epochs_done = math.ceil(steps * gas / max(per_epoch, 1))
        return self.save(started, steps, epochs_done)

    def save(self, started: float, steps: int, epochs: int) -> Path:
        cfg = self.cfg
        out = Path(cfg.saving.output_dir) / f"{cfg.saving.output_name}.safetensors"
        acc = self.accelerator
        acc.wait_for_everyone()
        if acc.is_main_process:
            tensors = self.network.kohya_state_dict(SAVE_DTYPES[cfg.saving.save_precision])
            spec = self.data.specs[0]
            resolution = spec.resolution or (self.bundle.native_resolution,) * 2
            facts = TrainingFacts(
                base_model_version=self.bundle.base_model_version, resolution=tuple(resolution), steps=steps,
                epochs=epochs, started_at=started, mixed_precision=self.precision,
                batches_per_epoch=self.data.batches_per_epoch(), **dataset_summary(self.data),
                tag_frequency=tag_frequency(self.data))
            digest = write_lora(out, tensors, build_metadata(cfg, facts))
            log.info("saved %s (%d modules, sshs_model_hash %s)", out, len(self.network.layers), digest[:12])
        return out


def train(cfg: Config) -> Path:
    return Trainer(cfg).run()
