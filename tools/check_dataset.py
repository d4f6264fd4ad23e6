#!/usr/bin/env python
"""Load a dataset exactly as training would, and report what training will see.

    python tools/check_dataset.py --dataset_config my_dataset.toml
    python tools/check_dataset.py --config my_training.toml --json

Prints the images and repeats of every subset, images without captions, unreadable files, the
dataset's warnings (empty caption files, animated images, two subsets on one folder, a batch larger
than the images, keep_tokens that keep whole captions), captions longer than the text encoder reads,
the most frequent tags and the aspect-ratio bucket table. Where the dataset sets no resolution, the
model's native size is used (give --pretrained_model_name_or_path or --resolution). Unreadable
images are all listed here; training itself stops at the first one unless skip_bad_images = true.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path


def build_report(data, max_token_length: int | None = None) -> dict:
    from library.data.summary import dataset_warnings, long_captions, tag_frequency

    subsets = []
    for d, spec in enumerate(data.specs):
        for sub in spec.subsets:
            recs = [i for i, r in enumerate(data.records) if r.dataset_index == d and r.subset is sub]
            held = set(data.validation)
            subsets.append({
                "dataset": d + 1, "subset": sub.index + 1, "image_dir": sub.image_dir, "metadata_file": sub.metadata_file,
                "is_reg": sub.is_reg, "images": len(recs), "num_repeats": sub.num_repeats,
                "samples_per_epoch": sum(data.records[i].repeats for i in recs if i not in held),
                "validation_images": sum(1 for i in recs if i in held),
            })
    tags: Counter = Counter()
    for counts in tag_frequency(data).values():
        tags.update(counts)
    return {
        "source": data.source,
        "images": len(data.records),
        "batches_per_epoch": data.batches_per_epoch(),
        "datasets": [{"dataset": d + 1, "resolution": list(data.tables[d].resolution), "batch_size": data.batch_sizes[d],
                      "enable_bucket": spec.enable_bucket} for d, spec in enumerate(data.specs)],
        "subsets": subsets,
        "missing_captions": data.report.missing_captions,
        "class_token_captions": data.report.class_token_captions,
        "bad_files": data.report.bad_images,
        "warnings": dataset_warnings(data),
        "token_limit": max_token_length or 75,
        "long_captions": [{"image": path, "tokens": n}
                          for path, n in long_captions(data, limit=max_token_length or 75)],
        "tag_frequency": dict(tags.most_common()),
        "buckets": [{"width": w, "height": h, "count": n} for w, h, n in data.bucket_table()],
    }


def print_report(rep: dict, top: int) -> None:
    print(f"dataset: {rep['source']}: {rep['images']} images, {rep['batches_per_epoch']} batches per epoch")
    for ds in rep["datasets"]:
        w, h = ds["resolution"]
        print(f"  dataset #{ds['dataset']}: {w}x{h}, batch size {ds['batch_size']}, "
              f"buckets {'on' if ds['enable_bucket'] else 'off'}")
        for sub in (s for s in rep["subsets"] if s["dataset"] == ds["dataset"]):
            where = sub["image_dir"] or sub["metadata_file"]
            extra = " [regularisation]" if sub["is_reg"] else ""
            if sub["validation_images"]:
                extra += f" ({sub['validation_images']} held out for validation)"
            print(f"    subset #{sub['subset']} {where}: {sub['images']} images x {sub['num_repeats']} repeats "
                  f"= {sub['samples_per_epoch']} samples per epoch{extra}")
    if rep["class_token_captions"]:
        print(f"images without a caption file, using class_tokens: {rep['class_token_captions']}")
    listings = [
        ("images without any caption ({}, they train with an empty caption):", rep["missing_captions"]),
        ("unreadable images ({}; training stops unless skip_bad_images = true):", rep["bad_files"]),
        (f"captions longer than {rep['token_limit']} tokens ({{}}; the text encoder ignores the rest):",
         [f"{item['tokens']:4d} tokens  {item['image']}" for item in rep["long_captions"]]),
    ]
    for message in rep["warnings"]:
        print(f"warning: {message}")
    for title, rows in listings:
        if rows:
            print(title.format(len(rows)))
            for row in rows:
                print(f"  {row}")
    tags = list(rep["tag_frequency"].items())[:top]
    if tags:
        print(f"most frequent tags (of {len(rep['tag_frequency'])}):")
        for tag, n in tags:
            print(f"  {n:6d}  {tag}")
    print("buckets (width x height: images):")
    for b in rep["buckets"]:
        print(f"  {b['width']:5d} x {b['height']:<5d} {b['count']}")


def main(argv: list[str] | None = None) -> int:
    from library.utils.runtime import offline_and_quiet

    offline_and_quiet()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--dataset_config", help="kohya-style dataset TOML")
    src.add_argument("--config", help="training config (its dataset and options are used)")
    ap.add_argument("--pretrained_model_name_or_path", help="model whose native size is the default resolution")
    ap.add_argument("--resolution", type=int, help="default resolution where the dataset sets none")
    ap.add_argument("--seed", type=int, default=None, help="seed of the validation split (default: the config's)")
    ap.add_argument("--max_token_length", type=int, choices=(75, 150, 225), default=None,
                    help="caption length the text encoders read (default: the config's, else 75)")
    ap.add_argument("--top_tags", type=int, default=20, help="tags to list (default 20)")
    ap.add_argument("--json", action="store_true", help="print the report as JSON")
    args = ap.parse_args(argv)

    from library.errors import UserError

    try:
        data = load(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    rep = build_report(data, args.max_token_length)
    if args.json:
        print(json.dumps(rep, indent=2))
    else:
        print_report(rep, args.top_tags)
    return 0


def load(args):
    from library.config import build_config
    from library.config.dataset import check_dataset_file_keys, parse_blueprint
    from library.config.loader import read_toml
    from library.data.dataset import TrainingData
    from library.errors import UserError

    seed, batch_size, model, masked_loss = 42, 1, args.pretrained_model_name_or_path, False
    if args.config:
        cfg = build_config(args.config, [])
        if args.max_token_length is None:
            args.max_token_length = cfg.training.max_token_length
        blueprint, seed, batch_size = cfg.dataset, cfg.training.seed, cfg.training.train_batch_size
        masked_loss = cfg.training.masked_loss  # mask files are then no images, and each image needs one
        model = model or cfg.model.pretrained_model_name_or_path
    else:
        path = Path(args.dataset_config)
        doc = read_toml(path, "dataset config")
        check_dataset_file_keys(doc, str(path))
        blueprint = parse_blueprint(doc, str(path), path.resolve().parent)
    native = args.resolution
    if native is None and model:
        from library.config.options import ModelOptions
        from library.models.loader import plan_model

        native = plan_model(ModelOptions(pretrained_model_name_or_path=model)).native_resolution
    if native is None:
        if any(ds.resolution is None for ds in blueprint.datasets):
            raise UserError(f"{blueprint.source}: a dataset sets no resolution; pass --resolution or "
                            "--pretrained_model_name_or_path to use the model's native size")
        native = 512
    return TrainingData(blueprint, native_resolution=native, default_batch_size=batch_size,
                        seed=args.seed if args.seed is not None else seed, skip_bad_images=True,
                        masked_loss=masked_loss)


if __name__ == "__main__":
    sys.exit(main())
