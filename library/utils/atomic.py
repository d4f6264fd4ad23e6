"""Atomic file output: write to a temporary file in the target folder, fsync, then rename.

A crash or a kill mid-write leaves the previous file (or nothing), never a truncated one that a
WebUI or a resume would later half-read.
"""
from __future__ import annotations

import contextlib
import os
import re
import tempfile
from pathlib import Path
from typing import Iterator


TMP_SUFFIX = ".tmp"
_LEFTOVER = re.compile(r"\..+\.[A-Za-z0-9_]{8}" + re.escape(TMP_SUFFIX))


def is_leftover(path: Path) -> bool:
    """A temporary file of `atomic_path` that a killed process left behind (never a finished output)."""
    return _LEFTOVER.fullmatch(path.name) is not None and path.is_file()


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `target`; on success it replaces `target` in one rename."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=TMP_SUFFIX, dir=target.parent)
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
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_bytes(target: str | os.PathLike, data: bytes) -> None:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(target: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(target, text.encode("utf-8"))
