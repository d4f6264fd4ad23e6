#!/usr/bin/env python
"""Copy a dataset with its images scaled down to a maximum resolution, captions alongside.

    python tools/resize_images.py raw/ data/subject --max_resolution 1024x1024
    python tools/resize_images.py raw/ data/ --max_resolution 768x768 --divisible_by 64 --recursive --format png

Images larger than the area of --max_resolution are scaled down, keeping their aspect ratio (and
the EXIF orientation applied); with --divisible_by the result is centre-cropped so that both
sides are multiples of it. Smaller images are copied unchanged in size. Files next to each image
with the same name and a caption extension (--caption_extensions) are copied too. Unreadable
images are reported and skipped. Every output is written atomically.
"""
from __future__ import annotations

import argparse
import math
import shutil
import sys
from pathlib import Path

from library.utils.toolmain import command

FORMATS = {"png": ("PNG", ".png"), "jpg": ("JPEG", ".jpg"), "webp": ("WEBP", ".webp")}


def parse_resolution(text: str) -> tuple[int, int]:
    parts = text.lower().replace("*", "x").split("x")
    try:
        w, h = (int(parts[0]), int(parts[-1]))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: write WIDTHxHEIGHT, e.g. 1024x1024") from None
    if w < 8 or h < 8:
        raise argparse.ArgumentTypeError(f"{text!r}: too small")
    return w, h


def target_size(w: int, h: int, max_area: int, divisible: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """(scaled size, final size after the centre crop); a final side is 0 when the scaled side is
    shorter than `divisible` (cropping cannot make it a multiple)."""
    scale = min(1.0, math.sqrt(max_area / (w * h)))
    sw, sh = max(1, round(w * scale)), max(1, round(h * scale))
    if divisible > 1:
        return (sw, sh), (sw - sw % divisible, sh - sh % divisible)
    return (sw, sh), (sw, sh)


def main(argv: list[str] | None = None) -> int:
    from library.data.labelling import file_extension

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source", type=Path)
    ap.add_argument("destination", type=Path)
    ap.add_argument("--max_resolution", type=parse_resolution, default=(1024, 1024), help="e.g. 1024x1024")
    ap.add_argument("--divisible_by", type=int, default=1, help="crop both sides to a multiple of this")
    ap.add_argument("--format", choices=["keep", *FORMATS], default="keep")
    ap.add_argument("--quality", type=int, default=95, help="JPEG/WebP quality")
    ap.add_argument("--caption_extensions", nargs="+", type=file_extension, default=[".txt", ".caption"])
    ap.add_argument("--recursive", action="store_true")
    ap.add_argument("--overwrite", action="store_true", help="replace files that exist in the destination")
    args = ap.parse_args(argv)

    from PIL import Image
    from tqdm.auto import tqdm

    from library.data.images import BadImage, find_images, load_image
    from library.errors import UserError
    from library.utils.atomic import atomic_path
    from library.utils.writable import input_folder, writable_dir

    input_folder(args.source, "images")
    if args.destination.resolve() == args.source.resolve():
        raise UserError("the destination must differ from the source (the originals are kept)")
    if args.divisible_by < 1:
        raise UserError(f"--divisible_by: expected at least 1, got {args.divisible_by}")
    writable_dir(args.destination, "destination")
    max_area = args.max_resolution[0] * args.max_resolution[1]
    images = find_images(args.source, args.recursive)
    done, kept, bad = 0, 0, []
    for path in tqdm(images, desc="resizing", unit="image"):
        rel = path.relative_to(args.source)
        fmt, ext = FORMATS.get(args.format, (None, path.suffix))
        out = args.destination / rel.with_suffix(ext)
        if out.exists() and not args.overwrite:
            kept += 1
            continue
        try:
            loaded = load_image(path)
        except BadImage as exc:
            bad.append(str(exc))
            continue
        img = loaded.rgb
        (sw, sh), (fw, fh) = target_size(img.width, img.height, max_area, args.divisible_by)
        if not fw or not fh:
            bad.append(f"{path}: {sw}x{sh} has a side shorter than --divisible_by {args.divisible_by}")
            continue
        if (sw, sh) != img.size:
            img = img.resize((sw, sh), Image.Resampling.LANCZOS)
        if (fw, fh) != (sw, sh):
            left, top = (sw - fw) // 2, (sh - fh) // 2
            img = img.crop((left, top, left + fw, top + fh))
        save_format = fmt or {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".webp": "WEBP",
                              ".bmp": "BMP"}[path.suffix.lower()]
        options = {"quality": args.quality} if save_format in ("JPEG", "WEBP") else {}
        with atomic_path(out) as tmp:
            img.save(tmp, format=save_format, **options)
        for cap_ext in args.caption_extensions:
            caption = path.with_suffix(cap_ext)
            if caption.is_file():
                with atomic_path(out.with_suffix(cap_ext)) as tmp:
                    shutil.copyfile(caption, tmp)
        done += 1
    for message in bad:
        print(f"skipped: {message}", file=sys.stderr)
    print(f"{len(images)} images: {done} written to {args.destination}, {kept} already there (use --overwrite), "
          f"{len(bad)} unreadable")
    return 0


cli = command(main)  # the console command (pyproject.toml)

if __name__ == "__main__":
    sys.exit(cli())
