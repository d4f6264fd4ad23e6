"""The event stream: what a training run reports, one JSON object per line in `output_dir/events.jsonl`.

Schema version 1. The main process alone writes; every line is flushed as it is written, so the
file can be read (tailed) while the run goes on, and a resumed run appends to the same file. Each
line is one event:

    {"v": 1, "type": "...", "time": <unix seconds, float>, "run": "<id of this process's run>", ...}

and, by type (fields may be added in later versions of v1, never removed or changed):

- "start": `config` (the resolved options by table), `dataset` ({"images", "subsets": [{"dir",
  "images", "repeats"}], "buckets": [[w, h, count], ...]}), `max_steps`, `output_dir`, `pid`,
  `resumed_from` (the state folder, or null), `method` ("lora" for plain training, "apt", ...),
  `step` (the step the run starts from).
- "step" (every optimizer step): `step` (1-based, over the whole run), `loss`, `loss_avg` (moving
  average), `lr` ({parameter group: value}), `epoch`, `s_per_step`, `eta_s`, `peak_memory_bytes`
  (int or null), `grad_norm`, `metrics` (every scalar the trackers get), and with APT `apt`:
  {"gamma": [per timestep bin], "bins": [first timestep of each bin], "loss_weight": float}.
- "validation": `step`, `loss`, `losses` ({"val/loss_t100": ...}).
- "sample": `step`, `images` ([{"path", "prompt", "seed"}, ...]; base-model images have "base": true)
  and `grid` (the contact sheet's path).
- "save": `step`, `path` (the LoRA file), `state` (its state folder, or null).
- "warning": `message` (every WARNING the trainer logs).
- "command": `command`, `id`, `step`: a command from commands.jsonl or a signal, once acted on
  (library.train.control).
- "error": `message` (the one-line error the run stopped with).
- "end": `status` ("finished", "stopped" or "failed"), `step`, `outputs` (the LoRA files this run
  saved that still exist).

Non-finite numbers are written as null (JSON has no NaN). A line cut short by a killed process is
followed by a newline before the next run appends, so readers skip exactly that one line.

Reporting never stops training: when the file cannot be written (a full disk, a read-only
folder), one WARNING says so and the run goes on without events.
"""
from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

SCHEMA_VERSION = 1
EVENTS_NAME = "events.jsonl"
log = logging.getLogger(__name__)


def jsonable(value: Any) -> Any:
    """`value` as plain JSON data: paths and unknown objects as strings, tuples as lists, non-finite
    floats as None, tensors and numpy scalars as numbers or lists."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [jsonable(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    tolist = getattr(value, "tolist", None)  # torch tensors, numpy arrays and scalars
    if callable(tolist):
        return jsonable(tolist())
    return str(value)


def is_main_process() -> bool:
    """Before accelerate starts: `accelerate launch` and torchrun give every process a RANK."""
    return os.environ.get("RANK", "0") == "0"


class EventLog:
    """Appends events to one file; `EventLog(None)` (another process than the main one) writes nothing."""

    def __init__(self, path: Path | None, run_id: str | None = None):
        self.path = path
        self.run = run_id or f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"
        self._fh = None
        self._failed = False
        self._lock = threading.RLock()
        self._pending: list[str] = []   # warnings logged before the start event
        self.started = False

    @classmethod
    def for_output(cls, output_dir: str | os.PathLike) -> "EventLog":
        return cls(Path(output_dir) / EVENTS_NAME if is_main_process() else None)

    @property
    def enabled(self) -> bool:
        return self.path is not None and not self._failed

    def _open(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(self.path, "a+", encoding="utf-8")
        # A killed writer may have left half a line: end it, so that only that line is unreadable.
        if fh.tell() > 0:
            fh.seek(fh.tell() - 1)
            last = fh.read(1)
            fh.seek(0, os.SEEK_END)
            if last != "\n":
                fh.write("\n")
        return fh

    def emit(self, type: str, **fields: Any) -> None:
        """Write one event; never raises (an unwritable file is one WARNING, then events stop)."""
        if not self.enabled:
            return
        record = {"v": SCHEMA_VERSION, "type": type, "time": time.time(), "run": self.run, **jsonable(fields)}
        line = json.dumps(record, ensure_ascii=False, allow_nan=False) + "\n"
        failure = None
        with self._lock:
            if self._failed:
                return
            try:
                if self._fh is None:
                    self._fh = self._open()
                self._fh.write(line)
                self._fh.flush()
            except (OSError, ValueError) as exc:
                self._failed = True
                self._close_quietly()
                reason = getattr(exc, "strerror", None) or str(exc)
                failure = f"{self.path}: cannot write training events ({reason}); training goes on without them"
        if failure is not None:
            log.warning("%s", failure)

    def _close_quietly(self) -> None:
        fh, self._fh = self._fh, None
        if fh is not None:
            try:
                fh.close()
            except OSError:
                pass

    def close(self) -> None:
        with self._lock:
            self._close_quietly()

    # --- warnings -----------------------------------------------------------------------------
    def warning(self, message: str) -> None:
        if not self.started:  # said after the start event, so that every run's events begin with it
            self._pending.append(message)
            return
        self.emit("warning", message=message)

    def start(self, **fields: Any) -> None:
        self.emit("start", **fields)
        self.started = True
        pending, self._pending = self._pending, []
        for message in pending:
            self.emit("warning", message=message)

    def flush_pending(self) -> None:
        """Warnings of a run that failed before it started."""
        self.started = True
        pending, self._pending = self._pending, []
        for message in pending:
            self.emit("warning", message=message)

    @contextmanager
    def capture_warnings(self, logger_name: str = "library") -> Iterator[None]:
        """Every WARNING logged under `logger_name` meanwhile becomes a warning event."""
        if self.path is None:
            yield
            return
        handler = _WarningHandler(self)
        logger = logging.getLogger(logger_name)
        logger.addHandler(handler)
        try:
            yield
        finally:
            logger.removeHandler(handler)


class _WarningHandler(logging.Handler):
    def __init__(self, events: EventLog):
        super().__init__(logging.WARNING)
        self.events = events
        self._inside = threading.local()

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.ERROR or record.name == __name__ or getattr(self._inside, "on", False):
            return  # errors become the error event; the writer's own failure is not written to itself
        self._inside.on = True
        try:
            self.events.warning(record.getMessage())
        except Exception:  # a bad format string in someone's log call: never the run's problem
            pass
        finally:
            self._inside.on = False


# --- what the events say ---------------------------------------------------------------------------

def dataset_summary(data) -> dict:
    """{"images", "reg_images", "validation_images", "subsets": [{"dir", "images", "repeats", "is_reg"}],
    "buckets": [[w, h, count], ...]} of a library.data.dataset.TrainingData."""
    train = data.train_indices()
    subsets = []
    for d, spec in enumerate(data.specs):
        for sub in spec.subsets:
            count = sum(1 for i in train if data.records[i].dataset_index == d and data.records[i].subset is sub)
            subsets.append({"dir": sub.image_dir, "images": count, "repeats": sub.num_repeats, "is_reg": sub.is_reg,
                            "dataset": d})
    reg = sum(1 for i in train if data.records[i].subset.is_reg)
    return {"images": len(train) - reg, "reg_images": reg, "validation_images": len(data.validation),
            "subsets": subsets, "buckets": [list(b) for b in data.bucket_table()]}


def step_fields(values: dict[str, float], seconds: float, eta: float | None) -> dict:
    """The step event's fields from the metric sources' scalars (library.train.metrics)."""
    lr = {key[3:]: v for key, v in values.items() if key.startswith("lr/")}
    peak = values.get("peak_memory_gib")
    out = {"loss": values.get("loss"), "loss_avg": values.get("loss_avg"), "lr": lr, "epoch": values.get("epoch"),
           "s_per_step": seconds, "eta_s": eta,
           "peak_memory_bytes": int(round(peak * 2 ** 30)) if peak is not None and math.isfinite(peak) else None,
           "grad_norm": values.get("grad_norm"), "metrics": values}
    gammas = sorted((int(k[len("apt/gamma_t"):]), v) for k, v in values.items() if k.startswith("apt/gamma_t"))
    if gammas:
        out["apt"] = {"gamma": [g for _, g in gammas], "bins": [lo for lo, _ in gammas],
                      "loss_weight": values.get("apt/loss_weight")}
    return out


class Eta:
    """Seconds left: the wall time per step since the first step this process trained (saves, samples
    and validation included, which the step's own time leaves out) times the steps left."""

    def __init__(self, total_steps: int):
        self.total = total_steps
        self.first: tuple[int, float] | None = None

    def __call__(self, step: int, seconds: float) -> float:
        now = time.time()
        left = max(self.total - step, 0)
        if self.first is None:
            self.first = (step, now)
            return seconds * left
        done = step - self.first[0]
        return (now - self.first[1]) / done * left if done > 0 else seconds * left


def error_line(exc: BaseException) -> str:
    """The one line a failure is reported with (a UserError's own message; a bug's type and first line)."""
    from library.errors import UserError

    if isinstance(exc, UserError):
        return str(exc)
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted"
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


class StepEvents:
    """The trainer's step listener that writes one step event per optimizer step."""

    def __init__(self, events: EventLog, total_steps: int):
        self.events = events
        self.eta = Eta(total_steps)

    def __call__(self, report, values: dict[str, float]) -> None:
        if not self.events.enabled:
            return
        eta = self.eta(report.step, report.seconds)
        self.events.emit("step", step=report.step, **step_fields(values, report.seconds, eta))


def read_events(path: str | os.PathLike, offset: int = 0) -> tuple[list[dict], int]:
    """The complete events after byte `offset` of an events file, and the offset to read on from
    (for tailing a running run: a line still being written waits for its newline). Lines that do
    not parse (the cut-off line of a killed process) are skipped."""
    located, end = read_located(path, offset)
    return [event for _, event in located], end


def read_located(path: str | os.PathLike, offset: int = 0) -> tuple[list[tuple[int, dict]], int]:
    """Like read_events, with the byte offset where each event's line starts (the web UI pages by it)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            data = fh.read()
    except FileNotFoundError:
        return [], offset
    end = data.rfind(b"\n") + 1
    located, pos = [], offset
    for line in data[:end].split(b"\n")[:-1]:
        start, pos = pos, pos + len(line) + 1
        try:
            event = json.loads(line)
        except ValueError:
            continue  # empty, or cut short by a killed process (the trainer ends it before appending)
        if isinstance(event, dict) and "type" in event:
            located.append((start, event))
    return located, offset + end
