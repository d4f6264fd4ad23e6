"""The workspace of runs: each one a folder with its config, launched as a detached process.

A run's folder (`<workspace>/runs/<id>/`) holds `run.json` (name, output folder, queue state and
every launch), the `config.toml` / `dataset.toml` the form wrote and one log per launch. The
trainer is started in a new session (`accelerate launch train_apt_lora.py --config ...`), so it
does not die with the UI; what a run is doing is read back from its `events.jsonl` and from
whether its process still lives, so a restarted UI finds every run where it is.
"""
from __future__ import annotations

import bisect
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from library.errors import UserError
from library.utils.atomic import atomic_write_text
from library.utils.runlock import _start_time, busy_message
from library.train.control import COMMANDS, send_command
from library.train.events import EVENTS_NAME, read_located
from tools.ui.events import summarise

ROOT = Path(__file__).resolve().parents[2]
TRAIN_SCRIPT = ROOT / "train_apt_lora.py"
RUN_FILE = "run.json"
ACTIVE = ("starting", "running")
LOG_TAIL_LINES = 40


def launcher_argv(kind: str | list[str]) -> list[str]:
    """How the trainer is started: `accelerate launch` (the default, what users run by hand), or the
    script with this Python directly (one process, a few seconds faster to start); a list is taken
    as the command itself (the tests' stand-ins)."""
    if isinstance(kind, list):
        return list(kind)
    if kind == "accelerate":
        return [sys.executable, "-m", "accelerate.commands.launch", str(TRAIN_SCRIPT)]
    if kind == "python":
        return [sys.executable, str(TRAIN_SCRIPT)]
    raise UserError(f"--launcher: expected accelerate or python, got {kind!r}")


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-")[:40] or "run"


class Workspace:
    def __init__(self, root: Path, launcher: str | list[str] = "accelerate"):
        self.root = Path(root).resolve()
        self.runs_dir = self.root / "runs"
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        self.launcher = launcher_argv(launcher)
        self._procs: dict[int, subprocess.Popen] = {}  # children of this UI, reaped here
        self._lock = threading.RLock()
        self._cache: dict[Path, tuple[list[int], list[dict], int]] = {}  # events file -> line starts, events, end

    # --- records ------------------------------------------------------------------------------------
    def new_run_folder(self, name: str) -> tuple[str, Path]:
        run_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{_slug(name)}-{secrets.token_hex(2)}"
        folder = self.runs_dir / run_id
        folder.mkdir(parents=True)
        return run_id, folder

    def folder(self, run_id: str) -> Path:
        if not re.fullmatch(r"[\w.-]+", run_id) or not (self.runs_dir / run_id / RUN_FILE).is_file():
            raise KeyError(run_id)
        return self.runs_dir / run_id

    def record(self, run_id: str) -> dict:
        return json.loads((self.folder(run_id) / RUN_FILE).read_text())

    def _save(self, rec: dict) -> None:
        atomic_write_text(self.runs_dir / rec["id"] / RUN_FILE, json.dumps(rec, indent=1))

    def run_ids(self) -> list[str]:
        return sorted(p.parent.name for p in self.runs_dir.glob(f"*/{RUN_FILE}"))

    # --- creating and launching ---------------------------------------------------------------------
    def create(self, run_id: str, name: str, output_dir: str, *, queue: bool) -> dict:
        """Record a validated run (its files are in its folder) and start it, or queue it."""
        folder = self.runs_dir / run_id
        out = Path(output_dir).expanduser()
        out = (out if out.is_absolute() else folder / out).resolve()
        with self._lock:
            if not queue:
                self._refuse_busy(out)
            rec = {"id": run_id, "name": name, "created": time.time(), "state": "queued" if queue else "launched",
                   "output_dir": str(out), "config": str(folder / "config.toml"), "launches": []}
            self._save(rec)
            if not queue:
                self._launch(rec, [])
        return rec

    def _refuse_busy(self, out: Path, *, ignore: str | None = None) -> None:
        """A second run into an output folder is refused with the trainer's own message."""
        message = busy_message(out)
        if message is None:
            for other in self.run_ids():
                if other == ignore:
                    continue
                rec = self.record(other)
                if Path(rec["output_dir"]) == out and self.status(rec) in ACTIVE:
                    pid = rec["launches"][-1]["pid"]
                    message = (f"output_dir {out}: another run (pid {pid}) is writing there; wait for it to finish "
                               "or choose another output_dir")
                    break
        if message:
            raise UserError(message)

    def _launch(self, rec: dict, extra: list[str]) -> None:
        folder = self.runs_dir / rec["id"]
        events = Path(rec["output_dir"]) / EVENTS_NAME
        n = len(rec["launches"]) + 1
        log_path = folder / f"launch-{n}.log"
        argv = [*self.launcher, "--config", rec["config"], *extra]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(argv, cwd=folder, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True, env=env, close_fds=True)
        self._procs[proc.pid] = proc
        rec["state"] = "launched"
        rec["launches"].append({"pid": proc.pid, "started": _start_time(proc.pid), "time": time.time(),
                                "log": log_path.name, "argv": argv, "extra": extra,
                                "events_offset": events.stat().st_size if events.exists() else 0})
        self._save(rec)

    def resume(self, run_id: str) -> dict:
        """Start the run again from its newest saved state (`--resume latest`)."""
        with self._lock:
            rec = self.record(run_id)
            state = self.status(rec)
            if state in ACTIVE or state == "queued":
                raise UserError(f"run {run_id} is {state}; stop it before resuming")
            self._refuse_busy(Path(rec["output_dir"]), ignore=run_id)
            self._launch(rec, ["--resume", "latest"])
            return rec

    def cancel(self, run_id: str) -> dict:
        with self._lock:
            rec = self.record(run_id)
            if rec["state"] != "queued":
                raise UserError(f"run {run_id} is not queued")
            rec["state"] = "cancelled"
            self._save(rec)
            return rec

    def tick(self) -> str | None:
        """Start the oldest queued run once nothing runs; the id it started, if any."""
        with self._lock:
            recs = [self.record(i) for i in self.run_ids()]
            if any(self.status(r) in ACTIVE for r in recs):
                return None
            queued = sorted((r for r in recs if r["state"] == "queued"), key=lambda r: r["created"])
            for rec in queued:
                try:
                    self._refuse_busy(Path(rec["output_dir"]), ignore=rec["id"])
                except UserError as exc:
                    rec["state"], rec["refused"] = "refused", str(exc)
                    self._save(rec)
                    continue
                self._launch(rec, [])
                return rec["id"]
        return None

    # --- state -------------------------------------------------------------------------------------
    def alive(self, launch: dict) -> bool:
        pid = launch["pid"]
        proc = self._procs.get(pid)
        if proc is not None:
            if proc.poll() is None:
                return True
            self._procs.pop(pid, None)
            return False
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return _alive_portable(pid)
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            return False
        return launch.get("started") in (None, _start_time(pid))

    def events(self, rec: dict, offset: int = 0) -> tuple[list[dict], int]:
        """The events from byte `offset` on. Kept per file and read on from where the last call
        ended, so the status of every run, asked each second, does not parse whole files again."""
        path = Path(rec["output_dir"]) / EVENTS_NAME
        with self._lock:
            starts, events, end = self._cache.get(path, ([], [], 0))
            try:
                size = path.stat().st_size
            except OSError:
                size = 0
            if size < end:  # the file was replaced: read it from the start
                starts, events, end = [], [], 0
            if size > end:
                located, end = read_located(path, end)
                starts.extend(start for start, _ in located)  # the cached lists grow in place
                events.extend(event for _, event in located)
                self._cache[path] = (starts, events, end)
        if offset <= 0:
            return list(events), end
        first = bisect.bisect_left(starts, offset)
        return events[first:], max(end, offset)

    def status(self, rec: dict) -> str:
        if rec["state"] in ("queued", "cancelled", "refused"):
            return rec["state"]
        launch = rec["launches"][-1]
        current, _ = self.events(rec, self._offset(rec, launch))
        ends = [e for e in current if e["type"] == "end"]
        if ends:
            return ends[-1].get("status") or "finished"
        if self.alive(launch):
            return "running" if any(e["type"] == "start" for e in current) else "starting"
        if launch.get("terminated"):
            return "stopped"
        return "failed"  # the process is gone without an end event: killed, crashed or refused at start

    def _offset(self, rec: dict, launch: dict) -> int:
        events = Path(rec["output_dir"]) / EVENTS_NAME
        size = events.stat().st_size if events.exists() else 0
        offset = launch.get("events_offset", 0)
        return offset if offset <= size else 0  # the file was started anew

    def log_tail(self, rec: dict, lines: int = LOG_TAIL_LINES) -> list[str]:
        if not rec["launches"]:
            return []
        path = self.runs_dir / rec["id"] / rec["launches"][-1]["log"]
        try:
            with open(path, "rb") as fh:
                fh.seek(max(0, path.stat().st_size - 64 * 1024))
                text = fh.read().decode("utf-8", "replace")
        except OSError:
            return []
        return [line.rstrip() for line in text.replace("\r", "\n").splitlines() if line.strip()][-lines:]

    def error_line(self, rec: dict, status: str, summary: dict) -> str | None:
        if rec.get("refused"):
            return rec["refused"]
        if status not in ("failed",):
            return None
        if summary.get("error"):
            return summary["error"]
        tail = self.log_tail(rec, 400)
        for line in reversed(tail):
            if line.startswith("error:"):
                return line.removeprefix("error:").strip()
        return tail[-1] if tail else "the trainer exited before it wrote anything"

    def describe(self, run_id: str, *, full: bool = False) -> dict:
        rec = self.record(run_id)
        status = self.status(rec)
        events, _ = self.events(rec)
        summary = summarise(events)
        out = {"id": rec["id"], "name": rec["name"], "created": rec["created"], "status": status,
               "output_dir": rec["output_dir"], "launches": len(rec["launches"]),
               "step": summary["step"], "max_steps": summary["max_steps"], "loss_avg": summary["loss_avg"],
               "eta_s": summary["eta_s"], "error": self.error_line(rec, status, summary),
               "pid": rec["launches"][-1]["pid"] if rec["launches"] else None,
               "method": (summary["start"] or {}).get("method")}
        if full:
            folder = self.runs_dir / rec["id"]
            out.update(summary=summary, log_tail=self.log_tail(rec),
                       config_toml=(folder / "config.toml").read_text() if (folder / "config.toml").exists() else "",
                       dataset_toml=(folder / "dataset.toml").read_text() if (folder / "dataset.toml").exists() else "",
                       argv=rec["launches"][-1]["argv"] if rec["launches"] else None)
        return out

    # --- commands ----------------------------------------------------------------------------------
    def send(self, run_id: str, command: str) -> str:
        """Append a command for the trainer; it answers with a `command` event carrying the same id."""
        if command not in COMMANDS:
            raise UserError(f"command {command!r}: expected one of {', '.join(COMMANDS)}")
        rec = self.record(run_id)
        status = self.status(rec)
        if status == "starting" and command == "stop":
            return self._terminate(rec)
        if status != "running":  # the trainer reads commands appended after it started, not before
            raise UserError(f"run {run_id} is {status}; commands go to a running run")
        command_id = secrets.token_hex(6)
        Path(rec["output_dir"]).mkdir(parents=True, exist_ok=True)
        send_command(rec["output_dir"], command, command_id)
        return command_id

    def _terminate(self, rec: dict) -> str:
        """Stop a run that is still loading (it reads no commands yet): SIGTERM to its process
        group, which the trainer takes as a stop; nothing has been trained to save yet."""
        launch = rec["launches"][-1]
        try:
            os.killpg(launch["pid"], signal.SIGTERM)  # the launcher and the trainer (a session of their own)
        except (ProcessLookupError, PermissionError, AttributeError):
            pass
        launch["terminated"] = True
        self._save(rec)
        return "SIGTERM"

    def command_ack(self, run_id: str, command_id: str) -> dict | None:
        events, _ = self.events(self.record(run_id))
        for ev in events:
            if ev["type"] == "command" and ev.get("id") == command_id:
                return ev
        return None

    # --- files of a run -----------------------------------------------------------------------------
    def output_file(self, run_id: str, rel: str) -> Path:
        """A file inside the run's output folder (sample images, LoRA files); nothing outside it."""
        base = Path(self.record(run_id)["output_dir"]).resolve()
        path = Path(rel)
        path = (path if path.is_absolute() else base / path).resolve()
        if base not in path.parents or not path.is_file():
            raise KeyError(rel)
        return path

    def lora_files(self, run_id: str) -> list[Path]:
        base = Path(self.record(run_id)["output_dir"])
        if not base.is_dir():
            return []
        return sorted(p for p in base.glob("*.safetensors") if p.is_file())


def _alive_portable(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
