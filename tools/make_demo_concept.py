#!/usr/bin/env python
"""Write the demo's second concept, the "sks heart" (a heart with a fixed round mark), as shipped in
demo/concept_heart/: five 64 px images with captions, rendered by the world generator from
library.demo.concepts.heart_training_scenes() (deterministic: the same files every time).

    python tools/make_demo_concept.py                       # writes demo/concept_heart/
    python tools/make_demo_concept.py --out /tmp/heart      # elsewhere
"""
from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

from library.utils.toolmain import command


def main(argv: list[str] | None = None) -> int:
    from library.demo.concepts import CONCEPTS, heart_training_scenes
    from library.demo.world import render
    from library.utils.atomic import atomic_write_bytes, atomic_write_text

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=CONCEPTS["heart"].folder)
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for n, scene in enumerate(heart_training_scenes()):
        buf = io.BytesIO()
        render(scene).save(buf, format="PNG")
        atomic_write_bytes(args.out / f"sks_{n:02d}.png", buf.getvalue())
        atomic_write_text(args.out / f"sks_{n:02d}.txt", scene.caption() + "\n")
        print(f"{args.out / f'sks_{n:02d}.png'}: {scene.caption()}")
    return 0


cli = command(main)

if __name__ == "__main__":
    sys.exit(cli())
