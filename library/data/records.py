"""Finding the images of each subset with their captions (caption files or kohya metadata files)."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from library.config.dataset import SubsetSpec
from library.data.captions import BadCaption, read_caption_file
from library.data.images import IMAGE_EXTENSIONS, BadImage, inspect_image, is_image_entry
from library.errors import UserError

log = logging.getLogger(__name__)


@dataclass
class ImageRecord:
    path: Path
    caption: str
    subset: SubsetSpec
    dataset_index: int
    size: tuple[int, int]  # (w, h) after EXIF rotation
    repeats: int = 1
    mask: Path | None = None  # the mask image (masked_loss), same size as the image


@dataclass
class ScanReport:
    images: int = 0
    missing_captions: list[str] = field(default_factory=list)   # no caption file and no class_tokens
    class_token_captions: int = 0                                  # no caption file, class_tokens used
    bad_images: list[str] = field(default_factory=list)
    empty_captions: list[str] = field(default_factory=list)     # caption files with no text (as if missing)
    animated: list[str] = field(default_factory=list)           # animated images: their first frame is used
    large: list[str] = field(default_factory=list)              # above Pillow's decompression-bomb warning


def _metadata_entries(path: Path) -> list[tuple[str, dict]]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise UserError(f"{path}: metadata file is not UTF-8 text") from None
    try:
        if path.suffix.lower() == ".jsonl":
            entries = []
            for n, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                row = json.loads(line)
                key = row.get("image_path") or row.get("image") or row.get("file_name")
                if not key:
                    raise UserError(f"{path}:{n}: a line needs image_path (or image / file_name)")
                entries.append((key, row))
            return entries
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: invalid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object {{image: {{caption, tags}}}}")
    return list(data.items())


def _metadata_caption(entry: dict, subset: SubsetSpec) -> str | None:
    caption, tags = entry.get("caption"), entry.get("tags")
    if caption is None:
        return tags
    if tags:
        joiner = f"{subset.caption_separator} " if subset.caption_separator == "," else subset.caption_separator
        if subset.enable_wildcard:  # the tags go on every line of a multi-line caption
            return "\n".join(f"{line}{joiner}{tags}" for line in caption.split("\n") if line.strip())
        return caption + joiner + tags
    return caption


def _find_image(key: str, base: Path | None) -> Path | None:
    candidates = [Path(key)]
    if base is not None:
        candidates.append(base / key)
    for cand in candidates:
        if cand.is_file():
            return cand
        for ext in IMAGE_EXTENSIONS + tuple(e.upper() for e in IMAGE_EXTENSIONS):
            with_ext = cand.with_name(cand.name + ext)
            if with_ext.is_file():
                return with_ext
    return None


def caption_path(image: Path, extension: str, names: dict[str, list[Path]] | None = None) -> Path | None:
    """The caption file of `image`: same name with `extension`; when that does not exist, one whose
    extension differs only in case (IMG_1.TXT for IMG_1.JPG, as some cameras and Windows tools write).
    `names` maps lower-cased file names of the folder to their entries (computed once per folder)."""
    exact = image.with_suffix(extension)
    if exact.exists() or exact.is_symlink():
        return exact
    if names is None:
        return None
    matches = [p for p in names.get(exact.name.lower(), []) if p.stem == image.stem]
    return matches[0] if len(matches) == 1 else None


def _read_caption(path: Path, all_lines: bool = False) -> str:
    if path.is_dir():
        raise UserError(f"{path}: a folder where the caption file of the image beside it should be; rename or "
                        "remove it (captions are text files)")
    try:
        return read_caption_file(path, all_lines)
    except BadCaption as exc:
        raise UserError(str(exc)) from None


MASK_SUFFIX = "_mask"  # <stem>_mask.png beside <stem>.jpg: the image's mask (masked_loss)


def _images_by_stem(folder: Path) -> dict[str, Path]:
    return {p.stem: p for p in sorted(folder.iterdir()) if is_image_entry(p)}


def find_masks(subset: SubsetSpec, images: list[Path], where: str) -> dict[Path, Path]:
    """The mask image of each image of a subset trained with masked_loss: from conditioning_data_dir
    (the same stem, any image extension, as kohya), or `<stem>_mask.<ext>` beside the image. A subset
    with masks needs one for every image; a mask that names no image is an error too. Empty when the
    subset has no mask images (it then trains unmasked, or with its alpha masks)."""
    if subset.conditioning_data_dir:
        folder = Path(subset.conditioning_data_dir)
        if not folder.is_dir():
            raise UserError(f"{where}: conditioning_data_dir: not a folder: {folder}")
        masks = _images_by_stem(folder)
        found = {img: masks.get(img.stem) for img in images}
        looked = f"{folder}/{{stem}}.png (or another image extension)"
        unused = set(masks.values()) - set(found.values())
    else:
        found = {}
        for img in images:
            beside = [img.with_name(img.stem + MASK_SUFFIX + ext) for ext in IMAGE_EXTENSIONS]
            found[img] = next((m for m in beside if m.is_file()), None)
        if not any(found.values()):
            return {}
        looked = f"{{stem}}{MASK_SUFFIX}.png beside it"
        unused = set()
    for img, mask in found.items():
        if mask is None:
            raise UserError(f"{img}: no mask image (masked_loss looks for {looked.replace('{stem}', img.stem)}); "
                            "add one (white = trained) or take the image out of the subset")
    if unused:
        first = sorted(unused)[0]
        raise UserError(f"{first}: a mask image that names no image of the subset (masks are named as their image); "
                        "rename or remove it")
    return found


def scan_subset(subset: SubsetSpec, dataset_index: int, skip_bad_images: bool, report: ScanReport,
                where: str, masked_loss: bool = False) -> list[ImageRecord]:
    """Every usable image of a subset with its raw caption; bad images stop the run unless skipped.
    With `masked_loss`, each image's mask is found too (find_masks), and mask files beside the
    images are not images to train on."""
    pairs: list[tuple[Path, str | None]] = []
    if subset.metadata_file:
        base = Path(subset.image_dir) if subset.image_dir else None
        for key, entry in _metadata_entries(Path(subset.metadata_file)):
            found = _find_image(key, base)
            if found is None:
                raise UserError(f"{subset.metadata_file}: image {key!r} not found"
                                + (f" (also looked in {base})" if base else ""))
            pairs.append((found, _metadata_caption(entry, subset) if isinstance(entry, dict) else None))
    else:
        folder = Path(subset.image_dir)
        if not folder.is_dir():
            raise UserError(f"{where}: image_dir: not a folder: {folder}")
        entries = list(folder.iterdir())
        names: dict[str, list[Path]] = {}
        for entry in entries:
            names.setdefault(entry.name.lower(), []).append(entry)
        candidates = sorted(p for p in entries if is_image_entry(p))
        if masked_loss and not subset.conditioning_data_dir:
            stems = {p.stem for p in candidates}
            candidates = [p for p in candidates
                          if not (p.stem.endswith(MASK_SUFFIX) and p.stem[:-len(MASK_SUFFIX)] in stems)]
        for path in candidates:
            cap_path = caption_path(path, subset.caption_extension, names)
            pairs.append((path, None if cap_path is None else _read_caption(cap_path, subset.enable_wildcard)))
            if pairs[-1][1] == "":
                report.empty_captions.append(str(cap_path))
                pairs[-1] = (path, None)  # an empty caption file is treated as a missing one
    masks = find_masks(subset, [p for p, _ in pairs], where) if masked_loss else {}
    records = []
    for path, caption in pairs:
        try:
            info = inspect_image(path)
        except BadImage as exc:
            if not skip_bad_images:
                raise UserError(f"{exc}; fix or remove it, or set skip_bad_images = true") from None
            report.bad_images.append(str(exc))
            continue
        size = info.size
        if info.frames > 1:
            report.animated.append(str(path))
        if info.large:
            report.large.append(str(path))
        if caption is None and subset.class_tokens:
            report.class_token_captions += 1
            caption = subset.class_tokens
        elif caption is None:
            report.missing_captions.append(str(path))
            caption = ""
        mask = masks.get(path)
        if mask is not None:
            try:
                mask_size = inspect_image(mask).size
            except BadImage as exc:
                raise UserError(f"{path}: its mask cannot be used: {exc}") from None
            if mask_size != size:
                raise UserError(f"{path}: the image is {size[0]}x{size[1]}, its mask {mask} {mask_size[0]}x"
                                f"{mask_size[1]}; a mask must have its image's size")
        records.append(ImageRecord(path, caption, subset, dataset_index, size, subset.num_repeats, mask))
    source = subset.metadata_file or subset.image_dir
    if not pairs:
        raise UserError(f"{where}: no images in {source} (looked for .jpg, .jpeg, .png, .webp, .bmp)")
    if not records:
        raise UserError(f"{where}: none of the {len(pairs)} images in {source} could be read (first: "
                        f"{report.bad_images[-len(pairs)]}); this subset would train nothing: fix the images or "
                        "remove the subset")
    report.images += len(records)
    return records


def balance_regularisation(train: list[ImageRecord], reg: list[ImageRecord]) -> list[ImageRecord]:
    """Repeat regularisation images so that they are seen as often as the training images, as kohya does."""
    if not reg:
        return []
    target = sum(r.repeats for r in train)
    if target < len(reg):
        log.warning("%d regularisation images but only %d training samples per epoch: some are not used",
                    len(reg), target)
    used: list[ImageRecord] = []
    count = 0
    first = True
    while count < target:
        for rec in reg:
            if first:
                used.append(rec)
                count += rec.repeats
            else:
                rec.repeats += 1
                count += 1
            if count >= target:
                break
        first = False
    return used
