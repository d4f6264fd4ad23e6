"""Per-step metrics: small sources, each reporting its own scalars once an optimizer step is done.

The loop builds one `StepReport` per finished step and asks every source for its scalars; the
trackers, the progress bar, benchmarks (library.train.probe) and any other listener read the
same dictionary, so a new metric is one new source, not another line in the loop.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

from library.train.tracking import PeakMemory, RunMemory


@dataclass(frozen=True)
class StepReport:
    """One finished optimizer step."""
    step: int            # optimizer steps completed, this one included (1-based)
    epoch: int           # the epoch it belonged to (from 1)
    loss: float          # mean loss over its micro-batches
    grad_norm: float
    seconds: float       # wall time of the step
    samples: int         # samples trained in it, over all processes


class StepMetric(Protocol):
    def __call__(self, report: StepReport) -> dict[str, float]: ...


class LossAverage:
    """The step's loss and an exponential moving average of it (what the progress bar shows)."""

    def __init__(self, decay: float = 0.95):
        self.decay = decay
        self.value: float | None = None

    def __call__(self, report: StepReport) -> dict[str, float]:
        self.value = report.loss if self.value is None else self.decay * self.value + (1 - self.decay) * report.loss
        return {"loss": report.loss, "loss_avg": self.value, "grad_norm": report.grad_norm, "epoch": report.epoch}


def throughput(report: StepReport) -> dict[str, float]:
    return {"s_per_it": report.seconds, "samples_per_s": report.samples / max(report.seconds, 1e-9)}


class LearningRates:
    def __init__(self, optimizer):
        self.optimizer = optimizer

    def __call__(self, report: StepReport) -> dict[str, float]:
        return {f"lr/{group.get('name', 'group')}": group["lr"] or 0.0 for group in self.optimizer.param_groups}


class MemoryPeaks:
    """Peak memory of each step (library.train.tracking.PeakMemory, reset when a step starts), and
    on a GPU reserved memory and the whole run's peaks (RunMemory: caching and sampling included)."""

    def __init__(self, device):
        self.peak = PeakMemory(device)
        self.run = RunMemory(device)

    def start_step(self) -> None:
        self.run.start_step()  # reads the peaks of the phase before this step, before they reset
        self.peak.start_step()

    def __call__(self, report: StepReport) -> dict[str, float]:
        return {**self.peak.scalars(), **self.run.scalars()}


def from_callable(fn: Callable[[], dict[str, float]]) -> StepMetric:
    """A source that needs no report (the training method's metrics, the loss-by-timestep table)."""
    return lambda report: fn()


def collect(sources: list, report: StepReport) -> dict[str, float]:
    out: dict[str, float] = {}
    for source in sources:
        out.update(source(report))
    return out


def start_step(sources: list) -> None:
    for source in sources:
        hook = getattr(source, "start_step", None)
        if hook is not None:
            hook()
