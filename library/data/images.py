"""Opening training images the way users expect, whatever mode and format they were saved in.

EXIF orientation is applied as viewers show it (phones store portraits rotated), transparency (an
alpha channel or a PNG transparent colour) is composited on white (or kept as a loss mask),
grayscale / palette / 16-bit / CMYK images become 8-bit RGB, and an animated PNG or WebP gives its
first frame. The file's content decides how it is decoded, not its extension. A file that cannot
be used raises BadImage naming it: undecodable, truncated, empty, unreadable (a broken or looping
symbolic link), smaller than MIN_SIDE pixels on a side, or larger than Pillow's decompression-bomb
limit.
"""
from __future__ import annotations

import errno
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
# A side shorter than one latent cell (the VAE downsamples by 8) holds no picture to learn from.
MIN_SIDE = 8
_DECODE_ERRORS = (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError)


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


@dataclass(frozen=True)
class ImageInfo:
    size: tuple[int, int]   # (width, height) after EXIF rotation
    frames: int = 1         # > 1: animated; the first frame is trained
    large: bool = False     # above Pillow's decompression-bomb warning size (but below its limit)


def inspect_image(path: Path) -> ImageInfo:
    """Size, frame count and size class; decodes the whole file so that damage shows before training."""
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.load()
                w, h = img.size
                orientation = img.getexif().get(0x0112, 1)
                frames = getattr(img, "n_frames", 1)
    except _DECODE_ERRORS as exc:
        raise BadImage(_reason(path, exc)) from None
    if min(w, h) < MIN_SIDE:
        raise BadImage(f"{path}: {w}x{h} pixels is too small to train on (each side needs at least {MIN_SIDE} "
                       "pixels)")
    large = any(issubclass(c.category, Image.DecompressionBombWarning) for c in caught)
    return ImageInfo((h, w) if orientation in (5, 6, 7, 8) else (w, h), frames, large)


def probe_image(path: Path) -> tuple[int, int]:
    """(width, height) after EXIF rotation (see inspect_image)."""
    return inspect_image(path).size


def _reason(path: Path, exc: BaseException) -> str:
    if isinstance(exc, Image.DecompressionBombError):
        return (f"{path}: larger than the {Image.MAX_IMAGE_PIXELS * 2 / 1e6:.0f} megapixels an image may have "
                "(a decompression bomb, or a scan far larger than any training resolution); scale it down, e.g. "
                "with tools/resize_images.py")
    if path.is_symlink() and not path.exists():
        try:
            path.stat()
        except OSError as err:
            if err.errno == errno.ELOOP:
                return f"{path}: a symbolic link that loops ({err.strerror})"
        return f"{path}: a symbolic link to {path.readlink()}, which does not exist"
    try:
        if path.stat().st_size == 0:
            return f"{path}: empty file (0 bytes)"
    except OSError:
        pass
    if isinstance(exc, OSError) and exc.errno is not None and exc.strerror:
        return f"{path}: cannot be read ({exc.strerror})"
    text = str(exc) or type(exc).__name__
    return f"{path}: cannot be decoded as an image ({text})"


def load_image(path: Path, keep_alpha_mask: bool = False) -> LoadedImage:
    try:
        with warnings.catch_warnings():
            # large images are reported once when the dataset is scanned, not at every load
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.load()  # decode fully now: truncated files fail here, not mid-training
                img = ImageOps.exif_transpose(img)
    except _DECODE_ERRORS as exc:
        raise BadImage(_reason(path, exc)) from None
    img = _to_8bit(img)
    if "transparency" in img.info and img.mode in ("L", "RGB", "P"):
        # a PNG transparent colour (tRNS) is transparency too: composited like an alpha channel
        img = img.convert("LA" if img.mode == "L" else "RGBA")
    if img.mode == "P":
        img = img.convert("RGB")
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


def load_mask(path: Path) -> np.ndarray:
    """A mask image as float32 HxW in [0, 1]: its grayscale (white = 1), EXIF orientation applied
    as for images; a mask with an alpha channel counts its transparent pixels as black."""
    loaded = load_image(path, keep_alpha_mask=True)
    gray = np.asarray(loaded.rgb.convert("L"), dtype=np.float32) / 255.0
    return gray * loaded.mask if loaded.mask is not None else gray


def is_image_entry(path: Path) -> bool:
    """An image file, or a symbolic link named like one that is broken or loops (reported as
    unreadable rather than silently left out). Folders named like images are not."""
    return is_image(path) and (path.is_file() or (path.is_symlink() and not path.exists()))


def find_images(folder: Path, recursive: bool = False) -> list[Path]:
    """Image files of a folder (and its subfolders), sorted; hidden files and folders are skipped.
    Symbolic links to folders are not followed, so a link back to a parent cannot loop."""
    pattern = folder.rglob("*") if recursive else folder.iterdir()
    found = []
    for path in pattern:
        if is_image_entry(path) and not any(part.startswith(".") for part in path.relative_to(folder).parts):
            found.append(path)
    return sorted(found)
