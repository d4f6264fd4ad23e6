#!/usr/bin/env python
"""Merge LoRAs into a checkpoint, or several LoRAs into one.

    python tools/merge_lora.py --model base.safetensors --lora a.safetensors:0.8 b.safetensors:0.5 --out merged.safetensors
    python tools/merge_lora.py --model sd15_folder --lora a.safetensors --out merged_folder
    python tools/merge_lora.py --lora a.safetensors:0.7 b.safetensors:0.3 --rank 32 --out ab.safetensors
    python tools/merge_lora.py --lora a.safetensors b.safetensors --concat --out ab.safetensors

With --model the weights W + multiplier * alpha/rank * up @ down (for DoRA, LoHa and LoKr files
the weight LyCORIS's formulas give, see docs/webui.md) are written into a copy of the model, in
its own format: a single-file .safetensors stays a single file (every other key kept
as it was), a diffusers folder stays a folder. Without --model the LoRAs become one LoRA: exactly
by concatenating ranks (--concat), or by SVD of the summed weight changes to --rank.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from library.utils.toolmain import command


def merge_into_single_file(model: Path, specs: list[str], out: Path, allow_partial: bool) -> None:
    from library.lora.specs import load_loras
    from safetensors import safe_open
    from safetensors.torch import load_file, save
    from tqdm.auto import tqdm

    from library.config.options import ModelOptions
    from library.errors import UserError
    from library.lora.apply import merge_into_original
    from library.lora.compat import plan_target
    from library.models.loader import plan_model
    from library.utils.atomic import atomic_write_bytes

    plan = plan_model(ModelOptions(pretrained_model_name_or_path=str(model)))
    loras = load_loras(specs, plan_target(plan, f"--model {model.name}"), allow_partial)
    with safe_open(str(model), "pt") as fh:
        metadata = fh.metadata() or {}
    state = load_file(str(model))
    total = sum(len(w.modules) for w, _ in loras)
    with tqdm(total=total, desc="merging") as bar:
        missing = merge_into_original(state, loras, plan.unet_config, bar.update)
    if missing:
        raise UserError(f"{model}: has no weight {missing[0]} (and {len(missing) - 1} more) that the LoRA changes; "
                        "is the LoRA for this architecture?")
    atomic_write_bytes(out, save(state, metadata=metadata))


def merge_into_folder(model: Path, specs: list[str], out: Path, allow_partial: bool) -> None:
    from library.lora.specs import load_loras
    from tqdm.auto import tqdm

    from library.config.options import ModelOptions
    from library.errors import UserError
    from library.lora.apply import merge_into_modules
    from library.lora.compat import plan_target
    from library.models.loader import load_models, plan_model

    plan = plan_model(ModelOptions(pretrained_model_name_or_path=str(model)))
    loras = load_loras(specs, plan_target(plan, f"--model {model.name}"), allow_partial)  # before the model loads
    bundle = load_models(ModelOptions(pretrained_model_name_or_path=str(model)), plan)
    components = {"unet": bundle.unet, **{f"te{i + 1}": te for i, te in enumerate(bundle.text_encoders)}}
    with tqdm(total=sum(len(w.modules) for w, _ in loras), desc="merging") as bar:
        missing = merge_into_modules(components, loras, bar.update)
    if missing:
        raise UserError(f"{model}: has no layer for {missing[0]} (and {len(missing) - 1} more)")
    tmp, old = out.with_name(f".{out.name}.tmp"), out.with_name(f".{out.name}.old")
    for leftover in (tmp, old):
        if leftover.exists():
            shutil.rmtree(leftover)
    shutil.copytree(model, tmp)
    bundle.unet.save_pretrained(str(tmp / "unet"), safe_serialization=True)
    for i, te in enumerate(bundle.text_encoders):
        te.save_pretrained(str(tmp / ("text_encoder" if i == 0 else "text_encoder_2")), safe_serialization=True)
    if out.exists():  # an earlier merged model: moved aside until the new one is in place
        out.rename(old)
    tmp.rename(out)
    if old.exists():
        shutil.rmtree(old)


def merge_loras_only(specs: list[str], out: Path, rank: int | None, concat: bool, allow_partial: bool) -> None:
    from library.lora.specs import load_loras
    from tqdm.auto import tqdm

    from library.lora.ops import merge_loras
    from library.lora.weights import save_kohya

    loras = load_loras(specs, allow_partial=allow_partial)
    for (weights, _), spec in zip(loras, specs):
        weights.require_plain_lora(spec, "merging LoRAs into one LoRA (without --model)")
    names = {n for w, _ in loras for n in w.modules}
    with tqdm(total=len(names), desc="merging") as bar:
        merged = merge_loras(loras, "concat" if concat else "svd", rank, bar.update)
    meta = {k: v for k, v in loras[0][0].metadata.items() if k.startswith(("ss_base_model_version", "ss_v2",
                                                                         "modelspec.architecture"))}
    meta["ss_network_module"] = "networks.lora"
    meta["ss_merged_from"] = ", ".join(specs)
    save_kohya(merged, out, meta)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="checkpoint: single-file .safetensors or diffusers folder")
    ap.add_argument("--lora", nargs="+", required=True, help="LoRA files, each optionally FILE:MULTIPLIER")
    ap.add_argument("--out", type=Path, required=True, help="output file (or folder for a diffusers model)")
    ap.add_argument("--rank", type=int, help="rank of the merged LoRA (without --model; default: largest input)")
    ap.add_argument("--concat", action="store_true", help="merge LoRAs exactly by concatenating their ranks")
    ap.add_argument("--allow_partial", action="store_true",
                    help="use a LoRA of which only some modules fit (the others are reported and left out)")
    args = ap.parse_args(argv)

    from library.errors import UserError
    from library.lora.specs import parse_lora
    from library.utils.writable import is_within, not_an_input, writable_dir, writable_file

    not_an_input(args.out, [args.model] + [parse_lora(spec)[0] for spec in args.lora], "--out")
    if args.model is not None:
        if not args.model.exists():
            raise UserError(f"--model {args.model}: no such file or folder")
        if args.model.is_dir():
            if args.out.exists() and not args.out.is_dir():
                raise UserError(f"--out {args.out}: is a file; a diffusers model is written as a folder")
            if is_within(args.out, args.model) or is_within(args.model, args.out):
                raise UserError(f"--out {args.out}: lies inside --model {args.model} or holds it; the merged model "
                                "replaces --out, so give a folder outside the model")
            if args.out.is_dir() and not (args.out / "model_index.json").is_file() and any(args.out.iterdir()):
                raise UserError(f"--out {args.out}: a folder that is not a diffusers model; the merged model replaces "
                                "--out, so give a new folder name (an earlier merged model may be replaced)")
            writable_dir(args.out.parent, "--out")
            merge_into_folder(args.model, args.lora, args.out, args.allow_partial)
        elif args.model.suffix.lower() == ".safetensors":
            if args.out.suffix.lower() != ".safetensors":
                raise UserError(f"--out {args.out}: a single-file model is written as .safetensors")
            writable_file(args.out, "--out")
            merge_into_single_file(args.model, args.lora, args.out, args.allow_partial)
        else:
            raise UserError(f"--model {args.model}: expected a .safetensors file or a diffusers folder")
    else:
        if args.concat and args.rank:
            raise UserError("--concat keeps every rank; it cannot be combined with --rank")
        writable_file(args.out, "--out")
        merge_loras_only(args.lora, args.out, args.rank, args.concat, args.allow_partial)
    print(f"wrote {args.out}")
    return 0


cli = command(main)  # the console command (pyproject.toml)

if __name__ == "__main__":
    sys.exit(cli())
