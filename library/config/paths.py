"""Where relative paths in configs point.

kohya resolves every relative path against the current folder, and users' configs rely on that;
a dataset TOML kept next to its images is easier to move around, so a relative input path that
does not exist from the current folder is looked up next to the TOML file that names it.
"""
from __future__ import annotations

from pathlib import Path


def resolve_input(value: str, base_dir: Path | None) -> str:
    path = Path(value).expanduser()
    if path.is_absolute() or path.exists() or base_dir is None:
        return str(path)
    beside = base_dir / path
    return str(beside) if beside.exists() else str(path)


def looked_in(value: str, base_dir: Path | None) -> str:
    """Where `resolve_input` looked, for error messages."""
    if Path(value).expanduser().is_absolute() or base_dir is None:
        return ""
    return f" (looked in the current folder and in {base_dir})"
