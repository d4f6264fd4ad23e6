"""Commands to a running training: `output_dir/commands.jsonl`, SIGINT and SIGTERM.

A UI (or anyone) appends one JSON object per line to the command file:

    {"command": "stop" | "save" | "sample", "id": "<any string, echoed back>"}

The main process reads the lines added since its last look at every step boundary (it keeps the
byte offset; a line without its newline yet is left for the next look). Lines already in the file
when the process starts were meant for an earlier run and are skipped; one sent while the model
loads is acted on after the first step. A line that is not such an
object is skipped with a warning event. Under several processes the main process's commands (and
a signal any process received) are shared with every process, so all of them act after the same
step. Each command acted on is acknowledged with a "command" event (library.train.events).

- stop: the current step finishes, the LoRA and a resumable training state are saved as a step
  save, the end event says "stopped" and the process exits with status 0.
- save: the LoRA and a training state are saved now (a step save), and training goes on.
- sample: the sample prompts are rendered now.

SIGINT (Ctrl-C) and SIGTERM (what `kill`, systemd and job schedulers send) are a stop. The first
signal restores the handlers that were there before, so a second one has its usual effect
(SIGINT: KeyboardInterrupt, the run ends at once without saving; SIGTERM: the process dies).
"""
from __future__ import annotations

import json
import logging
import os
import signal
import threading
from dataclasses import dataclass
from pathlib import Path

COMMANDS_NAME = "commands.jsonl"
COMMANDS = ("stop", "save", "sample")
SIGNALS = ("SIGINT", "SIGTERM")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Command:
    command: str              # one of COMMANDS
    id: str | None = None     # the sender's id (the signal's name for signals)
    source: str = "file"      # "file", or the signal's name


def command_offset(path: Path) -> int:
    """Where the commands for a run starting now begin: the end of what is already in the file."""
    try:
        return path.stat().st_size
    except OSError:
        return 0


class CommandFile:
    """New commands in `path` since the last read."""

    def __init__(self, path: Path, warn, offset: int | None = None):
        self.path = path
        self.warn = warn       # a warning event and log line
        self.offset = command_offset(path) if offset is None else offset
        self._unreadable = False

    def read(self) -> list[Command]:
        try:
            size = self.path.stat().st_size
            if size < self.offset:  # replaced or truncated by its writer: read it from the start
                self.offset = 0
            if size == self.offset:
                return []
            with open(self.path, "rb") as fh:
                fh.seek(self.offset)
                data = fh.read(size - self.offset)
        except FileNotFoundError:
            self.offset = 0
            return []
        except OSError as exc:
            if not self._unreadable:
                self._unreadable = True
                self.warn(f"{self.path}: cannot read commands ({exc.strerror or exc})")
            return []
        self._unreadable = False
        end = data.rfind(b"\n") + 1  # a line still being written waits for its newline
        self.offset += end
        out = []
        for raw in data[:end].splitlines():
            if raw.strip():
                command = self._parse(raw)
                if command is not None:
                    out.append(command)
        return out

    def _parse(self, raw: bytes) -> Command | None:
        text = raw.decode("utf-8", "replace").strip()
        try:
            doc = json.loads(text)
        except ValueError:
            doc = None
        if not isinstance(doc, dict) or doc.get("command") not in COMMANDS:
            shown = text if len(text) <= 200 else text[:200] + "..."
            self.warn(f"{self.path}: ignored the line {shown!r}: a command is "
                      '{"command": "stop" | "save" | "sample", "id": "..."}')
            return None
        ident = doc.get("id")
        return Command(doc["command"], None if ident is None else str(ident))


class StopSignals:
    """SIGINT and SIGTERM ask for a stop at the next step boundary (main thread only: Python runs
    signal handlers there, and a run in another thread keeps the default behaviour)."""

    def __init__(self):
        self.received: str | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for name in SIGNALS:
            number = getattr(signal, name, None)
            if number is not None:
                self._previous[number] = signal.signal(number, self._handle)

    def _handle(self, number: int, frame) -> None:
        name = signal.Signals(number).name
        self.received = self.received or name
        self.uninstall()  # the second signal does what it did before
        # Only os.write here: a log or event write could be interrupted half-way by this handler.
        os.write(2, f"\n{name} received: stopping after this step with a resumable state (send it again to "
                    "stop at once without saving)\n".encode())

    def uninstall(self) -> None:
        previous, self._previous = self._previous, {}
        for number, handler in previous.items():
            signal.signal(number, handler if handler is not None else signal.SIG_DFL)


class Control:
    """The commands due at a step boundary, the same on every process."""

    def __init__(self, output_dir: Path, accelerator, warn, offset: int | None = None):
        """`offset`: where this run's commands begin in the file (command_offset when the process started,
        so that a command sent while the model loads counts)."""
        self.acc = accelerator
        self.file = CommandFile(output_dir / COMMANDS_NAME, warn, offset) if accelerator.is_main_process else None
        self.signals = StopSignals()
        self._signal_taken = False

    def __enter__(self) -> "Control":
        self.signals.install()
        return self

    def __exit__(self, *exc) -> None:
        self.signals.uninstall()

    def local(self) -> list[Command]:
        out = self.file.read() if self.file is not None else []
        if self.signals.received and not self._signal_taken:
            self._signal_taken = True
            out.append(Command("stop", self.signals.received, self.signals.received))
        return out

    def due(self) -> list[Command]:
        """Every process calls this at the same boundary; all get the same list."""
        mine = self.local()
        if self.acc.num_processes == 1:
            return mine
        import torch.distributed as dist

        everyone: list = [None] * self.acc.num_processes
        dist.all_gather_object(everyone, [(c.command, c.id, c.source) for c in mine])
        merged, stop = [], False
        for rank_commands in everyone:
            for command, ident, source in rank_commands:
                if command == "stop":
                    if stop:
                        continue  # one stop, whichever processes got the signal
                    stop = True
                merged.append(Command(command, ident, source))
        return merged


def send_command(output_dir: str | os.PathLike, command: str, ident: str) -> None:
    """Append one command for the run writing `output_dir` (one write to a file opened for appending,
    so lines from several senders never interleave)."""
    if command not in COMMANDS:
        raise ValueError(f"unknown command {command!r}; valid: {', '.join(COMMANDS)}")
    line = (json.dumps({"command": command, "id": ident}) + "\n").encode()
    fd = os.open(Path(output_dir) / COMMANDS_NAME, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)
