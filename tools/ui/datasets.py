"""The Dataset page: the dataset as training loads it, captions edited in place, captioning tools.

The report is tools/check_dataset.py's (`load` + `build_report`), so the page lists exactly the
problems the CLI reports. A caption edit replaces the file in one rename (library.utils.atomic) and,
the first time a caption is changed from the UI, keeps the file as it was in `<caption>.orig`; later
edits never overwrite that copy, so the caption as the user first had it is never lost.
"""
from __future__ import annotations

import argparse
import shlex
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from library.errors import UserError
from library.utils.atomic import atomic_write_text

ROOT = Path(__file__).resolve().parents[2]
BACKUP_SUFFIX = ".orig"
MAX_IMAGES = 2000
# Folder tools the page can start on a folder: name -> script (each takes the folder first).
TOOLS = {
    "caption_images": ROOT / "tools" / "caption_images.py",
    "tag_images": ROOT / "tools" / "tag_images.py",
    "edit_captions": ROOT / "tools" / "edit_captions.py",
    "resize_images": ROOT / "tools" / "resize_images.py",
}


class Datasets:
    def __init__(self, workspace: Path):
        self.scratch = Path(workspace) / "datasets"
        self.scratch.mkdir(parents=True, exist_ok=True)
        self.tools_dir = Path(workspace) / "tools"
        self.tools_dir.mkdir(parents=True, exist_ok=True)
        self.folders: set[Path] = set()  # image folders a scan showed: the only ones the page serves or edits
        self._lock = threading.Lock()

    def scan(self, dataset_toml: str | None = None, folder: str | None = None, resolution: int | None = None,
             model: str | None = None) -> dict:
        """The check_dataset report of a dataset TOML (the editor's text) or of one image folder."""
        from tools.check_dataset import build_report, load

        if dataset_toml and dataset_toml.strip():
            text = dataset_toml
        elif folder:
            path = Path(folder).expanduser()
            if not path.is_dir():
                raise UserError(f"{folder}: no such folder")
            text = f'[[datasets]]\n[[datasets.subsets]]\nimage_dir = "{_escape(str(path.resolve()))}"\n'
        else:
            raise UserError("give a dataset TOML or an image folder")
        ds_path = self.scratch / "dataset.toml"
        with self._lock:
            ds_path.write_text(text, encoding="utf-8")
            # the namespace tools/check_dataset.py's own parser makes, with its defaults
            args = argparse.Namespace(config=None, dataset_config=str(ds_path), seed=None, resolution=resolution or (
                None if model else 512), pretrained_model_name_or_path=model or None, max_token_length=None)
            data = load(args)
            report = build_report(data)
        images = []
        for rec in data.records[:MAX_IMAGES]:
            from library.data.records import caption_path

            ext = rec.subset.caption_extension
            cap = caption_path(rec.path, ext) or rec.path.with_suffix(ext)  # where a new caption would go
            images.append({"path": str(rec.path), "caption_file": str(cap), "caption": _read(cap),
                           "has_caption_file": cap.exists(), "size": list(rec.size),
                           "backup": (cap.parent / (cap.name + BACKUP_SUFFIX)).exists()})
            self.folders.add(rec.path.parent.resolve())
        report["images_list"] = images
        report["dataset_toml"] = text
        return report

    def _allowed(self, path: Path) -> Path:
        path = Path(path).expanduser().resolve()
        if path.parent not in self.folders:
            raise UserError(f"{path}: not in a dataset folder shown on this page; scan the dataset first")
        return path

    def image(self, path: str) -> Path:
        from library.data.images import is_image

        p = self._allowed(Path(path))
        if not is_image(p) or not p.is_file():
            raise UserError(f"{path}: not an image file")
        return p

    def save_caption(self, caption_file: str, text: str) -> dict:
        """Write a caption atomically; the first edit keeps the previous file as `<name>.orig`."""
        from library.data.images import IMAGE_EXTENSIONS

        path = self._allowed(Path(caption_file))
        if path.suffix.lower() in IMAGE_EXTENSIONS or path.name.endswith(BACKUP_SUFFIX):
            raise UserError(f"{caption_file}: not a caption file")
        backup = path.parent / (path.name + BACKUP_SUFFIX)
        if path.exists() and not backup.exists():
            shutil.copy2(path, backup)  # before the new text replaces it, once
        atomic_write_text(path, text.strip() + "\n" if text.strip() else "")
        return {"caption_file": str(path), "caption": _read(path), "backup": str(backup) if backup.exists() else None}

    # --- folder tools ------------------------------------------------------------------------------
    def start_tool(self, tool: str, folder: str, args: str = "") -> dict:
        """Start a captioning/tagging tool on a folder, detached, its output in a log file."""
        if tool not in TOOLS:
            raise UserError(f"tool {tool!r}: expected one of {', '.join(TOOLS)}")
        path = Path(folder).expanduser()
        if not path.is_dir():
            raise UserError(f"{folder}: no such folder")
        try:
            extra = shlex.split(args or "")
        except ValueError as exc:
            raise UserError(f"arguments: {exc}") from None
        job = f"{time.strftime('%Y%m%d-%H%M%S')}-{tool}-{len(list(self.tools_dir.glob('*.log'))) + 1}"
        log = self.tools_dir / f"{job}.log"
        argv = [sys.executable, str(TOOLS[tool]), str(path.resolve()), *extra]
        with open(log, "wb") as fh:
            proc = subprocess.Popen(argv, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
        _JOBS[job] = proc
        return {"job": job, "argv": argv}

    def tool_status(self, job: str) -> dict:
        log = self.tools_dir / f"{job}.log"
        if not log.is_file() or "/" in job:
            raise KeyError(job)
        proc = _JOBS.get(job)
        code = proc.poll() if proc is not None else None
        return {"job": job, "running": proc is not None and code is None, "exit_code": code,
                "log": log.read_text(errors="replace")[-8000:]}


_JOBS: dict[str, subprocess.Popen] = {}


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        return ""


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')
