#!/usr/bin/env python
"""Convert a LoRA between kohya's layout (WebUIs) and the PEFT/diffusers layout.

DoRA, LoHa and LoKr files (LyCORIS's layout) convert --to kohya only (renaming, dtype).

    python tools/convert_lora.py my_lora.safetensors my_lora_peft.safetensors --to diffusers
    python tools/convert_lora.py other.safetensors fixed.safetensors --to kohya

Alpha is preserved exactly (in PEFT files as `lora_adapter_metadata`, which diffusers reads).
Converting to kohya also renames SDXL UNet modules written with diffusers paths to the SGM names
every WebUI maps correctly, and adds alpha to files that lack it (alpha = rank, as loaders assume).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from library.utils.toolmain import command

PRECISIONS = {"keep": None, "float": "float", "fp16": "fp16", "bf16": "bf16"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("input", type=Path, help="LoRA .safetensors file (kohya or PEFT/diffusers layout)")
    ap.add_argument("output", type=Path, help="where to write the converted file")
    ap.add_argument("--to", choices=["kohya", "diffusers"], required=True, help="target layout")
    ap.add_argument("--save_precision", choices=list(PRECISIONS), default="keep", help="dtype of the output")
    ap.add_argument("--allow_partial", action="store_true",
                    help="use a LoRA of which only some modules fit (the others are reported and left out)")
    args = ap.parse_args(argv)

    from library.lora.compat import read_checked
    from library.lora.kohya_file import SAVE_DTYPES
    from library.lora.weights import save_kohya, save_peft
    from library.utils.writable import not_an_input, writable_file

    not_an_input(args.output, [args.input], "output")
    writable_file(args.output, "output")
    weights, _ = read_checked(args.input, allow_partial=args.allow_partial)
    if args.to == "diffusers":
        weights.require_plain_lora(str(args.input), "--to diffusers (the PEFT layout)")
    dtype = SAVE_DTYPES.get(PRECISIONS[args.save_precision]) if PRECISIONS[args.save_precision] else None
    if args.to == "kohya":
        save_kohya(weights, args.output, dtype=dtype)
    else:
        save_peft(weights, args.output, dtype=dtype)
    print(f"wrote {args.output}: {len(weights.modules)} {weights.arch} modules in {args.to} layout")
    return 0


cli = command(main)  # the console command (pyproject.toml)

if __name__ == "__main__":
    sys.exit(cli())
