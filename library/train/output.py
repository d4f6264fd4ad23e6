"""Everything a run writes besides gradients: LoRA saves, training states, pruning, samples,
validation, logs. Only the main process writes; the others wait where they must.

Outputs never see the trainer: they get the step plan, the training method (for its reports,
metadata and state) and a few callables (`RunHandles`) that produce what a save, a sample round
or a validation needs when it is needed.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch

from library.lora.kohya_file import write_lora
from library.lora.metadata import TrainingFacts, build_metadata
from library.train import checkpoint
from library.train.batches import StepPlan
from library.train.method import TrainingMethod, method_metadata
from library.train.tracking import Tracker

log = logging.getLogger(__name__)


@dataclass
class RunHandles:
    """What outputs read from a run, as callables so that only the main process pays for them."""
    lora_tensors: Callable[[], dict[str, torch.Tensor]]   # the LoRA in kohya's layout, save precision
    write_state: Callable[[Path], None]                    # a training state folder for resume
    facts: TrainingFacts                                   # metadata facts (steps/epochs set per save)
    loss_table: Callable[[], str]                          # the loss-by-timestep table
    sample: Callable[[int], list] | None = None            # sample images at a step
    validate: Callable[[], dict[str, float]] | None = None  # validation losses
    ema_tensors: Callable[[], dict[str, torch.Tensor]] | None = None  # the EMA weights, as lora_tensors


class Outputs:
    def __init__(self, cfg, accelerator, tracker: Tracker, plan: StepPlan, total_steps: int,
                 method: TrainingMethod, handles: RunHandles):
        self.cfg = cfg
        self.out_dir = Path(cfg.saving.output_dir)
        self.acc = accelerator
        self.main = accelerator.is_main_process
        self.tracker = tracker
        self.plan = plan
        self.total_steps = total_steps
        self.method = method
        self.handles = handles
        self.step = 0
        self.started = 0.0
        self.last_sampled = -1
        self.last_validated = -1
        self.validation_history: list[tuple[int, float]] = []

    # --- lifecycle ----------------------------------------------------------------------------
    def begin(self, step: int, started: float) -> None:
        self.step = step
        self.started = started

    def at_start(self) -> None:
        if self.cfg.sampling.sample_at_first:
            self.sample(0)
        if self.cfg.training.validate_every_n_steps:
            self.validate(0)

    def after_step(self, step: int) -> None:
        """Saves, samples, validation and reports due after optimizer step `step` (from 0)."""
        n = self.step = step + 1
        plan, cfg = self.plan, self.cfg
        epoch = plan.epoch_of(step)
        epoch_end = plan.ends_epoch(step)
        final = n >= self.total_steps
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
        total = self.total_steps
        # Ten reports per run whatever the epoch length: one per epoch floods the log on small sets.
        if self.main and (final or (n * 10) // total != ((n - 1) * 10) // total):
            log.info("step %d/%d (epoch %d): loss by timestep (the run's loss_type, unweighted, moving average):\n%s",
                     n, total, epoch, self.handles.loss_table())

    def finish(self) -> Path:
        n = self.step
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
            digest = write_lora(path, self.handles.lora_tensors(), self.metadata())
            log.info("saved %s (sshs_model_hash %s)", path, digest[:12])
            if self.handles.ema_tensors is not None:
                ema_path = self.out_dir / f"{name}{checkpoint.EMA_SUFFIX}.safetensors"
                digest = write_lora(ema_path, self.handles.ema_tensors(), {**self.metadata(), "ss_ema_weights": "True"})
                log.info("saved %s (the EMA weights; sshs_model_hash %s)", ema_path, digest[:12])
            if self.cfg.saving.save_state:
                folder = self.out_dir / f"{name}-state"
                self.handles.write_state(folder)
                log.info("saved training state %s", folder)
            self.prune(kind)
            self.method.write_reports(self.out_dir, self.cfg.saving.output_name)
        self.acc.wait_for_everyone()
        return path

    def prune(self, kind: str) -> None:
        s, name = self.cfg.saving, self.cfg.saving.output_name
        if kind == "step" and s.save_last_n_steps:
            keep = [k for k in checkpoint.existing_numbers(self.out_dir, name, "step")
                    if k > self.step - s.save_last_n_steps]
            checkpoint.prune(self.out_dir, name, "step", keep)
        if kind == "epoch" and s.save_last_n_epochs:
            keep = checkpoint.existing_numbers(self.out_dir, name, "epoch")[-s.save_last_n_epochs:]
            checkpoint.prune(self.out_dir, name, "epoch", keep)

    def metadata(self) -> dict[str, str]:
        n = self.step
        facts = replace(self.handles.facts, steps=n, epochs=self.plan.epoch_of(max(n - 1, 0)) if n else 0,
                        started_at=self.started, extra=method_metadata(self.method))
        return build_metadata(self.cfg, facts)

    # --- samples and validation ---------------------------------------------------------------
    def sample(self, n: int) -> None:
        if self.handles.sample is None:
            return
        self.last_sampled = n
        if self.main:
            images = self.handles.sample(n)
            self.tracker.images(images, step=n)
            log.info("sample images for step %d in %s", n, self.out_dir / "sample")
        self.acc.wait_for_everyone()

    def validate(self, n: int) -> None:
        if self.handles.validate is None:
            return
        self.last_validated = n
        if self.main:
            values = self.handles.validate()
            self.tracker.log(values, step=n)
            log.info("validation loss at step %d: %.5f", n, values["val/loss"])
            self.validation_history.append((n, values["val/loss"]))
        self.acc.wait_for_everyone()
