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
from library.train.events import EventLog
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
    sample_records: Callable[[int], list[dict]] | None = None  # what a sample round writes: path, prompt, seed


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
        self.events = EventLog(None)     # the trainer gives the main process its event log
        self.saved: list[tuple[Path, Path | None]] = []  # (LoRA, state folder) saved by this process
        self.last_saved_state = -1       # the step of the newest step save with a state

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
            log.info("step %d/%d (epoch %d): loss by timestep (unweighted MSE, moving average):\n%s",
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

    def stop(self) -> Path:
        """A stop before the last step: the LoRA and a resumable state as a step save (what a resume
        with resume = "latest" continues from); no final save, no end-of-run sample or validation."""
        path = self.save_now()
        self.tracker.close()
        return path

    def save_now(self) -> Path:
        """The LoRA and a state at the current step (a step save), unless one was just written."""
        name = checkpoint.save_name(self.cfg.saving.output_name, "step", self.step)
        if self.last_saved_state == self.step:
            return self.out_dir / f"{name}.safetensors"
        return self.save("step", self.step, state=True)

    def existing_saves(self) -> tuple[list[Path], list[Path]]:
        """The LoRA files and state folders this process saved that are still there (not pruned)."""
        loras, states = [], []
        for lora, state in self.saved:
            if lora.is_file() and lora not in loras:
                loras.append(lora)
            if state is not None and state.is_dir() and state not in states:
                states.append(state)
        return loras, states

    # --- saving -------------------------------------------------------------------------------
    def save(self, kind: str, number: int, state: bool | None = None) -> Path:
        """The LoRA and, with save_state (or `state`), its training state. The LoRA is renamed into place
        only once its state is written, so a save that fails (a full disk) leaves both as they were."""
        name = checkpoint.save_name(self.cfg.saving.output_name, kind, number)
        path = self.out_dir / f"{name}.safetensors"
        with_state = self.cfg.saving.save_state if state is None else state
        folder = self.out_dir / f"{name}-state" if with_state else None
        self.acc.wait_for_everyone()
        if self.main:
            def write_state() -> None:
                if folder is not None:
                    self.handles.write_state(folder)
                    log.info("saved training state %s", folder)

            digest = write_lora(path, self.handles.lora_tensors(), self.metadata(), before_rename=write_state)
            log.info("saved %s (sshs_model_hash %s)", path, digest[:12])
            self.saved.append((path, folder))
            self.events.emit("save", step=self.step, path=path, state=folder, kind=kind)
            self.prune(kind)
            self.method.write_reports(self.out_dir, self.cfg.saving.output_name)
        if kind == "step" and folder is not None:
            self.last_saved_state = self.step
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
            records = self.handles.sample_records(n) if self.handles.sample_records is not None else []
            grid = self.out_dir / "sample" / images[-1][0] if images else None
            self.events.emit("sample", step=n, images=records, grid=grid)
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
            self.events.emit("validation", step=n, loss=values["val/loss"], losses=values)
        self.acc.wait_for_everyone()
