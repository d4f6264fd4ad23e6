"""What the user sees about a dataset (trainer start, tools/check_dataset.py) and what the LoRA
metadata records of it (ss_datasets, ss_tag_frequency)."""
from __future__ import annotations

import logging
from collections import Counter, defaultdict
from pathlib import Path

from library.data.captions import fixed_caption, split_tags
from library.data.dataset import TrainingData

log = logging.getLogger(__name__)

TOKEN_LIMIT = 75  # CLIP reads 77 tokens, two of them the start and end markers
LISTED = 10       # long captions named one per line in the training log; check_dataset lists them all


def _where(data: TrainingData, d: int, s: int | None = None) -> str:
    text = f"{data.source}: [[datasets]] #{d + 1}"
    return text if s is None else f"{text} [[datasets.subsets]] #{s + 1}"


def _first(paths: list[str], count: int = 3) -> str:
    return ", ".join(paths[:count]) + (", ..." if len(paths) > count else "")


def dataset_warnings(data: TrainingData) -> list[str]:
    """What about a valid dataset a user would want to know before training: settings that do not do
    what they look like (each a one-line message naming the dataset, subset or file)."""
    out = []
    rep = data.report
    # a file read by two subsets is one file
    empty, animated, large = (list(dict.fromkeys(x)) for x in (rep.empty_captions, rep.animated, rep.large))
    if empty:
        out.append(f"{len(empty)} caption files are empty; their images train as if they had none (class_tokens, "
                   f"or an empty caption): {_first(empty)}")
    if animated:
        out.append(f"{len(animated)} animated images: only the first frame of each is trained: {_first(animated)}")
    if large:
        out.append(f"{len(large)} images are larger than 89 megapixels and are decoded again at every use (slow); "
                   f"scale them down with tools/resize_images.py: {_first(large)}")
    seen: dict[Path, str] = {}
    for spec in data.specs:
        for sub in spec.subsets:
            if not sub.image_dir or sub.metadata_file:
                continue
            folder = Path(sub.image_dir).resolve()
            here = _where(data, spec.index, sub.index)
            if folder in seen:
                out.append(f"{here}: reads the same folder as {seen[folder].split(': ', 1)[1]} ({sub.image_dir}): "
                           "each of its images is trained by both subsets; remove one of them unless that is meant "
                           "(num_repeats repeats images)")
            else:
                seen[folder] = here
    train = data.train_indices()
    for d, spec in enumerate(data.specs):
        samples = sum(data.records[i].repeats for i in train if data.records[i].dataset_index == d)
        if 0 < samples < data.batch_sizes[d]:
            out.append(f"{_where(data, d)}: batch size {data.batch_sizes[d]} is more than its {samples} samples per "
                       f"epoch (images x num_repeats): every step trains {samples}; lower batch_size or raise "
                       "num_repeats")
        for sub in spec.subsets:
            shuffled = sub.shuffle_caption or sub.caption_tag_dropout_rate > 0
            if not (shuffled and sub.keep_tokens):
                continue
            short = []
            for rec in data.records:
                caption = fixed_caption(rec.caption, sub)
                if rec.subset is sub and not (sub.keep_tokens_separator and sub.keep_tokens_separator in caption):
                    tags = len(split_tags(caption, sub.caption_separator))
                    if tags <= sub.keep_tokens:
                        short.append(f"{rec.path.name}: {tags} tags")
            if short:
                out.append(f"{_where(data, d, sub.index)}: keep_tokens = {sub.keep_tokens} keeps every tag of "
                           f"{len(short)} captions, which are therefore never shuffled or dropped "
                           f"({_first(short)})")
    return out


def long_captions(data: TrainingData, tokenizer=None, limit: int = TOKEN_LIMIT) -> list[tuple[str, int]]:
    """(image, tokens) of every image whose caption (with prefix and suffix) is longer than the text
    encoder reads; the rest of such a caption is cut off. `tokenizer` defaults to SD's CLIP tokenizer."""
    if tokenizer is None:
        from library.models.shipped import CONFIG_ROOT, load_tokenizer

        tokenizer = load_tokenizer(CONFIG_ROOT / "sd15" / "tokenizer")
    captions = {}
    for rec in data.records:
        captions.setdefault(str(rec.path), fixed_caption(rec.caption, rec.subset))
    if not captions:
        return []
    counts = tokenizer(list(captions.values()), add_special_tokens=False, verbose=False).input_ids
    return [(path, len(ids)) for path, ids in zip(captions, counts) if len(ids) > limit]


def log_dataset(data: TrainingData, max_token_length: int | None = None) -> None:
    """`max_token_length`: kohya's option (150, 225); unset, the text encoders read 75 tokens."""
    limit = max_token_length or TOKEN_LIMIT
    train = data.train_indices()
    reg = [i for i in train if data.records[i].subset.is_reg]
    rep = data.report
    log.info("%d training images, %d regularisation images, %d held out for validation, %d batches per epoch",
             len(train) - len(reg), len(reg), len(data.validation), data.batches_per_epoch())
    for bad in rep.bad_images:
        log.warning("skipped unreadable image %s", bad)
    if rep.bad_images:
        log.warning("skipped %d unreadable images (skip_bad_images = true)", len(rep.bad_images))
    if rep.class_token_captions:
        log.info("%d images have no caption file and use their subset's class_tokens", rep.class_token_captions)
    if rep.missing_captions:
        log.warning("%d images have no caption (no caption file, or an empty one) and no class_tokens: they train "
                    "with an empty caption (first: %s)", len(rep.missing_captions), rep.missing_captions[0])
    for message in dataset_warnings(data):
        log.warning("%s", message)
    long = long_captions(data, limit=limit)
    for path, tokens in long[:LISTED]:
        longer = next((n for n in (150, 225) if n > limit and tokens <= n), None)
        hint = f" (max_token_length = {longer} reads all of it)" if longer else \
            " (max_token_length = 225 reads 225 of them)" if limit < 225 else ""
        log.warning("%s: the caption is %d tokens; the text encoder reads the first %d, the rest is ignored%s",
                    path, tokens, limit, hint)
    if len(long) > LISTED:
        log.warning("%d more captions are longer than %d tokens (tools/check_dataset.py lists them all)",
                    len(long) - LISTED, limit)
    table = data.bucket_table()
    log.info("buckets (width x height: images): %s", ", ".join(f"{w}x{h}: {n}" for w, h, n in table))


def tag_frequency(data: TrainingData) -> dict[str, dict[str, int]]:
    """kohya's ss_tag_frequency: per image folder, how many captions contain each tag."""
    out: dict[str, Counter] = defaultdict(Counter)
    for rec in data.records:
        tags = {t.strip() for t in rec.caption.split(rec.subset.caption_separator) if t.strip()}
        out[rec.path.parent.name].update(tags)
    return {folder: dict(counts) for folder, counts in out.items()}


def dataset_summary(data: TrainingData) -> dict:
    train = data.train_indices()
    reg = sum(1 for i in train if data.records[i].subset.is_reg)
    datasets = []
    for d, spec in enumerate(data.specs):
        subsets = []
        for sub in spec.subsets:
            count = sum(1 for r in data.records if r.dataset_index == d and r.subset is sub)
            subsets.append({"img_count": count, "num_repeats": sub.num_repeats, "is_reg": sub.is_reg,
                            "image_dir": (sub.image_dir or "").replace("\\", "/").rstrip("/").split("/")[-1],
                            "class_tokens": sub.class_tokens, "keep_tokens": sub.keep_tokens,
                            "shuffle_caption": sub.shuffle_caption, "flip_aug": sub.flip_aug,
                            "caption_dropout_rate": sub.caption_dropout_rate,
                            "caption_dropout_every_n_epochs": sub.caption_dropout_every_n_epochs,
                            "caption_tag_dropout_rate": sub.caption_tag_dropout_rate,
                            "alpha_mask": sub.alpha_mask,
                            "masks": sum(1 for r in data.records if r.subset is sub and r.mask is not None)})
        buckets = {f"{w}x{h}": n for w, h, n in data.bucket_table()}
        datasets.append({"is_dreambooth": True, "batch_size_per_device": data.batch_sizes[d],
                         "resolution": list(data.tables[d].resolution), "enable_bucket": spec.enable_bucket,
                         "min_bucket_reso": spec.min_bucket_reso, "max_bucket_reso": spec.max_bucket_reso,
                         "bucket_info": {"buckets": buckets}, "network_multiplier": spec.network_multiplier,
                         "subsets": subsets})
    return {"num_train_images": len(train) - reg, "num_reg_images": reg, "datasets": datasets}
