"""Everything a run writes besides gradients: LoRA saves, training states, pruning, samples,
validation, logs. Only the main process writes; the others wait where they must."""
from __future__ import annotations

import json
import logging
from pathlib import Path

from library.lora.kohya_file import write_lora
from library.lora.metadata import TrainingFacts, build_metadata
from library.data.summary import dataset_summary, tag_frequency
from library.train import checkpoint
from library.train.optimizers import optimizer_description
from library.train.prompts import load_prompts
from library.train.sampling import Sampler
from library.train.tracking import Tracker, trackers_for

log = logging.getLogger(__name__)


class Outputs:
    def __init__(self, trainer, logging_dir: str):
        self.trainer = trainer
        cfg = trainer.cfg
        self.cfg = cfg
        self.out_dir = Path(cfg.saving.output_dir)
        self.acc = trainer.accelerator
        self.main = self.acc.is_main_process
        self.logging_dir = logging_dir
        self.tracker = Tracker(self.acc, trackers_for(cfg.logging.log_with), cfg.saving.output_name,
                               trainer.config_summary())
        spec = trainer.data.specs[0]
        size = spec.resolution or (trainer.bundle.native_resolution,) * 2
        self.resolution = tuple(size)
        self.sampler = None
        if cfg.sampling.sample_prompts:
            self.sampler = Sampler(load_prompts(cfg.sampling.sample_prompts), self.out_dir / "sample",
                                   cfg.saving.output_name, self.resolution, cfg.sampling.sample_sampler,
                                   cfg.training.seed, cfg.model.v_parameterization, cfg.training.zero_terminal_snr,
                                   cfg.sampling.sample_compare_base)
        self.started = 0.0
        self.last_sampled = -1
        self.last_validated = -1

    # --- lifecycle ----------------------------------------------------------------------------
    def begin(self, started: float) -> None:
        self.started = started

    def at_start(self) -> None:
        if self.cfg.sampling.sample_at_first:
            self.sample(0)
        if self.trainer.validator and self.cfg.training.validate_every_n_steps:
            self.validate(0)

    def after_step(self, step: int) -> None:
        n = step + 1
        plan, cfg = self.trainer.plan, self.cfg
        epoch = plan.epoch_of(step)
        epoch_end = plan.ends_epoch(step)
        final = n >= self.trainer.total_steps
        s = cfg.saving
        if not final and s.save_every_n_steps and n % s.save_every_n_steps == 0:
            self.save("step", n)
        if not final and epoch_end and s.save_every_n_epochs and epoch % s.save_every_n_epochs == 0:
            self.save("epoch", epoch)
        sp = cfg.sampling
        if (sp.sample_every_n_steps and n % sp.sample_every_n_steps == 0) or \
                (epoch_end and sp.sample_every_n_epochs and epoch % sp.sample_every_n_epochs == 0):
            self.sample(n)
        every = cfg.training.validate_every_n_steps
        if every and n % every == 0 and not final:
            self.validate(n)
        total = self.trainer.total_steps
        # Ten reports per run whatever the epoch length: one per epoch floods the log on small sets.
        if self.main and (final or (n * 10) // total != ((n - 1) * 10) // total):
            log.info("step %d/%d (epoch %d): loss by timestep (unweighted MSE, moving average):\n%s",
                     n, total, epoch, self.trainer.timestep_table.render())

    def finish(self) -> Path:
        n = self.trainer.step
        if self.cfg.training.validate_every_n_steps and self.last_validated != n:
            self.validate(n)
        sp = self.cfg.sampling
        if (sp.sample_every_n_steps or sp.sample_every_n_epochs) and self.last_sampled != n:
            self.sample(n)
        path = self.save("final", 0)
        self.tracker.close()
        return path

    # --- saving -------------------------------------------------------------------------------
    def save(self, kind: str, number: int) -> Path:
        name = checkpoint.save_name(self.cfg.saving.output_name, kind, number)
        path = self.out_dir / f"{name}.safetensors"
        self.acc.wait_for_everyone()
        if self.main:
            digest = write_lora(path, self.trainer.lora_tensors(), self.metadata())
            log.info("saved %s (sshs_model_hash %s)", path, digest[:12])
            if self.cfg.saving.save_state:
                folder = self.out_dir / f"{name}-state"
                checkpoint.write_state(folder, self.trainer.network.kohya_state_dict(), self.trainer.optimizer,
                                       self.trainer.scheduler, self.trainer.train_state())
                log.info("saved training state %s", folder)
            self.prune(kind)
            self.write_indicator()
        self.acc.wait_for_everyone()
        return path

    def write_indicator(self) -> None:
        apt = self.trainer.apt
        if apt is None or not apt.history.steps:
            return
        from library.apt.plot import write_csv, write_png

        h, n = apt.history, apt.indicator.num_timesteps
        write_csv(self.out_dir / "apt_indicator.csv", h.steps, h.gammas, n)
        write_png(self.out_dir / "apt_indicator.png", h.steps, h.gammas, n,
                  title=f"APT overfitting indicator: {self.cfg.saving.output_name}")

    def prune(self, kind: str) -> None:
        s, name = self.cfg.saving, self.cfg.saving.output_name
        if kind == "step" and s.save_last_n_steps:
            keep = [k for k in checkpoint.existing_numbers(self.out_dir, name, "step")
                    if k > self.trainer.step - s.save_last_n_steps]
            checkpoint.prune(self.out_dir, name, "step", keep)
        if kind == "epoch" and s.save_last_n_epochs:
            keep = checkpoint.existing_numbers(self.out_dir, name, "epoch")[-s.save_last_n_epochs:]
            checkpoint.prune(self.out_dir, name, "epoch", keep)

    def metadata(self) -> dict[str, str]:
        t = self.trainer
        facts = TrainingFacts(
            base_model_version=t.bundle.base_model_version, resolution=self.resolution, steps=t.step,
            epochs=t.plan.epoch_of(max(t.step - 1, 0)) if t.step else 0, started_at=self.started,
            mixed_precision=t.precision, batches_per_epoch=t.plan.batches,
            optimizer=optimizer_description(t.optimizer, self.cfg.optimizer.optimizer_args),
            **dataset_summary(t.data), tag_frequency=tag_frequency(t.data), extra=self.metadata_extra())
        return build_metadata(self.cfg, facts)

    def metadata_extra(self) -> dict:
        """Our own keys (no extra tensors): the APT settings and the final indicator per bin."""
        apt = self.trainer.apt
        if apt is None:
            return {"apt_enabled": "False"}
        from dataclasses import asdict

        from library.apt.indicator import bin_ranges

        ind = apt.indicator
        return {"apt_enabled": "True", "apt_settings": json.dumps(asdict(self.cfg.apt)),
                "apt_indicator": json.dumps([round(float(g), 6) for g in ind.gamma()]),
                "apt_indicator_bins": json.dumps([list(r) for r in bin_ranges(ind.bins, ind.num_timesteps)])}

    # --- samples and validation ---------------------------------------------------------------
    def sample(self, n: int) -> None:
        if self.sampler is None:
            return
        self.last_sampled = n
        if self.main:
            t = self.trainer
            images = self.sampler.run(t.bundle, t.base_unet, t.device, n, self.acc.autocast, t.network.set_enabled)
            self.tracker.images(images, step=n)
            log.info("sample images for step %d in %s", n, self.sampler.folder)
        self.acc.wait_for_everyone()

    def validate(self, n: int) -> None:
        if not self.trainer.validator:
            return
        self.last_validated = n
        if self.main:
            with self.acc.autocast():
                values = self.trainer.validator.run(self.trainer)
            self.tracker.log(values, step=n)
            log.info("validation loss at step %d: %.5f", n, values["val/loss"])
            self.trainer.validation_history.append((n, values["val/loss"]))
        self.acc.wait_for_everyone()

    # --- resume -------------------------------------------------------------------------------
    def state(self) -> dict:
        return {"apt": self.trainer.apt.state_dict()} if self.trainer.apt is not None else {}

    def restore(self, extra: dict) -> None:
        if self.trainer.apt is not None:
            if "apt" not in extra:
                log.warning("the state has no APT indicator (saved without apt); it starts from zero")
                return
            self.trainer.apt.load_state_dict(extra["apt"])
