"""What the captioning and tagging tools share: their output options, the choice of images to
label, and loading images in batches while setting unreadable ones aside."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable, Iterator

from library.data.images import BadImage, find_images, load_image
from library.errors import UserError


def file_extension(text: str) -> str:
    """argparse type of the caption-extension options: ".txt", never "txt" (Path.with_suffix refuses it)."""
    if not text.startswith(".") or len(text) < 2:
        raise argparse.ArgumentTypeError(f"{text!r}: must start with a dot, e.g. .txt")
    return text


def add_output_args(ap: argparse.ArgumentParser, what: str) -> None:
    ap.add_argument("--extension", type=file_extension, default=".txt", help="caption file extension (default .txt)")
    ap.add_argument("--recursive", action="store_true", help=f"also {what} images in subfolders")
    ap.add_argument("--overwrite", action="store_true", help="replace existing caption files")
    ap.add_argument("--dry_run", action="store_true", help="print the results, write nothing")


def select_images(folder: Path, recursive: bool, extension: str, redo: bool) -> tuple[list[Path], list[Path]]:
    """(every image, those to label): images with a caption file are left out unless `redo`."""
    from library.utils.writable import input_folder

    input_folder(folder, "images")
    images = find_images(folder, recursive)
    if not images:
        raise UserError(f"{folder}: no images (.jpg .jpeg .png .webp .bmp)" +
                        ("" if recursive else "; use --recursive for subfolders"))
    return images, [p for p in images if redo or not p.with_suffix(extension).exists()]


class BatchLoader:
    """Decoded images in batches; unreadable files are counted in `bad` instead of stopping."""

    def __init__(self, paths: list[Path], batch_size: int, prepare: Callable = lambda img: img,
                 progress: Callable[[int], None] | None = None):
        self.paths = paths
        self.batch_size = batch_size
        self.prepare = prepare
        self.progress = progress
        self.bad: list[str] = []

    def __iter__(self) -> Iterator[tuple[list[Path], list]]:
        for k in range(0, len(self.paths), self.batch_size):
            chunk, items = [], []
            for path in self.paths[k:k + self.batch_size]:
                try:
                    items.append(self.prepare(load_image(path).rgb))
                    chunk.append(path)
                except BadImage as exc:
                    self.bad.append(str(exc))
                if self.progress:
                    self.progress(1)
            if chunk:
                yield chunk, items
