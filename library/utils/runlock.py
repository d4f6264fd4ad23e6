"""One output folder, one run: a lock file holding the writer's process id.

Two runs writing the same LoRA and state names would overwrite each other's saves and prune each
other's files. The lock is a file created exclusively (O_EXCL) in the output folder; it records the
host, the process id and the process start time, so a lock left by a killed run is recognised as
stale (no such process, or the id now belongs to a younger process) and taken over with a warning.
A lock from another host cannot be checked and is never taken over.
"""
from __future__ import annotations

import json
import logging
import os
import socket
from pathlib import Path

from library.errors import UserError

LOCK_NAME = ".train.lock"
log = logging.getLogger(__name__)


def _start_time(pid: int) -> str | None:
    """The kernel's start time of `pid` (Linux), which tells a reused process id from the original."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _alive_windows(pid: int) -> bool:
    import ctypes

    kernel32 = ctypes.windll.kernel32
    handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
    if not handle:
        return False
    code = ctypes.c_ulong()
    try:
        return bool(kernel32.GetExitCodeProcess(handle, ctypes.byref(code))) and code.value == 259  # STILL_ACTIVE
    finally:
        kernel32.CloseHandle(handle)


def _alive(pid: int) -> bool:
    if os.name == "nt":  # signal 0 is CTRL_C_EVENT there: never send it
        return _alive_windows(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, owned by someone else
    return True


def _holder_is_running(info: dict) -> bool:
    pid = info.get("pid")
    if not isinstance(pid, int) or pid <= 0 or not _alive(pid):
        return False
    started = info.get("started")
    return started is None or _start_time(pid) in (None, started)


def _refusal(path: Path, info: dict, option: str) -> str | None:
    host = info.get("host")
    if host not in (None, socket.gethostname()):
        return (f"{option} {path.parent}: a run on host {host} (pid {info.get('pid')}) is writing there; "
                f"use another {option}, or delete {path} if that run has ended")
    if _holder_is_running(info) and info.get("pid") != os.getpid():
        return (f"{option} {path.parent}: another run (pid {info['pid']}) is writing there; "
                f"wait for it to finish or choose another {option}")
    return None


def busy_message(folder: str | os.PathLike, option: str = "output_dir") -> str | None:
    """The message a run starting now in `folder` would stop with, or None when the folder is free
    (for launchers that check before they start a process; the lock itself stays the authority)."""
    path = Path(folder) / LOCK_NAME
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return _refusal(path, info, option) if isinstance(info, dict) else None


class RunLock:
    """`with RunLock(folder, option):` holds the folder for this process; released on exit."""

    def __init__(self, folder: str | os.PathLike, option: str = "output_dir"):
        self.path = Path(folder) / LOCK_NAME
        self.option = option
        self.held = False

    def _record(self) -> bytes:
        pid = os.getpid()
        return json.dumps({"pid": pid, "host": socket.gethostname(), "started": _start_time(pid)}).encode()

    def acquire(self) -> None:
        for _ in range(3):  # a stale lock is removed, then the exclusive create is tried again
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                self._handle_existing()
                continue
            except OSError as exc:
                raise UserError(f"{self.option} {self.path.parent}: cannot create the lock file {self.path.name} "
                                f"({exc.strerror or exc})") from None
            with os.fdopen(fd, "wb") as fh:
                fh.write(self._record())
            self.held = True
            return
        raise UserError(f"{self.option} {self.path.parent}: another run keeps taking the lock {self.path}")

    def _handle_existing(self) -> None:
        try:
            info = json.loads(self.path.read_text())
            if not isinstance(info, dict):
                raise ValueError
        except FileNotFoundError:
            return  # released meanwhile
        except (OSError, ValueError):
            info = {}
        refusal = _refusal(self.path, info, self.option)
        if refusal:
            raise UserError(refusal)
        log.warning("%s: taking over the lock of pid %s, which is no longer running (a killed or crashed run)",
                    self.path, info.get("pid", "unknown"))
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        try:
            if json.loads(self.path.read_text()).get("pid") == os.getpid():
                self.path.unlink()
        except (OSError, ValueError):
            pass

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
