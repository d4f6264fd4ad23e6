"""The training job: build the run, then the optimizer steps with saves, samples and validation.

The `Trainer` keeps the run's parts (`parts`, a library.train.builder.TrainingRun: everything
built once), what reports on them (`reporting`) and the state of the steps (the step counter, the data stream, the losses so far). Per finished step it
builds one StepReport, asks the metric sources for their scalars and hands them to the trackers,
the progress bar and the step listeners (library.train.probe lets benchmarks listen without
patching anything).
"""
from __future__ import annotations

import logging
import os
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from library.config import Config
from library.config.loader import table_fields
from library.errors import UserError
from library.train import checkpoint, control, events, resume
from library.train import metrics as step_metrics
from library.train.batches import MicroBatches, micro_batch_stream
from library.train.builder import build_reporting, build_run
from library.train.control import Control
from library.train.diffusion import step_generator
from library.train.metrics import StepReport
from library.train.method import TrainingMethod

log = logging.getLogger(__name__)


class Trainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.step = 0                # optimizer steps completed
        self.losses: list[float] = []
        self.listeners: list[Callable[[StepReport, dict], None]] = []
        self._stream = None
        self._stream_next = -1
        self._fixed_samples: list[list] | None = None
        self.resumed_from: Path | None = None
        self._commands_from = control.command_offset(Path(cfg.saving.output_dir) / control.COMMANDS_NAME)
        # The event stream (main process): nothing is written unless the run fails here or runs.
        self.events = events.EventLog.for_output(cfg.saving.output_dir)
        with self.events.capture_warnings():
            try:
                self.parts = build_run(cfg)
                self.reporting = build_reporting(self.parts, self._write_state, self.config_summary())
                self.reporting.outputs.events = self.events
                if cfg.saving.resume:
                    self._resume(cfg.saving.resume)
            except BaseException as exc:
                self._report_failure(exc)
                raise
        self.listeners.append(events.StepEvents(self.events, self.parts.total_steps))

    @property
    def probe(self):
        """The public view for benchmarks and tests (library.train.probe.Probe)."""
        from library.train.probe import Probe

        return Probe(self)

    def use_method(self, method) -> None:
        """Switch the training method on the loaded model: the current one is detached first."""
        self.parts.method.detach()
        method.attach()
        self.parts.method = self.reporting.outputs.method = method

    # --- resume -------------------------------------------------------------------------------
    def _resume(self, where: str) -> None:
        run = self.parts
        folder, state = resume.restore(where, Path(self.cfg.saving.output_dir), self.cfg.saving.output_name,
                                       run.network, run.optimizer, run.scheduler, run.total_steps)
        run.method.load_state_dict(state.extra, str(folder))
        scaler = run.accelerator.scaler
        if scaler is not None and "grad_scaler" in state.extra:
            scaler.load_state_dict(state.extra["grad_scaler"])
        self.step = state.step
        self.resumed_from = folder
        epoch, _ = run.plan.step_batches(self.step)
        changes = resume.data_changes(state.data, checkpoint.describe_data(run.data, run.plan))
        if changes:
            log.warning("%s: %s since this state was saved; the data order continues from step %d of the "
                        "current settings", folder, "; ".join(changes), self.step)
        elif (epoch, run.plan.steps_per_epoch) != (state.epoch, state.extra.get("steps_per_epoch")):
            log.warning("%s: the dataset or batch settings changed since this state was saved; the data order "
                        "continues from step %d of the current settings", folder, self.step)
        log.info("resumed from %s at step %d (epoch %d)", folder, self.step, epoch)

    def train_state(self) -> checkpoint.TrainState:
        run = self.parts
        epoch, micro = run.plan.step_batches(self.step)  # where the next step will read
        extra = {"steps_per_epoch": run.plan.steps_per_epoch, **run.method.state_dict()}
        if run.accelerator.scaler is not None:  # fp16: the loss scale must continue where it was
            extra["grad_scaler"] = run.accelerator.scaler.state_dict()
        return checkpoint.TrainState(
            step=self.step, consumed=self.step * run.plan.accumulation * run.plan.world, epoch=epoch,
            position=micro[0][0], network=checkpoint.describe_network(run.network),
            data=checkpoint.describe_data(run.data, run.plan), extra=extra)

    def _write_state(self, folder: Path) -> None:
        run = self.parts
        checkpoint.write_state(folder, run.network.kohya_state_dict(), run.optimizer, run.scheduler,
                               self.train_state())

    # --- one optimizer step -------------------------------------------------------------------
    def fix_samples(self, step: int = 0) -> None:
        """Train every following step on the micro-batches of `step` (benchmarks time steps without
        data loading, on the same batch for every variant)."""
        self._fixed_samples = self.step_samples(step)

    def step_samples(self, step: int) -> list[list]:
        """The samples of each micro-batch of `step`, from the (possibly multi-process) loader."""
        if self._fixed_samples is not None:
            return self._fixed_samples
        run = self.parts
        if self._stream is None or self._stream_next != step:
            dataset = MicroBatches(run.data, run.plan, step, run.total_steps, run.batches.cache is None)
            workers = 0 if run.batches.cache is not None else self.cfg.training.max_data_loader_n_workers
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
        """Optimizer step `step` (0-based); returns (loss, grad norm), or None when a step with a
        non-finite loss was skipped."""
        run, cfg = self.parts, self.cfg
        acc, method = run.accelerator, run.method
        micro = self.step_samples(step)
        total = 0.0
        results = []
        for m, samples in enumerate(micro):
            batch = run.batches.assemble(samples)
            gen = step_generator(cfg.training.seed, step, m, acc.process_index)
            with ExitStack() as stack:
                if m < len(micro) - 1:  # gradients are synchronised once, with the last micro-batch
                    for model in run.wrapped:
                        stack.enter_context(acc.no_sync(model))
                try:
                    with acc.autocast():
                        result = run.denoiser.loss(batch, gen, method.step(batch, step))
                    if not self._all_finite(result.loss):
                        return self._skip_step(step, result.loss)
                    acc.backward(result.loss / len(micro))
                finally:
                    method.after_backward()
            self.reporting.timestep_table.update(result.per_sample.float().cpu(), result.timesteps)
            total += result.loss.item() / len(micro)
            results.append((result, batch))
        method.end_step(step, results)
        optimizer = run.optimizer
        params = [p for g in optimizer.param_groups for p in g["params"]]
        max_norm = cfg.optimizer.max_grad_norm or float("inf")  # inf: measure without clipping
        grad_norm = float(acc.clip_grad_norm_(params, max_norm))
        optimizer.step()
        # fp16: a step the loss scaler skipped (inf gradients) does not advance the schedule, as in
        # accelerate's own scheduler wrapper.
        if not getattr(optimizer, "step_was_skipped", False):
            run.scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return total, grad_norm

    def _all_finite(self, loss: torch.Tensor) -> bool:
        acc = self.parts.accelerator
        bad = torch.tensor([0.0 if torch.isfinite(loss) else 1.0], device=acc.device)
        if acc.num_processes > 1:
            bad = acc.reduce(bad, "sum")  # every process skips or stops together
        return bad.item() == 0

    def _skip_step(self, step: int, loss: torch.Tensor) -> None:
        self.parts.optimizer.zero_grad(set_to_none=True)
        epoch = self.parts.plan.epoch_of(step)
        if not self.cfg.training.skip_nan_steps:
            raise UserError(f"loss became {loss.item()} at step {step + 1} (epoch {epoch}); stopped without "
                            "saving anything new. Lower the learning rate, use mixed_precision = \"bf16\" or "
                            "\"no\", or set skip_nan_steps = true")
        log.warning("loss is %s at step %d (epoch %d): step skipped", loss.item(), step + 1, epoch)
        # The step counter moves on, so the learning-rate schedule must too: it is a function of the step.
        self.parts.scheduler.step()
        return None

    # --- the run ------------------------------------------------------------------------------
    def run(self) -> Path:
        """Train to the last step, or until a stop command or signal (library.train.control)."""
        run, outputs = self.parts, self.reporting.outputs
        acc = run.accelerator
        with self.events.capture_warnings(), \
                Control(Path(self.cfg.saving.output_dir), acc, lambda message: log.warning("%s", message),
                        self._commands_from) as commands:
            try:
                self.events.start(**self.start_fields())
                outputs.begin(self.step, time.time())
                if self.step == 0:
                    outputs.at_start()
                bar = tqdm(total=run.total_steps, initial=self.step, desc="training", unit="step",
                           disable=not acc.is_main_process)
                samples_per_step = sum(len(ref.items) for _, ref in run.plan.step_batches(self.step)[1]) * \
                    acc.num_processes
                try:
                    stopped = self._train_loop(bar, samples_per_step, commands)
                finally:
                    bar.close()
                    self._close_stream()
                path = outputs.stop() if stopped else outputs.finish()
            except BaseException as exc:
                self._report_failure(exc)
                raise
            loras, states = outputs.existing_saves()
            self.events.emit("end", status="stopped" if stopped else "finished", step=self.step, outputs=loras,
                             states=states)
            self.events.close()
        if stopped:
            log.info("stopped at step %d; resume = \"latest\" continues from %s", self.step,
                     path.with_name(path.stem + checkpoint.STATE_SUFFIX))
        return path

    def start_fields(self) -> dict:
        run = self.parts
        name = run.method.name
        return {"config": table_fields(self.cfg), "dataset": events.dataset_summary(run.data),
                "dataset_config": run.data.source, "max_steps": run.total_steps,
                "output_dir": self.cfg.saving.output_dir, "output_name": self.cfg.saving.output_name,
                "pid": os.getpid(), "resumed_from": self.resumed_from, "step": self.step,
                "method": "lora" if name == TrainingMethod.name else name,
                "network_type": self.cfg.network.network_type, "processes": run.accelerator.num_processes}

    def _report_failure(self, exc: BaseException) -> None:
        """The error line and a failed end in the events (the entry point prints the same line)."""
        self.events.flush_pending()
        self.events.emit("error", message=events.error_line(exc))
        outputs = getattr(getattr(self, "reporting", None), "outputs", None)
        loras, states = outputs.existing_saves() if outputs is not None else ([], [])
        self.events.emit("end", status="failed", step=self.step, outputs=loras, states=states)
        self.events.close()

    def _close_stream(self) -> None:
        stream, self._stream = self._stream, None
        shutdown = getattr(stream, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()  # stop loader workers now; left to garbage collection it takes seconds

    def _train_loop(self, bar, samples_per_step: int, control: Control | None = None) -> bool:
        """The steps; True when a stop was asked for before the last one."""
        run, reporting = self.parts, self.reporting
        while self.step < run.total_steps:
            step = self.step
            tick = time.time()
            step_metrics.start_step(reporting.metrics)
            result = self.train_step(step)
            self.step = step + 1
            if result is not None:
                loss, grad_norm = result
                self.losses.append(loss)
                report = StepReport(self.step, run.plan.epoch_of(step), loss, grad_norm, time.time() - tick,
                                    samples_per_step)
                values = step_metrics.collect(reporting.metrics, report)
                reporting.tracker.log(values, step=self.step)
                bar.set_postfix(loss=f"{loss:.4f}", avg=f"{values['loss_avg']:.4f}", epoch=report.epoch)
                for listener in self.listeners:
                    listener(report, values)
            bar.update(1)
            reporting.outputs.after_step(step)
            if control is not None and self._obey(control.due()):
                return self.step < run.total_steps
        return False

    def _obey(self, commands: list) -> bool:
        """Act on the commands due after this step (every process alike); True for a stop."""
        outputs, stop = self.reporting.outputs, False
        for command in commands:
            if command.command == "save":
                outputs.save_now()
            elif command.command == "sample":
                if outputs.handles.sample is None:
                    log.warning("sample command %s: this run has no sample_prompts; nothing to render",
                                command.id)
                else:
                    outputs.sample(self.step)
            elif command.command == "stop":
                stop = True
            self.events.emit("command", command=command.command, id=command.id, step=self.step,
                             source=command.source)
        return stop

    def config_summary(self) -> dict:
        return {f"{table}.{k}": v for table, values in table_fields(self.cfg).items() for k, v in values.items()}


def train(cfg: Config) -> Path:
    return Trainer(cfg).run()
