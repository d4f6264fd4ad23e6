"""kohya's dataset schema: `[general]`, `[[datasets]]`, `[[datasets.subsets]]`.

A value is looked up subset -> dataset -> general -> default; the first level that sets it wins.
Each key is allowed only at the levels kohya allows it, and a misplaced or unknown key is an error
that names the file, the dataset/subset, the key and where it belongs.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from library.config.paths import resolve_input
from library.config.schema import CoercionError, check_bounds, closest, coerce, option, options_of
from library.errors import UserError


@dataclass(frozen=True)
class CommonKeys:
    """Allowed at every level."""
    num_repeats: int = option(1, "times each image is seen per epoch", ge=1)
    caption_extension: str = option(".txt", "extension of the caption file next to each image")
    class_tokens: Optional[str] = option(None, "caption for images that have no caption file")
    shuffle_caption: bool = option(False, "shuffle the caption's tags (split by caption_separator) every time")
    caption_separator: str = option(",", "separator of the tags in a caption")
    keep_tokens: int = option(0, "keep the first N tags in place when shuffling/dropping", ge=0)
    keep_tokens_separator: str = option("", "tags before this separator stay in place (instead of keep_tokens)")
    caption_prefix: Optional[str] = option(None, "text prepended to every caption")
    caption_suffix: Optional[str] = option(None, "text appended to every caption")
    caption_dropout_rate: float = option(0.0, "probability of training an image with an empty caption", ge=0, le=1)
    caption_dropout_every_n_epochs: int = option(0, "every N-th epoch all captions are empty; 0 = never", ge=0)
    caption_tag_dropout_rate: float = option(0.0, "probability of dropping each (non-kept) tag", ge=0, le=1)
    flip_aug: bool = option(False, "randomly mirror images horizontally")
    random_crop: bool = option(False, "crop at a random position instead of the centre")
    alpha_mask: bool = option(False, "use the image's alpha channel as a loss mask")
    enable_wildcard: bool = option(
        False, "kohya's wildcards: {a|b|c} in a caption is replaced by one of its choices each time the image is "
               "used ({{ and }} are literal braces), and a caption file of several lines gives one line, drawn each "
               "time (otherwise only the first line is read)")
    secondary_separator: Optional[str] = option(
        None, "a separator that keeps tags together while shuffling/dropping and becomes caption_separator "
              "afterwards (\";;;\" in \"red;;;dress\")")


@dataclass(frozen=True)
class DatasetKeys:
    """Allowed in [general] and [[datasets]]."""
    resolution: Optional[tuple[int, ...]] = option(
        None, "training size: 512 or [width, height]; unset = the base model's native size")
    batch_size: Optional[int] = option(None, "batch size of this dataset; unset = train_batch_size", ge=1)
    enable_bucket: bool = option(False, "aspect-ratio buckets: train each image near its own aspect ratio")
    min_bucket_reso: int = option(256, "smallest bucket edge", ge=32)
    max_bucket_reso: int = option(1024, "largest bucket edge", ge=32)
    bucket_reso_steps: int = option(64, "bucket edges are multiples of this (SDXL: a multiple of 32)", ge=8)
    bucket_no_upscale: bool = option(False, "never upscale: small images get a bucket no larger than themselves")
    network_multiplier: float = option(
        1.0, "multiplier of the LoRA's weight change while this dataset's batches train (kohya's; e.g. -1 for the "
             "negative side of a slider); not with DoRA")
    validation_split: float = option(0.0, "fraction of images held out for validation loss", ge=0, lt=1)
    validation_seed: Optional[int] = option(None, "seed of the validation split; unset = the training seed", ge=0)


@dataclass(frozen=True)
class SubsetKeys:
    """Allowed only in [[datasets.subsets]]."""
    image_dir: Optional[str] = option(None, "folder of images (captions beside them)")
    is_reg: bool = option(False, "regularisation images: their loss is multiplied by prior_loss_weight")
    metadata_file: Optional[str] = option(None, "kohya fine-tune metadata (.json or .jsonl) instead of caption files")
    conditioning_data_dir: Optional[str] = option(
        None, "with masked_loss: the folder of this subset's mask images, each named as its image (kohya's); unset "
              "= <stem>_mask.png beside each image")


@dataclass(frozen=True)
class SubsetSpec(SubsetKeys, CommonKeys):
    index: int = 0


@dataclass(frozen=True)
class DatasetSpec(DatasetKeys):
    index: int = 0
    subsets: tuple[SubsetSpec, ...] = ()


@dataclass(frozen=True)
class DatasetBlueprint:
    source: str
    datasets: tuple[DatasetSpec, ...]


COMMON = options_of(CommonKeys, "any")
DATASET_LEVEL = options_of(DatasetKeys, "dataset")
SUBSET_ONLY = options_of(SubsetKeys, "subset")
PATH_KEYS = ("image_dir", "metadata_file", "conditioning_data_dir")

# kohya keys this trainer deliberately does not implement, with the reason users get.
UNSUPPORTED = {
    "color_aug": "colour augmentation is not supported (kohya deprecated it too)",
    "face_crop_aug_range": "face-crop augmentation is not supported",
    "token_warmup_min": "token warm-up is not supported",
    "token_warmup_step": "token warm-up is not supported",
    "cache_info": "the image-size cache file is not needed: image sizes are read from headers",
}

ALLOWED_AT = {
    "general": {**COMMON, **DATASET_LEVEL},
    "dataset": {**COMMON, **DATASET_LEVEL},
    "subset": {**COMMON, **SUBSET_ONLY},
}
WHERE = {
    "general": "[general] or [[datasets]]",
    "dataset": "[general] or [[datasets]]",
    "subset": "[[datasets.subsets]]",
}


def _location(source: str, level: str, d: int | None, s: int | None) -> str:
    if level == "general":
        return f"{source}: [general]"
    if level == "dataset":
        return f"{source}: [[datasets]] #{d + 1}"
    return f"{source}: [[datasets]] #{d + 1} [[datasets.subsets]] #{s + 1}"


def _check_keys(table: dict, level: str, where: str) -> dict:
    allowed = ALLOWED_AT[level]
    out = {}
    for key, value in table.items():
        if level == "dataset" and key == "subsets":
            continue
        if key in UNSUPPORTED:
            raise UserError(f"{where}: {key}: {UNSUPPORTED[key]}; remove the key")
        if key not in allowed:
            for other, keys in (("subset", SUBSET_ONLY), ("dataset", DATASET_LEVEL)):
                if key in keys:
                    raise UserError(f"{where}: {key}: not allowed here; it belongs in {WHERE[other]}")
            hint = closest(key, allowed)
            raise UserError(f"{where}: {key}: unknown dataset key" + (f"; did you mean {hint}?" if hint else
                            f"; valid keys here: {', '.join(sorted(allowed))}"))
        info = allowed[key]
        try:
            val = coerce(value, info.type)
            check_bounds(val, info)
        except CoercionError as exc:
            raise UserError(f"{where}: {key}: expected {info.describe_allowed()}, {exc}") from None
        out[key] = val
    return out


def _check_resolution(value: tuple[int, ...] | None, where: str) -> tuple[int, int] | None:
    if value is None:
        return None
    if len(value) == 1:
        value = (value[0], value[0])
    if len(value) != 2 or min(value) < 64 or any(v % 8 for v in value):
        raise UserError(f"{where}: resolution: expected 512 or [width, height] with edges >= 64 and divisible by 8, "
                        f"got {list(value)}")
    return (int(value[0]), int(value[1]))


DATASET_FILE_TABLES = ("general", "datasets")


def check_dataset_file_keys(doc: dict, source: str) -> None:
    """A dataset file holds only [general] and [[datasets]]: anything else would be silently unused."""
    for key in doc:
        if key in DATASET_FILE_TABLES:
            continue
        if key == "subsets":
            raise UserError(f"{source}: [[subsets]]: subsets belong to a dataset; write them as "
                            "[[datasets.subsets]] after their [[datasets]] table")
        if key in ALLOWED_AT["general"] or key in SUBSET_ONLY:
            raise UserError(f"{source}: {key}: a dataset key at the top level of the file is not used; put it in "
                            f"{'[[datasets.subsets]]' if key in SUBSET_ONLY else '[general] or [[datasets]]'}")
        hint = closest(key, DATASET_FILE_TABLES)
        raise UserError(f"{source}: [{key}]: unknown table in a dataset file" +
                        (f"; did you mean [{hint}]?" if hint else "; it holds [general] and [[datasets]] tables"))


def parse_blueprint(doc: dict, source: str, base_dir: Path, defaults: dict | None = None,
                    defaults_where: str = "") -> DatasetBlueprint:
    """Build the dataset blueprint from a parsed TOML document (a dataset file or the main config).

    Relative paths are resolved by `resolve_input` with `base_dir`, the folder of the file naming them.
    `defaults` are dataset keys from kohya's flat training config, below [general] (kohya's fallback).
    """
    general_raw = doc.get("general", {})
    datasets_raw = doc.get("datasets", [])
    if not isinstance(general_raw, dict):
        raise UserError(f"{source}: [general] must be a table")
    if not isinstance(datasets_raw, list) or not all(isinstance(d, dict) for d in datasets_raw):
        raise UserError(f"{source}: datasets must be written as [[datasets]] tables")
    if not datasets_raw:
        raise UserError(f"{source}: no [[datasets]] table; add one with at least one [[datasets.subsets]] image_dir")
    general = {**_check_keys(defaults or {}, "general", defaults_where or source),
               **_check_keys(general_raw, "general", _location(source, "general", None, None))}
    datasets = []
    for d, ds_raw in enumerate(datasets_raw):
        ds_where = _location(source, "dataset", d, None)
        ds_vals = _check_keys(ds_raw, "dataset", ds_where)
        subsets_raw = ds_raw.get("subsets", [])
        if not isinstance(subsets_raw, list) or not all(isinstance(s, dict) for s in subsets_raw) or not subsets_raw:
            raise UserError(f"{ds_where}: needs at least one [[datasets.subsets]] table with image_dir")
        subsets = []
        for s, sub_raw in enumerate(subsets_raw):
            where = _location(source, "subset", d, s)
            sub_vals = _check_keys(sub_raw, "subset", where)
            merged = {**{k: v for k, v in general.items() if k in COMMON},
                      **{k: v for k, v in ds_vals.items() if k in COMMON}, **sub_vals}
            for key in PATH_KEYS:
                if merged.get(key):
                    merged[key] = resolve_input(merged[key], base_dir)
            if not merged.get("image_dir") and not merged.get("metadata_file"):
                raise UserError(f"{where}: image_dir: required (the folder of this subset's images)")
            subsets.append(SubsetSpec(index=s, **merged))
        level_vals = {**{k: v for k, v in general.items() if k in DATASET_LEVEL},
                      **{k: v for k, v in ds_vals.items() if k in DATASET_LEVEL}}
        if "resolution" in level_vals:
            level_vals["resolution"] = _check_resolution(level_vals["resolution"], ds_where)
        spec = DatasetSpec(index=d, subsets=tuple(subsets), **level_vals)
        if spec.min_bucket_reso > spec.max_bucket_reso:
            raise UserError(f"{ds_where}: min_bucket_reso ({spec.min_bucket_reso}) is larger than max_bucket_reso "
                            f"({spec.max_bucket_reso})")
        if spec.network_multiplier == 0:
            raise UserError(f"{ds_where}: network_multiplier: 0 would train nothing on this dataset; use a non-zero "
                            "multiplier (1 = as the LoRA is saved)")
        if spec.bucket_reso_steps % 8:
            raise UserError(f"{ds_where}: bucket_reso_steps: expected a multiple of 8, got {spec.bucket_reso_steps}")
        datasets.append(spec)
    return DatasetBlueprint(source=source, datasets=tuple(datasets))


def dataset_key_names() -> dict[str, list[str]]:
    """Every dataset key by the levels where it is allowed (for docs and --help)."""
    return {"any level": list(COMMON), "[general] / [[datasets]]": list(DATASET_LEVEL),
            "[[datasets.subsets]]": list(SUBSET_ONLY)}


FOLDER_PATTERN = re.compile(r"(\d+)_(.+)")


def folder_blueprint(train_dir: str, reg_dir: str | None, general: dict, source: str, defaults: dict | None = None,
                     defaults_where: str = "") -> DatasetBlueprint:
    """kohya's folder convention: each subfolder `N_tokens` is a subset with num_repeats = N and
    class_tokens = tokens. Only used when the user sets train_data_dir (it surprises people)."""
    subsets = []
    for option, root, is_reg in (("train_data_dir", train_dir, False), ("reg_data_dir", reg_dir, True)):
        if root is None:
            continue
        folders = sorted(p for p in Path(root).iterdir() if p.is_dir() and not p.name.startswith("."))
        if not folders:
            raise UserError(f"{source}: {option}: {root} has no subfolders; the folder convention expects "
                            f"{root}/<repeats>_<caption tokens>/ (e.g. {root}/10_sks dog/) holding the images")
        for folder in folders:
            match = FOLDER_PATTERN.fullmatch(folder.name)
            if not match:
                raise UserError(f"{source}: {option}: subfolder {folder.name!r} of {root} is not named "
                                "<repeats>_<caption tokens> (e.g. 10_sks dog)")
            subsets.append({"image_dir": str(folder), "num_repeats": int(match[1]), "class_tokens": match[2].strip(),
                            "is_reg": is_reg})
    return parse_blueprint({"general": general, "datasets": [{"subsets": subsets}]}, source, Path.cwd(), defaults,
                           defaults_where)
