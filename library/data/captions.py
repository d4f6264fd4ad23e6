"""Caption files and kohya's caption processing (prefix/suffix, dropout, tag shuffle and dropout).

The processing follows kohya's order so users' settings mean the same thing here: prefix and
suffix are added first (so with shuffling, a trigger-word prefix needs keep_tokens = 1 or a
keep_tokens_separator), then whole-caption dropout, then tag shuffle and tag dropout. The random
choices come from the `random.Random` passed in, seeded per epoch and sample by the caller, so a
resumed run sees the same captions.
"""
from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path

from library.config.dataset import SubsetSpec


class BadCaption(Exception):
    """A caption file that cannot be read as UTF-8 text."""


def read_caption_file(path: Path) -> str:
    """First non-empty line of a UTF-8 caption file (a byte-order mark is tolerated)."""
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise BadCaption(f"{path}: caption is not UTF-8 text (byte {exc.start}); re-save it as UTF-8") from None
    except OSError as exc:
        raise BadCaption(f"{path}: cannot read caption ({exc.strerror})") from None
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    return ""


def is_static(subset: SubsetSpec) -> bool:
    """True when the caption of every image is the same at every step (text outputs can be cached)."""
    return not (subset.shuffle_caption or subset.caption_dropout_rate > 0 or subset.caption_tag_dropout_rate > 0
                or subset.caption_dropout_every_n_epochs > 0)


def fixed_caption(caption: str, subset: SubsetSpec) -> str:
    """The caption without any random processing (prefix/suffix kept): for validation and caching."""
    calm = replace(subset, shuffle_caption=False, caption_dropout_rate=0.0, caption_tag_dropout_rate=0.0,
                   caption_dropout_every_n_epochs=0)
    return process_caption(caption, calm, 1, None)


def split_tags(text: str, sep: str) -> list[str]:
    """The non-empty, trimmed tags of a caption split on `sep` (taken as given)."""
    return [t.strip() for t in text.split(sep) if t.strip()]


def join_tags(tags: list[str], sep: str) -> str:
    """Tags joined with `sep`, followed by a space unless it ends with one ("a, b" for ",")."""
    return (sep if sep.endswith(" ") else sep + " ").join(tags)


def process_caption(caption: str, subset: SubsetSpec, epoch: int, rng: random.Random) -> str:
    """The caption as the text encoder sees it at this step. `epoch` counts from 1."""
    if subset.caption_prefix:
        caption = f"{subset.caption_prefix} {caption}" if caption else subset.caption_prefix
    if subset.caption_suffix:
        caption = f"{caption} {subset.caption_suffix}" if caption else subset.caption_suffix
    drop = subset.caption_dropout_rate > 0 and rng.random() < subset.caption_dropout_rate
    every = subset.caption_dropout_every_n_epochs
    if drop or (every > 0 and epoch % every == 0):
        return ""
    sep_keep = subset.keep_tokens_separator
    if not (subset.shuffle_caption or subset.caption_tag_dropout_rate > 0):
        return " ".join(caption.replace(sep_keep, " ").split()) if sep_keep and sep_keep in caption else caption
    sep = subset.caption_separator
    if sep_keep and sep_keep in caption:
        fixed_part, flex_part = caption.split(sep_keep, 1)
        fixed, flex = split_tags(fixed_part, sep), split_tags(flex_part.replace(sep_keep, sep), sep)
    else:
        tokens = split_tags(caption, sep)
        fixed, flex = tokens[:subset.keep_tokens], tokens[subset.keep_tokens:]
    if subset.shuffle_caption:
        rng.shuffle(flex)
    if subset.caption_tag_dropout_rate > 0:
        flex = [t for t in flex if rng.random() >= subset.caption_tag_dropout_rate]
    return join_tags(fixed + flex, sep)
