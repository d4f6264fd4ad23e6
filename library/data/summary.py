"""What the user sees about a dataset (trainer start, tools/check_dataset.py) and what the LoRA
metadata records of it (ss_datasets, ss_tag_frequency)."""
from __future__ import annotations

import logging
from collections import Counter, defaultdict

from library.data.dataset import TrainingData

log = logging.getLogger(__name__)


def log_dataset(data: TrainingData) -> None:
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
        log.warning("%d images have no caption file and no class_tokens: they train with an empty caption "
                    "(first: %s)", len(rep.missing_captions), rep.missing_captions[0])
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
                            "caption_dropout_rate": sub.caption_dropout_rate})
        buckets = {f"{w}x{h}": n for w, h, n in data.bucket_table()}
        datasets.append({"is_dreambooth": True, "batch_size_per_device": data.batch_sizes[d],
                         "resolution": list(data.tables[d].resolution), "enable_bucket": spec.enable_bucket,
                         "min_bucket_reso": spec.min_bucket_reso, "max_bucket_reso": spec.max_bucket_reso,
                         "bucket_info": {"buckets": buckets}, "subsets": subsets})
    return {"num_train_images": len(train) - reg, "num_reg_images": reg, "datasets": datasets}
