#!/usr/bin/env python
"""Show what a LoRA file holds and whether AUTOMATIC1111/Forge, ComfyUI and diffusers load it.

    python tools/inspect_lora.py my_lora.safetensors
    python tools/inspect_lora.py my_lora.safetensors --json

Prints the architecture, the key layout, the module count per prefix, ranks, alphas, dtypes, the
metadata, and for each loader a verdict with reasons. diffusers' own key converter is run as an
independent check (skip it with --no_diffusers_check).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from library.utils.toolmain import command

LONG_METADATA = ("ss_tag_frequency", "ss_datasets", "ss_bucket_info", "lora_adapter_metadata")


def print_report(rep: dict, all_metadata: bool) -> None:
    print(f"file:          {rep['file']}")
    print(f"architecture:  {rep['architecture'] or 'unknown'} (ss_base_model_version: {rep['base_model_version']})")
    print(f"layout:        {rep['layout']}, UNet names: {rep['unet_naming']}")
    print(f"network:       {rep['network_type'] or 'unknown'}")
    print(f"fits:          {rep['fits']}")
    print(f"modules:       {rep['modules']} ({rep['tensors']} tensors)")
    for prefix, n in rep["modules_per_prefix"].items():
        print(f"  {prefix:14s} {n}")
    print(f"ranks:         {', '.join(f'{r} ({n} modules)' for r, n in rep['ranks'].items())}")
    print(f"alphas:        {', '.join(f'{a} ({n} modules)' for a, n in rep['alphas'].items())}")
    print(f"dtypes:        {', '.join(f'{d} ({n})' for d, n in rep['dtypes'].items())}")
    if rep["unknown_tensors"]:
        print(f"unknown:       {len(rep['unknown_tensors'])} tensors, e.g. {rep['unknown_tensors'][0]}")
    if rep["non_finite_tensors"]:
        print(f"NaN/inf:       {len(rep['non_finite_tensors'])} tensors hold NaN or infinite values, e.g. "
              f"{rep['non_finite_tensors'][0]}: this LoRA breaks every image it touches")
    print("compatibility:")
    for loader, label in (("a1111", "AUTOMATIC1111/Forge"), ("comfyui", "ComfyUI"), ("diffusers", "diffusers")):
        v = rep["compatibility"][loader]
        print(f"  {label:20s} {'loads' if v['loads'] else 'DOES NOT LOAD fully'}")
        for reason in v["problems"]:
            print(f"      - {reason}")
        for note in v["notes"]:
            print(f"      note: {note}")
    print("metadata:")
    for key, value in rep["metadata"].items():
        if key in LONG_METADATA and not all_metadata and len(value) > 120:
            value = value[:117] + "..."
        print(f"  {key} = {value}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("file", type=Path, help="LoRA .safetensors file")
    ap.add_argument("--json", action="store_true", help="print the report as JSON")
    ap.add_argument("--all_metadata", action="store_true", help="do not shorten long metadata values")
    ap.add_argument("--no_diffusers_check", action="store_true", help="skip running diffusers' key converter")
    args = ap.parse_args(argv)

    from library.lora.inspect import inspect_file
    from library.lora.kohya_file import read_lora

    tensors, metadata = read_lora(args.file, allow_non_finite=True)  # reported, not refused: this is the inspector
    rep = inspect_file(tensors, metadata, str(args.file), check_diffusers=not args.no_diffusers_check)
    if args.json:
        print(json.dumps(rep, indent=2))
    else:
        print_report(rep, args.all_metadata)
    return 0


cli = command(main)  # the console command (pyproject.toml)

if __name__ == "__main__":
    sys.exit(cli())
