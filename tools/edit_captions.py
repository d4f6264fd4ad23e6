#!/usr/bin/env python
"""Edit the tag captions of a dataset in one go, or show its tag frequency.

    python tools/edit_captions.py data/subject --show_frequency
    python tools/edit_captions.py data/subject --trigger "sks dog" --remove watermark "simple background"
    python tools/edit_captions.py data --recursive --replace "1girl=1woman" --add "photo" --dedupe --dry_run

Edits apply in this order to each caption: --replace, --remove, --add, --dedupe, --trigger (moved
or inserted first). Tags are split at --separator. Images without a caption file are counted and
left alone. Files are rewritten atomically, only when they change.
"""
from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

from library.utils.toolmain import command


def edit(tags: list[str], args) -> list[str]:
    tags = list(tags)  # a new list: the caller compares it with the old one to see what changed
    if args.replace:
        mapping = dict(args.replace)
        tags = [mapping.get(t, t) for t in tags]
    if args.remove:
        drop = set(args.remove)
        tags = [t for t in tags if t not in drop]
    for tag in args.add or []:
        if tag not in tags:
            tags.append(tag)
    if args.dedupe:
        tags = list(dict.fromkeys(tags))
    if args.trigger:
        tags = [args.trigger] + [t for t in tags if t != args.trigger]
    return [t for t in tags if t]


def pair(text: str) -> tuple[str, str]:
    old, eq, new = text.partition("=")
    if not eq or not old.strip():
        raise argparse.ArgumentTypeError(f"{text!r}: write OLD=NEW")
    return old.strip(), new.strip()


def main(argv: list[str] | None = None) -> int:
    from library.data.labelling import file_extension

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", type=Path)
    ap.add_argument("--add", nargs="+", metavar="TAG", help="tags appended where missing")
    ap.add_argument("--remove", nargs="+", metavar="TAG", help="tags removed")
    ap.add_argument("--replace", nargs="+", type=pair, metavar="OLD=NEW", help="tags renamed")
    ap.add_argument("--trigger", help="a trigger word put first in every caption")
    ap.add_argument("--dedupe", action="store_true", help="remove repeated tags")
    ap.add_argument("--show_frequency", action="store_true", help="print how many captions contain each tag")
    ap.add_argument("--top", type=int, default=50, help="tags listed by --show_frequency (default 50)")
    ap.add_argument("--separator", default=",", help="tag separator (default ,)")
    ap.add_argument("--extension", type=file_extension, default=".txt")
    ap.add_argument("--recursive", action="store_true")
    ap.add_argument("--dry_run", action="store_true", help="print the changes, write nothing")
    args = ap.parse_args(argv)

    from tqdm.auto import tqdm

    from library.data.captions import BadCaption, join_tags, read_caption_file, split_tags
    from library.data.images import find_images
    from library.errors import UserError
    from library.utils.atomic import atomic_write_text
    from library.utils.writable import input_folder

    input_folder(args.folder, "images")
    editing = any([args.add, args.remove, args.replace, args.trigger, args.dedupe])
    if not editing and not args.show_frequency:
        raise UserError("nothing to do: give --add, --remove, --replace, --trigger, --dedupe or --show_frequency")
    images = find_images(args.folder, args.recursive)
    split_on = args.separator.strip() or args.separator  # ", " splits "a,b" too; " " stays a space
    changed, missing, counts = 0, 0, Counter()
    unreadable: list[str] = []
    for image in tqdm(images, desc="captions", unit="file", disable=not editing):
        path = image.with_suffix(args.extension)
        if not path.is_file():
            missing += 1
            continue
        try:
            text = read_caption_file(path)
        except BadCaption as exc:  # leave it as it is; edit the others
            unreadable.append(str(exc))
            continue
        tags = split_tags(text, split_on)
        new = edit(tags, args) if editing else tags
        counts.update(set(new))
        if editing and new != tags:
            changed += 1
            if args.dry_run:
                tqdm.write(f"{path}: {join_tags(tags, args.separator)}  ->  {join_tags(new, args.separator)}")
            else:
                atomic_write_text(path, join_tags(new, args.separator) + "\n")
    for message in unreadable:
        print(f"skipped: {message}", file=sys.stderr)
    if args.show_frequency:
        print(f"tag frequency over {len(images) - missing} captions:")
        for tag, n in counts.most_common(args.top):
            print(f"  {n:6d}  {tag}")
    if editing:
        print(f"{len(images)} images: {changed} captions {'would change' if args.dry_run else 'changed'}, "
              f"{missing} without a caption file, {len(unreadable)} unreadable (left as they were)")
    return 0


cli = command(main)  # the console command (pyproject.toml)

if __name__ == "__main__":
    sys.exit(cli())
