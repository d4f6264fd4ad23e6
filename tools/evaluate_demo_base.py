#!/usr/bin/env python
"""Check that the demo base model follows prompts: generate the (shape, colour) combinations it
never saw in training, on random backgrounds, and let the toy-world classifier read them.

    python tools/evaluate_demo_base.py                    # demo/base_model, 5 prompts per pair
    python tools/evaluate_demo_base.py --cfg 4 6 8 --per_pair 10 --grid runs/held_out.png

Prints the share of images whose shape, shape colour and background colour match the prompt
(the bar for the shipped model: shape and colour >= 0.80), per CFG scale, as read by the classifier
and by the hand-written descriptor of library/demo/descriptors.py (which the efficacy bench uses),
and how often the two readings agree.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from library.utils.toolmain import command


def main(argv: list[str] | None = None) -> int:
    from library.demo.models import BASE_MODEL

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=BASE_MODEL)
    ap.add_argument("--per_pair", type=int, default=5, help="prompts per held-out (shape, colour) pair")
    ap.add_argument("--cfg", type=float, nargs="+", default=[5.0])
    ap.add_argument("--steps", type=int, default=25, help="DDIM steps")
    ap.add_argument("--grid", type=Path, help="also save the generated images as a grid")
    args = ap.parse_args(argv)

    from library.utils.runtime import offline_and_quiet

    offline_and_quiet()
    from library.config.options import ModelOptions
    from library.demo.descriptors import describe_all
    from library.demo.evaluate import accuracy, generate, held_out_prompts, pipeline, score
    from library.demo.models import load_classifier
    from library.models.loader import load_models

    bundle = load_models(ModelOptions(pretrained_model_name_or_path=str(args.model)))
    classifier = load_classifier()
    items = held_out_prompts(args.per_pair)
    scenes = [s for s, _ in items]
    pipe = pipeline(bundle)
    print(f"{len(items)} prompts of held-out pairs, DDIM {args.steps} steps")
    for cfg in args.cfg:
        images = generate(pipe, [(s.caption(), seed) for s, seed in items], steps=args.steps, scale=cfg)
        acc = accuracy(score(classifier, images), scenes)
        print(f"CFG {cfg:g}: shape {acc['shape']:.3f}, colour {acc['colour']:.3f}, background {acc['background']:.3f}")
        read = describe_all(images)
        heads = ("shape", "colour", "background", "pattern", "size")
        by_hand = {h: sum(getattr(d, h) == getattr(s, h) for d, s in zip(read, scenes)) / len(scenes) for h in heads}
        print(f"CFG {cfg:g}, descriptor: " + ", ".join(f"{h} {v:.3f}" for h, v in by_hand.items()))
        predictions = score(classifier, images).predictions
        agree = {h: sum(getattr(d, h) == p for d, p in zip(read, predictions[h])) / len(read) for h in heads}
        print(f"CFG {cfg:g}, descriptor = classifier: " + ", ".join(f"{h} {v:.3f}" for h, v in agree.items()))
        if args.grid:
            from library.train.sampling import grid
            from library.utils.atomic import atomic_path

            with atomic_path(args.grid.with_name(f"{args.grid.stem}_cfg{cfg:g}{args.grid.suffix}")) as tmp:
                grid(images, columns=args.per_pair).save(tmp, format="PNG")
    return 0


cli = command(main)  # the console command (pyproject.toml)

if __name__ == "__main__":
    sys.exit(cli())
