#!/usr/bin/env python
"""Build the CLIP BPE tokenizer files (vocab.json + merges.txt) shipped in library/models/configs/clip_bpe.

The vocabulary of OpenAI's CLIP tokenizer is published inside the `open_clip_torch` wheel on PyPI
(MIT licence) as `open_clip/bpe_simple_vocab_16e6.txt.gz`. This tool turns that file into the two
files transformers' CLIPTokenizer reads, so no model hub is ever needed:

    pip download --no-deps open_clip_torch -d /tmp/oc
    python tools/build_clip_vocab.py /tmp/oc/open_clip_torch-*.whl   # or the extracted .txt.gz

The result is byte-identical on every run; the trainer only reads the committed files.
"""
from __future__ import annotations

import argparse
import gzip
import io
import json
import sys
import zipfile
from pathlib import Path

from library.utils.atomic import atomic_write_text

ROOT = Path(__file__).resolve().parents[1]

# CLIP keeps the first 49152 - 256 - 2 merge rules: 256 byte tokens + their '</w>' twins + merges
# + 2 special tokens make the 49408-token vocabulary.
N_MERGES = 49152 - 256 - 2
DEFAULT_OUT = ROOT / "library" / "models" / "configs" / "clip_bpe"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP reversible byte -> printable unicode map (the order defines the first 256 ids)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def read_bpe_text(source: Path) -> str:
    if source.suffix == ".whl":
        with zipfile.ZipFile(source) as whl:
            raw = whl.read("open_clip/bpe_simple_vocab_16e6.txt.gz")
        return gzip.decompress(raw).decode("utf-8")
    with gzip.open(source) if source.suffix == ".gz" else io.open(source, "rb") as fh:
        return fh.read().decode("utf-8")


def build(text: str) -> tuple[dict[str, int], list[str]]:
    lines = text.split("\n")[1 : N_MERGES + 1]
    merges = [tuple(line.split()) for line in lines]
    tokens = list(bytes_to_unicode().values())
    tokens += [t + "</w>" for t in tokens]
    tokens += ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, [" ".join(m) for m in merges]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source", type=Path, help="open_clip_torch wheel, bpe_simple_vocab_16e6.txt.gz or its text")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: %(default)s)")
    args = ap.parse_args(argv)
    if not args.source.is_file():
        print(f"error: {args.source}: no such file (expected an open_clip_torch wheel or bpe_simple_vocab_16e6.txt.gz)", file=sys.stderr)
        return 2
    vocab, merges = build(read_bpe_text(args.source))
    if len(vocab) != 49408:
        print(f"error: {args.source}: built {len(vocab)} tokens, expected 49408; is this the CLIP BPE file?", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "vocab.json", json.dumps(vocab, ensure_ascii=False, separators=(",", ":")))
    atomic_write_text(args.out / "merges.txt", "#version: 0.2\n" + "\n".join(merges) + "\n")
    print(f"wrote {len(vocab)} tokens and {len(merges)} merges to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
