"""The public view of a trainer for benchmarks and tests: what they may read and do, so that none
of them reaches into the trainer's parts or patches its methods.

    trainer = Trainer(cfg)
    probe = trainer.probe
    probe.on_step(lambda report, values: ...)      # after every optimizer step
    trainer.run()
    with probe.adapters(False):                    # the base model
        base = probe.losses(probe.training_batch(), timesteps, seed=0)
    images = generate(probe.pipeline(), ...)       # a diffusers pipeline over the model as it is now
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Callable, Iterator

import torch

from library.train.batches import Batch, BatchBuilder
from library.train.diffusion import step_generator
from library.train.method import methods
from library.train.metrics import StepReport


class Probe:
    def __init__(self, trainer):
        self._trainer = trainer
        self._parts = trainer.parts

    # --- the model ----------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self._parts.device

    @property
    def family(self):
        return self._parts.bundle.family

    @contextmanager
    def adapters(self, enabled: bool) -> Iterator[None]:
        """Every adapter (denoiser and text encoders) on or off inside the block; as before after it."""
        network = self._parts.network
        before = network.enabled
        network.set_enabled(enabled)
        try:
            yield
        finally:
            network.set_enabled(before)

    def autocast(self):
        return self._parts.accelerator.autocast()

    def pipeline(self, scheduler: str = "ddim"):
        """A diffusers pipeline over the model as it is now (the LoRA active unless switched off
        with `adapters(False)`), its VAE and text encoders on the training device."""
        from library.train.sampling import make_scheduler

        parts = self._parts
        bundle = parts.bundle
        for module in (bundle.vae, *bundle.text_encoders):
            module.to(parts.device)
        cfg = parts.cfg
        sampler = make_scheduler(scheduler, bundle.scheduler_config, cfg.model.v_parameterization,
                                 cfg.training.zero_terminal_snr)
        return bundle.family.pipeline(bundle, bundle.unet, sampler)

    # --- data ---------------------------------------------------------------------------------
    @property
    def resolution(self) -> tuple[int, int]:
        """(width, height) the first dataset trains at."""
        return tuple(self._parts.data.tables[0].resolution)

    def training_images(self) -> list[tuple[Path, str]]:
        """(path, caption file text) of every image the run trains on, regularisation images included."""
        data = self._parts.data
        return [(data.records[i].path, data.records[i].caption) for i in data.train_indices()]

    def training_batch(self, indices: list[int] | None = None) -> Batch:
        """The training images (or the records `indices`) centre-cropped, unflipped, with their
        captions unchanged: the same batch every time."""
        parts = self._parts
        parts.bundle.vae.to(parts.device)
        return parts.batches.build_fixed(parts.data.train_indices() if indices is None else indices)

    def batch_of(self, data) -> Batch:
        """Every image of another TrainingData (library.data.dataset) as one fixed batch, encoded by
        this run's VAE."""
        parts = self._parts
        parts.bundle.vae.to(parts.device)
        return BatchBuilder(data, parts.batches.encoder, 1.0).build_fixed(list(range(len(data.records))))

    def image_batch(self, pixels: torch.Tensor, captions: list[str]) -> Batch:
        """Images (B x 3 x H x W in [-1, 1]) that are not in the dataset as a training batch: encoded
        by this run's VAE, full weight, not regularisation, the whole image as the crop."""
        parts = self._parts
        parts.bundle.vae.to(parts.device)
        n, h, w = pixels.shape[0], pixels.shape[-2], pixels.shape[-1]
        return Batch(latents=parts.batches.encoder(pixels), captions=list(captions), size_info=[(h, w, 0, 0, h, w)] * n,
                     weights=torch.ones(n), is_reg=torch.zeros(n, dtype=torch.bool), mask=None, records=[-1] * n)

    # --- losses and predictions ---------------------------------------------------------------
    # Noise (and, when `timesteps` is None, the timesteps) come from `gen`, or from the trainer's
    # step generator for `seed`: the same for the same seed, with the adapters on or off.
    def _gen(self, seed: int, gen: torch.Generator | None) -> torch.Generator:
        return gen if gen is not None else step_generator(seed, 0, 0)

    @torch.no_grad()
    def losses(self, batch: Batch, timesteps: torch.Tensor | None = None, seed: int = 0,
               gen: torch.Generator | None = None) -> torch.Tensor:
        """(B,) unweighted training loss of each sample, on the unwrapped model as it is (use
        `adapters(False)` for the base model's)."""
        denoiser = self._parts.denoiser
        t = None if timesteps is None else timesteps.long()
        with self.autocast():
            return denoiser.loss(batch, self._gen(seed, gen), timesteps=t, local=True, weighted=False).per_sample

    @torch.no_grad()
    def predictions(self, batch: Batch, timesteps: torch.Tensor | None = None, seed: int = 0,
                    gen: torch.Generator | None = None) -> torch.Tensor:
        """The model's output on the noised batch (fp32)."""
        denoiser = self._parts.denoiser
        t = None if timesteps is None else timesteps.long()
        with self.autocast():
            inputs = denoiser.noisy_inputs(batch, self._gen(seed, gen), t, local=True)
            return denoiser.predict(inputs, denoiser.local_model).float()

    def load_lora(self, path: Path) -> None:
        """Put a LoRA file saved by this run (or one that fits its network exactly) into the network."""
        from library.lora.compat import network_target, read_checked

        network = self._parts.network
        weights, _ = read_checked(path, network_target(network, "the network being trained"))
        network.load_modules(weights.modules, str(path))

    # --- training -----------------------------------------------------------------------------
    def on_step(self, listener: Callable[[StepReport, dict], None]) -> None:
        """Call `listener(report, scalars)` after every optimizer step."""
        self._trainer.listeners.append(listener)

    def fix_samples(self, step: int = 0) -> None:
        """Train every following step on the micro-batches of `step` (no data loading)."""
        self._trainer.fix_samples(step)

    def train_step(self, step: int):
        return self._trainer.train_step(step)

    def use_method(self, name: str, apt=None) -> None:
        """Train on with another registered method (e.g. "plain", "apt"); `apt` replaces the [apt]
        options for it. The current method is detached from the model first."""
        parts = self._parts
        setup = parts.method_setup
        if apt is not None:
            setup = replace(setup, cfg=replace(setup.cfg, apt=apt))
        vae = parts.bundle.vae
        home = next(vae.parameters()).device
        vae.to(parts.device)  # a method may encode while it is built (APT's border fill)
        try:
            method = methods()[name].build(setup)
        finally:
            vae.to(home)
        self._trainer.use_method(method)

    @property
    def method(self) -> str:
        return self._parts.method.name

    def indicator(self) -> dict | None:
        """APT's overfitting indicator now: per bin the EMAs of both losses, whether seen, gamma and
        the timestep range; None when the method has no indicator."""
        controller = getattr(self._parts.method, "controller", None)
        if controller is None:
            return None
        from library.apt.indicator import bin_ranges

        ind = controller.indicator
        return {"ema_theta": ind.ema_theta.tolist(), "ema_ref": ind.ema_ref.tolist(), "seen": ind.seen.tolist(),
                "gamma": ind.gamma().tolist(), "bins": bin_ranges(ind.bins, ind.num_timesteps),
                "scale": ind.scale, "form": ind.form}
