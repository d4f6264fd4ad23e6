#!/usr/bin/env python
"""Reduce the rank of a LoRA by SVD, keeping its scale (alpha / rank).

    python tools/resize_lora.py big.safetensors small.safetensors --rank 8
    python tools/resize_lora.py big.safetensors small.safetensors --dynamic sv_fro --param 0.9 [--rank 32]

--dynamic picks the rank per module: sv_ratio keeps singular values within a factor P of the
largest, sv_cumulative keeps those summing to a share P of the total, sv_fro keeps a share P of the
Frobenius norm; --rank then caps it. For every module the retained Frobenius share of its weight
change is printed (1.0 = exact).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from library.utils.toolmain import command


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("input", type=Path, help="LoRA .safetensors file")
    ap.add_argument("output", type=Path, help="where to write the resized LoRA")
    ap.add_argument("--rank", type=int, help="new rank (cap for --dynamic)")
    ap.add_argument("--dynamic", choices=["sv_ratio", "sv_fro", "sv_cumulative"], help="per-module rank rule")
    ap.add_argument("--param", type=float, help="parameter of the --dynamic rule")
    ap.add_argument("--save_precision", choices=["keep", "float", "fp16", "bf16"], default="keep")
    ap.add_argument("--quiet", action="store_true", help="do not print the per-module table")
    ap.add_argument("--allow_partial", action="store_true",
                    help="use a LoRA of which only some modules fit (the others are reported and left out)")
    args = ap.parse_args(argv)

    from tqdm.auto import tqdm

    from library.errors import UserError
    from library.lora.compat import read_checked
    from library.lora.kohya_file import SAVE_DTYPES
    from library.lora.ops import resize
    from library.lora.weights import save_kohya
    from library.utils.writable import not_an_input, writable_file

    if args.rank is None and args.dynamic is None:
        raise UserError("give --rank R, or --dynamic sv_ratio|sv_fro|sv_cumulative with --param P")
    if args.rank is not None and args.rank < 1:
        raise UserError(f"--rank: expected at least 1, got {args.rank}")
    if args.dynamic and args.param is None:
        raise UserError(f"--dynamic {args.dynamic} needs --param")
    if args.dynamic in ("sv_fro", "sv_cumulative") and not 0 < args.param <= 1:
        raise UserError(f"--param: {args.dynamic} takes a share between 0 and 1, got {args.param}")
    if args.dynamic == "sv_ratio" and args.param < 1:
        raise UserError(f"--param: sv_ratio takes a ratio of at least 1, got {args.param}")
    not_an_input(args.output, [args.input], "output")
    writable_file(args.output, "output")
    weights, _ = read_checked(args.input, allow_partial=args.allow_partial)
    weights.require_plain_lora(str(args.input), "resize_lora")
    with tqdm(total=len(weights.modules), desc="resizing", disable=args.quiet) as bar:
        resized, report = resize(weights, args.rank, args.dynamic, args.param, bar.update)
    if not args.quiet:
        print(f"{'module':90s} rank      retained")
        for name, (old, new, share) in sorted(report.items()):
            print(f"{name:90s} {old:3d}->{new:<4d} {share:.4f}")
    shares = [share for _, _, share in report.values()]
    print(f"mean retained Frobenius share {sum(shares) / len(shares):.4f}, minimum {min(shares):.4f}")
    meta = dict(weights.metadata)
    ranks = sorted({new for _, new, _ in report.values()})
    meta["ss_network_dim"] = str(ranks[-1])
    meta["ss_network_alpha"] = "resized (per-module alpha keeps the original scale)"
    meta["ss_resized_from"] = str(args.input.name)
    dtype = None if args.save_precision == "keep" else SAVE_DTYPES[args.save_precision]
    save_kohya(resized, args.output, meta, dtype)
    print(f"wrote {args.output}")
    return 0


cli = command(main)  # the console command (pyproject.toml)

if __name__ == "__main__":
    sys.exit(cli())
