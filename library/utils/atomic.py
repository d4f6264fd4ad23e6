"""Atomic file output: write to a temporary file in the target folder, fsync, then rename.

A crash or a kill mid-write leaves the previous file (or nothing), never a truncated one that a
WebUI or a resume would later half-read. A write that fails because the disk is full, the folder
became read-only or the device failed removes its temporary file and raises a one-line UserError
that names the target and says the previous file is unchanged.
"""
from __future__ import annotations

import contextlib
import errno
import os
import re
import tempfile
from pathlib import Path
from typing import Iterator

from library.errors import UserError

TMP_SUFFIX = ".tmp"
# errno values that mean "this machine cannot write here now", not a bug
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO, errno.EFBIG}
# what torch's zip writer raises (a RuntimeError without errno) when a write comes up short
_TORCH_WRITE_FAILURES = ("PytorchStreamWriter failed", "file write failed", "unexpected pos")


def write_failure(exc: BaseException) -> str | None:
    """Why a write failed, when `exc` is the machine refusing the write (disk full, read-only, ...)."""
    if isinstance(exc, OSError) and exc.errno in WRITE_ERRNOS:
        return exc.strerror or os.strerror(exc.errno)
    if isinstance(exc, RuntimeError) and any(text in str(exc) for text in _TORCH_WRITE_FAILURES):
        return "the file could not be written completely; is the disk full?"
    if type(exc).__name__ == "SafetensorError" and "IoError" in str(exc):  # safetensors' writer, from Rust
        found = re.search(r'message: "([^"]+)"', str(exc))
        return found[1] if found else "the file could not be written"
    return None


def failed_write(target: Path, reason: str, what: str = "file") -> UserError:
    return UserError(f"{target}: could not be written ({reason}); the previous {what} is unchanged; free disk space "
                     "or fix the folder, then run again")
_LEFTOVER = re.compile(r"\..+\.[A-Za-z0-9_]{8}" + re.escape(TMP_SUFFIX))


def is_leftover(path: Path) -> bool:
    """A temporary file of `atomic_path` that a killed process left behind (never a finished output)."""
    return _LEFTOVER.fullmatch(path.name) is not None and path.is_file()


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `target`; on success it replaces `target` in one rename."""
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=TMP_SUFFIX, dir=target.parent)
    except OSError as exc:
        if write_failure(exc) is None:
            raise
        raise failed_write(target, write_failure(exc)) from None
    os.close(fd)
    tmp_path = Path(tmp)
    # mkstemp creates 0600 files; give the result the permissions a plain open() would.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_path, 0o666 & ~umask)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, target)
    except Exception as exc:
        reason = write_failure(exc)
        if reason is None:
            raise
        raise failed_write(target, reason) from None
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_bytes(target: str | os.PathLike, data: bytes) -> None:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(target: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(target, text.encode("utf-8"))
