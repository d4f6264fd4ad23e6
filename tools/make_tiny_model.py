#!/usr/bin/env python
"""Write a tiny random-weight SD1.5- or SDXL-architecture model for smoke tests.

    python tools/make_tiny_model.py --arch sd1 --out models/tiny-sd15
    python tools/make_tiny_model.py --arch sdxl --out models/tiny-sdxl --single_file models/tiny-sdxl.safetensors

The diffusers folder loads with `StableDiffusionPipeline.from_pretrained` (or the XL pipeline);
the optional single file is in the original (A1111/ComfyUI) layout and loads with the trainer and
with diffusers' `from_single_file(..., config="library/models/configs/tiny_sd15")`. The block
structure is the real architecture's at tiny widths, so every code path of the trainer runs.
Nothing is downloaded; the same --seed always gives the same weights.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    from library.utils.runtime import offline_and_quiet

    offline_and_quiet()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", choices=["sd1", "sdxl"], required=True, help="model family to imitate")
    ap.add_argument("--out", type=Path, required=True, help="diffusers folder to write")
    ap.add_argument("--single_file", type=Path, help="also write an original-format .safetensors file here")
    ap.add_argument("--seed", type=int, default=0, help="weight initialisation seed (default 0)")
    args = ap.parse_args(argv)
    if args.single_file is not None and args.single_file.suffix != ".safetensors":
        print(f"error: --single_file {args.single_file}: must end in .safetensors", file=sys.stderr)
        return 2

    from safetensors.torch import save

    from library.models.families import to_original_state_dict
    from library.models.tiny import build_tiny_pipeline, save_diffusers
    from library.utils.atomic import atomic_write_bytes

    pipe = build_tiny_pipeline(args.arch, seed=args.seed)
    save_diffusers(pipe, args.out)
    print(f"wrote diffusers folder {args.out}")
    if args.single_file is not None:
        encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if hasattr(pipe, "text_encoder_2") else [])
        state = to_original_state_dict(args.arch, pipe.unet, pipe.vae, encoders)
        atomic_write_bytes(args.single_file, save(state, metadata={"format": "pt"}))
        print(f"wrote single file {args.single_file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
