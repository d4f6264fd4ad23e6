#!/usr/bin/env python
"""Write WD14-style tag captions next to every image, with an ONNX tagger on disk.

    python tools/tag_images.py data/subject --model models/wd-v1-4-vit-tagger-v2
    python tools/tag_images.py data --model models/wd-swinv2 --recursive --general_threshold 0.4 \\
        --character_tags_first --always_first_tags "1girl,1boy" --undesired_tags "watermark"

--model is a folder holding `model.onnx` and `selected_tags.csv` (columns tag_id, name, category,
count; category 0 = general, 4 = character, 9 = rating), as published for the WD14 taggers.
Nothing is downloaded. Images are prepared the way these models expect: transparency on white,
padded to a square with white, resized to the model's input size, channels in BGR order, values
0-255. Needs `pip install onnxruntime` (or onnxruntime-gpu).

Existing captions are kept unless --overwrite or --append; unreadable images are reported and
skipped; captions are written atomically as UTF-8.
"""
from __future__ import annotations

import argparse
import csv
import sys
from dataclasses import dataclass
from pathlib import Path

from library.utils.toolmain import command


# Tags whose underscores are part of the emoticon, not word separators.
KAOMOJI = {"0_0", "(o)_(o)", "+_+", "+_-", "._.", "<o>_<o>", "<|>_<|>", "=_=", ">_<", "3_3", "6_9", ">_o", "@_@",
           "^_^", "o_o", "u_u", "x_x", "|_|", "||_||"}


@dataclass
class Tags:
    names: list[str]
    categories: list[int]


def read_tags(path: Path) -> Tags:
    from library.errors import UserError

    try:
        with open(path, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read ({exc})") from None
    if not rows or "name" not in rows[0] or "category" not in rows[0]:
        raise UserError(f"{path}: expected a CSV with the columns tag_id, name, category, count")
    try:
        return Tags([r["name"] for r in rows], [int(r["category"]) for r in rows])
    except ValueError:
        raise UserError(f"{path}: the category column must hold numbers (0 general, 4 character, 9 rating)") from None


def prepare(image, size: int):
    """RGB PIL image -> float32 (size, size, 3) BGR 0-255, padded to a square with white."""
    import numpy as np
    from PIL import Image

    w, h = image.size
    side = max(w, h)
    canvas = Image.new("RGB", (side, side), (255, 255, 255))
    canvas.paste(image, ((side - w) // 2, (side - h) // 2))
    resample = Image.Resampling.BOX if side > size else Image.Resampling.LANCZOS
    arr = np.asarray(canvas.resize((size, size), resample), dtype=np.float32)
    return arr[:, :, ::-1].copy()


def caption_from(probs, tags: Tags, args) -> list[str]:
    general, characters, rating = [], [], []
    ratings = [(p, n) for p, n, c in zip(probs, tags.names, tags.categories) if c == 9]
    for p, name, cat in zip(probs, tags.names, tags.categories):
        if cat == 0 and p >= args.general_threshold:
            general.append((p, name))
        elif cat == 4 and p >= args.character_threshold:
            characters.append((p, name))
    if args.include_rating and ratings:
        rating = [max(ratings)[1]]
    general.sort(reverse=True)
    characters.sort(reverse=True)
    names = [n for _, n in characters] + [n for _, n in general] if args.character_tags_first else \
        [n for _, n in sorted(general + characters, reverse=True)]
    names = rating + names
    if args.replace_underscores:
        names = [n if n in KAOMOJI else n.replace("_", " ") for n in names]
    undesired = {t.strip() for t in args.undesired_tags.split(",") if t.strip()}
    names = [n for n in names if n not in undesired]
    first = [t.strip() for t in args.always_first_tags.split(",") if t.strip()]
    front = [t for t in first if t in names]
    return front + [n for n in names if n not in front]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", type=Path, help="folder of images")
    ap.add_argument("--model", type=Path, required=True, help="folder with model.onnx and selected_tags.csv")
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument("--general_threshold", type=float, default=0.35)
    ap.add_argument("--character_threshold", type=float, default=0.85)
    ap.add_argument("--undesired_tags", default="", help="comma-separated tags never written")
    ap.add_argument("--always_first_tags", default="", help="comma-separated tags moved to the front when found")
    ap.add_argument("--character_tags_first", action="store_true", help="character tags before general ones")
    ap.add_argument("--replace_underscores", action="store_true", help="'long_hair' -> 'long hair'")
    ap.add_argument("--include_rating", action="store_true", help="put the most likely rating tag first")
    ap.add_argument("--append", action="store_true", help="add new tags to existing captions")
    ap.add_argument("--caption_separator", default=", ")
    from library.data.labelling import add_output_args

    add_output_args(ap, "tag")
    args = ap.parse_args(argv)

    from tqdm.auto import tqdm

    from library.data.captions import BadCaption, read_caption_file, split_tags
    from library.data.labelling import BatchLoader, select_images
    from library.errors import UserError
    from library.utils.atomic import atomic_write_text

    images, todo = select_images(args.folder, args.recursive, args.extension, args.overwrite or args.append)
    onnx_file, tags_file = args.model / "model.onnx", args.model / "selected_tags.csv"
    if not onnx_file.is_file() or not tags_file.is_file():
        raise UserError(f"--model {args.model}: expected a folder with model.onnx and selected_tags.csv "
                        "(a WD14-style tagger)")
    try:
        import onnxruntime as ort
    except ImportError:
        raise UserError("tag_images.py needs onnxruntime: pip install onnxruntime") from None
    import numpy as np

    tags = read_tags(tags_file)
    providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
    try:
        session = ort.InferenceSession(str(onnx_file), providers=providers)
    except Exception as exc:  # onnxruntime's own exception types
        raise UserError(f"{onnx_file}: cannot be loaded by onnxruntime ({' '.join(str(exc).split())[:200]})") from None
    inp = session.get_inputs()[0]
    size = inp.shape[1] if isinstance(inp.shape[1], int) else 448
    fixed_batch = isinstance(inp.shape[0], int)
    n_out = session.get_outputs()[0].shape[-1]
    if isinstance(n_out, int) and n_out != len(tags.names):
        raise UserError(f"{tags_file}: {len(tags.names)} tags but the model predicts {n_out}")
    written = 0
    unreadable_captions: list[str] = []
    with tqdm(total=len(todo), desc="tagging", unit="image") as bar:
        batches = BatchLoader(todo, 1 if fixed_batch else args.batch_size, lambda img: prepare(img, size), bar.update)
        for chunk, arrays in batches:
            probs = session.run(None, {inp.name: np.stack(arrays)})[0]
            for path, row in zip(chunk, probs):
                found = caption_from(row, tags, args)
                target = path.with_suffix(args.extension)
                if args.append and target.exists() and not args.overwrite:
                    try:
                        split_on = args.caption_separator.strip() or args.caption_separator
                        old = split_tags(read_caption_file(target), split_on)
                    except BadCaption as exc:  # leave a file we cannot read untouched; tag the others
                        unreadable_captions.append(str(exc))
                        continue
                    found = old + [t for t in found if t not in old]
                text = args.caption_separator.join(found)
                if args.dry_run:
                    tqdm.write(f"{path}: {text}")
                else:
                    atomic_write_text(target, text + "\n")
                    written += 1
    for message in batches.bad + unreadable_captions:
        print(f"skipped: {message}", file=sys.stderr)
    print(f"{len(images)} images: {written} tag files written, {len(images) - len(todo)} kept (use --overwrite "
          f"or --append), {len(batches.bad)} unreadable"
          + (f", {len(unreadable_captions)} existing captions unreadable (left as they were)" if unreadable_captions
             else "") + (" (dry run: nothing written)" if args.dry_run else ""))
    return 0


cli = command(main)  # the console command (pyproject.toml)

if __name__ == "__main__":
    sys.exit(cli())
