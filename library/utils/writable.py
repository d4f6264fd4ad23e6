"""Output locations are checked before any model loads: created if missing, proven writable.

A folder is proven writable by creating (and removing) a probe file in it, not with os.access:
that is what answers for root, for read-only mounts and for ACLs alike. Each problem is a one-line
UserError naming the path and the option that pointed there.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from library.errors import UserError


def _blocking_file(path: Path) -> Path | None:
    """The first existing non-folder among `path` and its parents, if any."""
    for part in [path, *path.parents]:
        if part.exists() or part.is_symlink():
            return None if part.is_dir() else part
    return None


def writable_dir(path: str | os.PathLike, option: str) -> Path:
    """Create the folder `path` (with its parents) if needed and check that files can be written in it."""
    path = Path(path).expanduser()
    blocker = _blocking_file(path)
    if blocker is not None:
        what = "is a file" if blocker == path else f"is under {blocker}, which is a file"
        raise UserError(f"{option} {path}: {what}, not a folder; choose another {option}")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"{option} {path}: cannot create this folder ({exc.strerror or exc}); choose another "
                        f"{option}") from None
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-test.", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise UserError(f"{option} {path}: cannot write files in this folder ({exc.strerror or exc}); choose "
                        f"another {option} or fix its permissions") from None
    return path


def writable_file(path: str | os.PathLike, option: str) -> Path:
    """Check that the file `path` can be written (its folder is created if needed); an existing file is
    left as it is until the output replaces it."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise UserError(f"{option} {path}: is a folder; give a file name")
    writable_dir(path.parent, option)
    return path


def same_path(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two paths name the same file or folder (through links, `..` and hard links)."""
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet)
        return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def is_within(path: str | os.PathLike, folder: str | os.PathLike) -> bool:
    """Whether `path` is `folder` or lies somewhere inside it (after resolving links)."""
    inner, outer = Path(path).expanduser().resolve(), Path(folder).expanduser().resolve()
    return inner == outer or outer in inner.parents


def not_an_input(output: str | os.PathLike, inputs: list, option: str) -> None:
    """Refuse an output path that is one of the inputs: writing it would replace what is being read."""
    for given in inputs:
        if given is not None and same_path(output, given):
            raise UserError(f"{option} {output}: is also an input ({given}); inputs are never overwritten, so "
                            "choose another output name")


def input_folder(path: str | os.PathLike, what: str, option: str = "") -> Path:
    """An existing input folder, or a one-line error saying what is there instead."""
    path = Path(path).expanduser()
    label = f"{option} {path}" if option else str(path)
    if path.is_file():
        raise UserError(f"{label}: is a file; expected a folder of {what}")
    if not path.is_dir():
        raise UserError(f"{label}: no such folder of {what}")
    return path
