"""Caption files and kohya's caption processing (prefix/suffix, dropout, tag shuffle and dropout).

The processing follows kohya's order so users' settings mean the same thing here: whole-caption
dropout, then (with enable_wildcard) the line drawn and the wildcards filled, then prefix and suffix
(so with shuffling, a trigger-word prefix needs keep_tokens = 1 or a keep_tokens_separator), then
tag shuffle and tag dropout, then secondary separators become caption separators. The random
choices come from the `random.Random` passed in, seeded per epoch and sample by the caller, so a
resumed run sees the same captions.
"""
from __future__ import annotations

import random
import re
from dataclasses import replace
from pathlib import Path

from library.config.dataset import SubsetSpec


class BadCaption(Exception):
    """A caption file that cannot be read as UTF-8 text."""


def read_caption_file(path: Path, all_lines: bool = False) -> str:
    """First non-empty line of a UTF-8 caption file (a byte-order mark is tolerated); with `all_lines`
    every non-empty line, joined by newlines (enable_wildcard draws one of them each time)."""
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise BadCaption(f"{path}: caption is not UTF-8 text (byte {exc.start}); re-save it as UTF-8") from None
    except OSError as exc:
        raise BadCaption(f"{path}: cannot read caption ({exc.strerror})") from None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if all_lines:
        return "\n".join(lines)
    return lines[0] if lines else ""


def is_static(subset: SubsetSpec) -> bool:
    """True when the caption of every image is the same at every step (text outputs can be cached)."""
    return not (subset.shuffle_caption or subset.caption_dropout_rate > 0 or subset.caption_tag_dropout_rate > 0
                or subset.caption_dropout_every_n_epochs > 0 or subset.enable_wildcard)


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


_WILDCARD = re.compile(r"\{([^{}]+)\}")


def expand_wildcards(caption: str, rng: random.Random | None) -> str:
    """kohya's wildcards: one line of a multi-line caption, and one choice of each {a|b|c}; `{{` and
    `}}` stand for literal braces. Without an RNG (validation, the fixed caption) the first line and
    the first choices."""
    lines = caption.split("\n")
    caption = rng.choice(lines) if rng is not None and len(lines) > 1 else lines[0]
    # the escapes become characters no caption holds while the choices are made
    caption = caption.replace("{{", "\x00").replace("}}", "\x01")
    caption = _WILDCARD.sub(lambda m: (rng.choice(m[1].split("|")) if rng is not None else m[1].split("|")[0]),
                            caption)
    return caption.replace("\x00", "{").replace("\x01", "}")


def process_caption(caption: str, subset: SubsetSpec, epoch: int, rng: random.Random | None) -> str:
    """The caption as the text encoder sees it at this step. `epoch` counts from 1."""
    drop = subset.caption_dropout_rate > 0 and rng.random() < subset.caption_dropout_rate
    every = subset.caption_dropout_every_n_epochs
    if drop or (every > 0 and epoch % every == 0):
        return ""
    if subset.enable_wildcard:
        caption = expand_wildcards(caption, rng)
    # prefix and suffix go on the line drawn (kohya adds them before drawing, so its other lines of
    # a multi-line file get neither)
    if subset.caption_prefix:
        caption = f"{subset.caption_prefix} {caption}" if caption else subset.caption_prefix
    if subset.caption_suffix:
        caption = f"{caption} {subset.caption_suffix}" if caption else subset.caption_suffix
    sep_keep, sep, second = subset.keep_tokens_separator, subset.caption_separator, subset.secondary_separator
    if not (subset.shuffle_caption or subset.caption_tag_dropout_rate > 0):
        if sep_keep and sep_keep in caption:
            caption = " ".join(caption.replace(sep_keep, " ").split())
        return caption.replace(second, sep) if second else caption
    suffix: list[str] = []
    if sep_keep and sep_keep in caption:
        # "fixed ||| shuffled ||| fixed suffix": the part after a second separator stays at the end
        fixed_part, flex_part = caption.split(sep_keep, 1)
        if sep_keep in flex_part:
            flex_part, suffix_part = flex_part.split(sep_keep, 1)
            suffix = split_tags(suffix_part.replace(sep_keep, sep), sep)
        fixed, flex = split_tags(fixed_part, sep), split_tags(flex_part, sep)
    else:
        tokens = split_tags(caption, sep)
        fixed, flex = tokens[:subset.keep_tokens], tokens[subset.keep_tokens:]
    if subset.shuffle_caption:
        rng.shuffle(flex)
    if subset.caption_tag_dropout_rate > 0:
        flex = [t for t in flex if rng.random() >= subset.caption_tag_dropout_rate]
    joined = join_tags(fixed + flex + suffix, sep)
    return joined.replace(second, sep) if second else joined
