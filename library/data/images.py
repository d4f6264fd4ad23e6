"""Opening training images the way users expect, whatever mode and format they were saved in.

EXIF orientation is applied (phones store portraits rotated), transparency is composited on white
(or kept as a loss mask), grayscale / palette / 16-bit / CMYK images become 8-bit RGB. A file that
cannot be decoded raises BadImage naming it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


class BadImage(Exception):
    """An image file that cannot be used (empty, truncated, corrupt, unsupported)."""


@dataclass
class LoadedImage:
    rgb: Image.Image              # 8-bit RGB
    mask: np.ndarray | None       # float32 HxW in [0, 1] from the alpha channel, when asked for


def is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def _to_8bit(img: Image.Image) -> Image.Image:
    """16-bit and 32-bit single-channel images scaled to 8 bits (PIL's convert('L') clips them)."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        return Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        top = 1.0 if arr.max() <= 1.0 else 255.0
        return Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    return img


def probe_image(path: Path) -> tuple[int, int]:
    """(width, height) after EXIF rotation; decodes the whole file so that damage shows before training."""
    try:
        with Image.open(path) as img:
            img.load()
            w, h = img.size
            orientation = img.getexif().get(0x0112, 1)
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
        raise BadImage(_reason(path, exc)) from None
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def _reason(path: Path, exc: BaseException) -> str:
    try:
        if path.stat().st_size == 0:
            return f"{path}: empty file (0 bytes)"
    except OSError:
        pass
    text = str(exc) or type(exc).__name__
    return f"{path}: cannot be decoded as an image ({text})"


def load_image(path: Path, keep_alpha_mask: bool = False) -> LoadedImage:
    try:
        with Image.open(path) as img:
            img.load()  # decode fully now: truncated files fail here, not mid-training
            img = ImageOps.exif_transpose(img)
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
        raise BadImage(_reason(path, exc)) from None
    img = _to_8bit(img)
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("LA", "La", "PA"):
        img = img.convert("RGBA")
    mask = None
    if img.mode in ("RGBA", "RGBa"):
        alpha = img.getchannel("A")
        if keep_alpha_mask:
            mask = np.asarray(alpha, dtype=np.float32) / 255.0
        background = Image.new("RGB", img.size, (255, 255, 255))
        background.paste(img.convert("RGB"), mask=alpha)
        img = background
    elif keep_alpha_mask:
        mask = np.ones((img.height, img.width), dtype=np.float32)
    if img.mode != "RGB":
        img = img.convert("RGB")
    return LoadedImage(img, mask)


def find_images(folder: Path, recursive: bool = False) -> list[Path]:
    """Image files of a folder (and its subfolders), sorted; hidden files and folders are skipped."""
    pattern = folder.rglob("*") if recursive else folder.iterdir()
    found = []
    for path in pattern:
        if path.is_file() and is_image(path) and not any(part.startswith(".") for part in path.relative_to(folder).parts):
            found.append(path)
    return sorted(found)
