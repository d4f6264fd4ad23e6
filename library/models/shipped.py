"""The configuration trees and tokenizer files that ship with the project.

Loading a single-file checkpoint needs the diffusers configs of every component and the CLIP
tokenizer; diffusers would fetch them from the hub. They live in `library/models/configs/`:
one diffusers-layout tree per architecture (configs only) and one copy of the CLIP BPE
vocabulary (`clip_bpe/`, built by tools/build_clip_vocab.py), shared by every tokenizer.
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from library.errors import UserError

CONFIG_ROOT = Path(__file__).resolve().parent / "configs"
CLIP_BPE = CONFIG_ROOT / "clip_bpe"

# Shipped trees by name -> the architecture family they belong to.
SHIPPED_TREES = {"sd15": "sd1", "sd2": "sd2", "sdxl": "sdxl", "tiny_sd15": "sd1", "tiny_sdxl": "sdxl"}
TOKENIZER_FILES = ("vocab.json", "merges.txt")


def tree(name: str) -> Path:
    if name not in SHIPPED_TREES:
        raise UserError(f"unknown shipped model config {name!r}; valid: {', '.join(SHIPPED_TREES)}")
    return CONFIG_ROOT / name


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: missing (a diffusers model folder needs this config file)") from None
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: not valid JSON ({exc})") from None


@lru_cache(maxsize=None)
def _bpe() -> tuple[dict, tuple]:
    vocab = json.loads((CLIP_BPE / "vocab.json").read_text(encoding="utf-8"))
    merges = tuple(tuple(line.split()) for line in (CLIP_BPE / "merges.txt").read_text(encoding="utf-8").split("\n")[1:] if line)
    return vocab, merges


def load_tokenizer(folder: Path):
    """A CLIPTokenizer for `folder`: its own vocab files if it has them, else the shipped ones."""
    from transformers import CLIPTokenizer

    if all((folder / f).is_file() for f in TOKENIZER_FILES):
        tok = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    else:
        settings = read_json(folder / "tokenizer_config.json")
        kwargs = {k: settings[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token") if k in settings}
        vocab, merges = _bpe()
        # CLIPTokenizer(vocab_file=..., merges_file=...) silently builds a 2-token vocabulary in
        # transformers 5; passing the parsed vocabulary is the reliable path.
        tok = CLIPTokenizer(vocab=dict(vocab), merges=list(merges), **kwargs)
    # Without an explicit limit StableDiffusionPipeline fails ("int too big to convert").
    tok.model_max_length = 77
    return tok


def copy_tokenizer_files(dest: Path) -> None:
    """Put the shipped vocabulary into a tokenizer folder so that plain diffusers can load it."""
    for name in TOKENIZER_FILES:
        (dest / name).write_bytes((CLIP_BPE / name).read_bytes())
