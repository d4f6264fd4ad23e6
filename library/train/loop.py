"""The training job: build the run, then the optimizer steps with saves, samples and validation."""
from __future__ import annotations

import logging
import time
from contextlib import ExitStack
from pathlib import Path

import torch
from tqdm.auto import tqdm

from library.config import Config
from library.config.loader import table_fields
from library.data.summary import dataset_summary, tag_frequency
from library.errors import UserError
from library.lora.kohya_file import SAVE_DTYPES
from library.lora.metadata import TrainingFacts
from library.train import checkpoint, resume
from library.train.batches import MicroBatches, micro_batch_stream
from library.train.builder import build_run
from library.train.diffusion import step_generator
from library.train.method import TrainingMethod
from library.train.optimizers import optimizer_description
from library.train.output import Outputs, RunHandles
from library.train.prompts import load_prompts
from library.train.sampling import Sampler
from library.train.tracking import PeakMemory, TimestepLossTable, Tracker, trackers_for

log = logging.getLogger(__name__)


class Trainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        run = build_run(cfg)
        self.accelerator, self.precision = run.accelerator, run.precision
        self.device = run.accelerator.device
        self.data, self.plan, self.total_steps = run.data, run.plan, run.total_steps
        self.bundle, self.network, self.batches = run.bundle, run.network, run.batches
        self.optimizer, self.scheduler = run.optimizer, run.scheduler
        self.denoiser, self.method, self.validator = run.denoiser, run.method, run.validator
        # DDP wrappers whose gradient sync is postponed to the last micro-batch of a step.
        self.synced = run.wrapped
        self.timestep_table = TimestepLossTable(self.denoiser.diffusion.num_timesteps)
        self.sampler = make_sampler(cfg, self.data, self.bundle)
        self.outputs = Outputs(cfg, self.accelerator, Tracker(self.accelerator, trackers_for(cfg.logging.log_with),
                                                              cfg.saving.output_name, self.config_summary()),
                               self.plan, self.total_steps, self.method, self.handles())
        self.step = 0
        self._stream = None
        self._stream_next = -1
        self.losses: list[float] = []
        if cfg.saving.resume:
            self._resume(cfg.saving.resume)

    def handles(self) -> RunHandles:
        bundle = self.bundle
        facts = TrainingFacts(
            base_model_version=bundle.base_model_version, resolution=resolution_of(self.data, bundle), steps=0,
            epochs=0, started_at=0.0, mixed_precision=self.precision, batches_per_epoch=self.plan.batches,
            optimizer=optimizer_description(self.optimizer, self.cfg.optimizer.optimizer_args),
            **dataset_summary(self.data), tag_frequency=tag_frequency(self.data))
        return RunHandles(
            lora_tensors=lambda: self.network.kohya_state_dict(SAVE_DTYPES[self.cfg.saving.save_precision]),
            write_state=lambda folder: checkpoint.write_state(folder, self.network.kohya_state_dict(), self.optimizer,
                                                              self.scheduler, self.train_state()),
            facts=facts, loss_table=self.timestep_table.render,
            sample=self._sample if self.sampler is not None else None,
            validate=self._validate if self.validator else None)

    def _sample(self, n: int) -> list:
        return self.sampler.run(self.bundle, self.bundle.unet, self.device, n, self.accelerator.autocast,
                                self.network.set_enabled)

    def _validate(self) -> dict[str, float]:
        with self.accelerator.autocast():
            return self.validator.run(self.batches, self.denoiser)

    def use_method(self, method: TrainingMethod) -> None:
        """Switch the training method on the loaded model (benchmarks compare methods side by side)."""
        self.method = self.outputs.method = method

    # --- resume -------------------------------------------------------------------------------
    def _resume(self, where: str) -> None:
        folder, state = resume.restore(where, Path(self.cfg.saving.output_dir), self.cfg.saving.output_name,
                                       self.network, self.optimizer, self.scheduler, self.total_steps)
        self.method.load_state_dict(state.extra, str(folder))
        scaler = self.accelerator.scaler
        if scaler is not None and "grad_scaler" in state.extra:
            scaler.load_state_dict(state.extra["grad_scaler"])
        self.step = state.step
        epoch, _ = self.plan.step_batches(self.step)
        if (epoch, self.plan.steps_per_epoch) != (state.epoch, state.extra.get("steps_per_epoch")):
            log.warning("%s: the dataset or batch settings changed since this state was saved; the data order "
                        "continues from step %d of the current settings", folder, self.step)
        log.info("resumed from %s at step %d (epoch %d)", folder, self.step, epoch)

    def train_state(self) -> checkpoint.TrainState:
        epoch, micro = self.plan.step_batches(self.step)  # where the next step will read
        extra = {"steps_per_epoch": self.plan.steps_per_epoch, **self.method.state_dict()}
        if self.accelerator.scaler is not None:  # fp16: the loss scale must continue where it was
            extra["grad_scaler"] = self.accelerator.scaler.state_dict()
        return checkpoint.TrainState(
            step=self.step, consumed=self.step * self.plan.accumulation * self.plan.world, epoch=epoch,
            position=micro[0][0], network=checkpoint.describe_network(self.network), extra=extra)

    # --- one optimizer step -------------------------------------------------------------------
    def step_samples(self, step: int) -> list[list]:
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
        """One optimizer step; returns (loss, grad norm), or None when a step with a non-finite loss
        was skipped."""
        acc, cfg = self.accelerator, self.cfg
        micro = self.step_samples(step)
        total = 0.0
        results = []
        for m, samples in enumerate(micro):
            batch = self.batches.assemble(samples)
            gen = step_generator(cfg.training.seed, step, m, acc.process_index)
            with ExitStack() as stack:
                if m < len(micro) - 1:  # gradients are synchronised once, with the last micro-batch
                    for model in self.synced:
                        stack.enter_context(acc.no_sync(model))
                try:
                    with acc.autocast():
                        result = self.denoiser.loss(batch, gen, self.method.step(batch, step))
                    if not self._all_finite(result.loss):
                        return self._skip_step(step, result.loss)
                    acc.backward(result.loss / len(micro))
                finally:
                    self.method.after_backward()
            self.timestep_table.update(result.per_sample.float().cpu(), result.timesteps)
            total += result.loss.item() / len(micro)
            results.append((result, batch))
        self.method.end_step(step + 1, results)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        max_norm = cfg.optimizer.max_grad_norm or float("inf")  # inf: measure without clipping
        grad_norm = float(acc.clip_grad_norm_(params, max_norm))
        self.optimizer.step()
        # fp16: a step the loss scaler skipped (inf gradients) does not advance the schedule, as in
        # accelerate's own scheduler wrapper.
        if not getattr(self.optimizer, "step_was_skipped", False):
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total, grad_norm

    def _all_finite(self, loss: torch.Tensor) -> bool:
        bad = torch.tensor([0.0 if torch.isfinite(loss) else 1.0], device=self.device)
        if self.accelerator.num_processes > 1:
            bad = self.accelerator.reduce(bad, "sum")  # every process skips or stops together
        return bad.item() == 0

    def _skip_step(self, step: int, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        epoch = self.plan.epoch_of(step)
        if not self.cfg.training.skip_nan_steps:
            raise UserError(f"loss became {loss.item()} at step {step + 1} (epoch {epoch}); stopped without "
                            "saving anything new. Lower the learning rate, use mixed_precision = \"bf16\" or "
                            "\"no\", or set skip_nan_steps = true")
        log.warning("loss is %s at step %d (epoch %d): step skipped", loss.item(), step + 1, epoch)
        # The step counter moves on, so the learning-rate schedule must too: it is a function of the step.
        self.scheduler.step()
        return None

    # --- the run ------------------------------------------------------------------------------
    def run(self) -> Path:
        acc = self.accelerator
        self.outputs.begin(self.step, time.time())
        if self.step == 0:
            self.outputs.at_start()
        bar = tqdm(total=self.total_steps, initial=self.step, desc="training", unit="step",
                   disable=not acc.is_main_process)
        samples_per_step = sum(len(ref.items) for _, ref in self.plan.step_batches(self.step)[1]) * acc.num_processes
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
        memory = PeakMemory(self.device)
        while self.step < self.total_steps:
            step = self.step
            tick = time.time()
            memory.start_step()
            result = self.train_step(step)
            self.step = step + 1
            if result is not None:
                loss, grad_norm = result
                self.losses.append(loss)
                ema = loss if ema is None else 0.95 * ema + 0.05 * loss
                seconds = time.time() - tick
                metrics = {"loss": loss, "loss_avg": ema, "grad_norm": grad_norm, "s_per_it": seconds,
                           "samples_per_s": samples_per_step / max(seconds, 1e-9),
                           **memory.scalars(), "epoch": self.plan.epoch_of(step)}
                for group in self.optimizer.param_groups:
                    metrics[f"lr/{group.get('name', 'group')}"] = group["lr"] or 0.0
                metrics.update(self.method.metrics())
                self.outputs.tracker.log({**metrics, **self.timestep_table.scalars()}, step=self.step)
                bar.set_postfix(loss=f"{loss:.4f}", avg=f"{ema:.4f}", epoch=self.plan.epoch_of(step))
            bar.update(1)
            self.outputs.after_step(step)

    def config_summary(self) -> dict:
        return {f"{table}.{k}": v for table, values in table_fields(self.cfg).items() for k, v in values.items()}


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


def train(cfg: Config) -> Path:
    return Trainer(cfg).run()
