#!/usr/bin/env python
"""Generate images with a model and one or more LoRA files, offline, as the trainer's samples do.

    python tools/sample_lora.py --model demo/base_model --lora output/demo/demo_lora.safetensors \\
        --prompts demo/prompts.txt --out output/demo/check --compare_base
    python tools/sample_lora.py --model sd15.safetensors --lora a.safetensors:0.8 b.safetensors:0.4 \\
        --prompts "a photo of sks dog on a beach --d 42 --s 30" --out samples

--prompts is a prompt file in the trainer's formats (kohya text lines, TOML or JSON, with the same
per-prompt options: --n --w --h --s --l --d --ss) or a single prompt line. Any LoRA the reader
understands works: kohya files (both SDXL naming styles), PEFT/diffusers files, files without
alpha; each is merged into the loaded model with its multiplier. --compare_base also writes the
base model's image for the same seed beside each one, and a grid with both columns.
"""
from __future__ import annotations

import argparse
import sys
from contextlib import nullcontext
from pathlib import Path

from library.utils.toolmain import command


def read_prompts(value: str):
    from library.errors import UserError
    from library.train.prompts import load_prompts, parse_line

    path = Path(value)
    try:
        is_dir, is_file = path.is_dir(), path.is_file()
    except OSError:  # a long prompt is no valid file name ("File name too long")
        is_dir = is_file = False
    if is_dir:
        raise UserError(f"--prompts {value}: is a folder; give a prompt file (.txt/.toml/.json) or a prompt in quotes")
    if is_file:
        return load_prompts(path)
    if path.suffix.lower() in (".txt", ".toml", ".json"):
        raise UserError(f"--prompts {value}: no such file (give a prompt file, or a prompt in quotes)")
    return [parse_line(value, "--prompts")]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True, help="checkpoint: single-file .safetensors or diffusers folder")
    ap.add_argument("--lora", nargs="+", required=True, help="LoRA files, each optionally FILE:MULTIPLIER")
    ap.add_argument("--prompts", required=True, help="prompt file (.txt/.toml/.json) or one prompt line")
    ap.add_argument("--out", type=Path, required=True, help="folder for the images and the grid")
    ap.add_argument("--name", help="file name prefix (default: the first LoRA's file name)")
    ap.add_argument("--sampler", default="euler_a", help="default sampler: euler_a, euler, ddim, dpm++_2m, "
                                                          "dpm++_2m_karras (a prompt's --ss wins)")
    ap.add_argument("--size", type=int, nargs="+", metavar="PX",
                    help="default width [height] (default: the model's native resolution; a prompt's --w/--h win)")
    ap.add_argument("--seed", type=int, default=0, help="seed of prompt i without --d is seed + i")
    ap.add_argument("--compare_base", action="store_true", help="also the base model's image for each seed")
    ap.add_argument("--vae", help="a separate VAE file or folder")
    ap.add_argument("--max_token_length", type=int, choices=[75, 150, 225], default=225,
                    help="prompt length in tokens, encoded in 75-token chunks as the trainer encodes captions "
                         "with the same option (default 225; 75 = one CLIP window, what the pipelines read)")
    ap.add_argument("--clip_skip", type=int, default=1, help="use the text encoder's n-th last layer, as in "
                    "training with clip_skip (SD1.x LoRAs trained with clip_skip = 2)")
    ap.add_argument("--v_parameterization", action="store_true", help="the model predicts v (SD2.x 768-v)")
    ap.add_argument("--allow_partial", action="store_true",
                    help="use a LoRA of which only some modules fit the model (the others are reported and left out)")
    ap.add_argument("--precision", choices=["auto", "fp32", "fp16", "bf16"], default="auto",
                    help="auto: bf16 on GPUs with native bf16, fp16 on older GPUs, fp32 on the CPU")
    ap.add_argument("--no_half_vae", action="store_true",
                    help="keep the VAE in fp32 (always so for the SDXL VAE under fp16, which overflows)")
    args = ap.parse_args(argv)

    from library.errors import UserError
    from library.utils.writable import writable_dir

    if not args.model.exists():
        raise UserError(f"--model {args.model}: no such file or folder")
    writable_dir(args.out, "--out")
    from library.train.prompts import normalise_sampler

    sampler_name = normalise_sampler(args.sampler, "--sampler")
    prompts = read_prompts(args.prompts)
    if args.size is not None and len(args.size) not in (1, 2):
        raise UserError("--size: give WIDTH or WIDTH HEIGHT")

    import torch
    from tqdm.auto import tqdm

    from library.config.options import ModelOptions
    from library.lora.apply import MergedLoras
    from library.lora.compat import plan_target
    from library.lora.specs import load_loras, parse_lora
    from library.models.loader import load_models, plan_model
    from library.train.sampling import Sampler
    from library.train.setup import DTYPES, resolve_precision, vae_dtype

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    flag = "no" if args.precision == "fp32" else args.precision
    precision = resolve_precision(flag, device.type == "cpu", "--precision", full="fp32")
    opts = ModelOptions(pretrained_model_name_or_path=str(args.model), vae=args.vae,
                        v_parameterization=args.v_parameterization)
    plan = plan_model(opts)
    loras = load_loras(args.lora, plan_target(plan, f"--model {args.model.name}"), args.allow_partial)
    bundle = load_models(opts, plan)
    components = {"unet": bundle.unet, **{f"te{i + 1}": te for i, te in enumerate(bundle.text_encoders)}}
    # Merged on the CPU in fp32 (the loaded models' dtype), then moved once in the run's dtype: an
    # fp32 SDXL on the GPU before halving would need about twice the memory. Only --compare_base
    # keeps the base weights, once, in the run's dtype.
    with tqdm(total=sum(len(w.modules) for w, _ in loras), desc="merging") as bar:
        merged = MergedLoras(components, loras, bar.update, switchable=args.compare_base,
                             store_dtype=DTYPES[precision])
    if merged.missing:
        raise UserError(f"{args.model}: has no layer for {merged.missing[0]} (and {len(merged.missing) - 1} more) "
                        "that the LoRA changes; is the LoRA for this architecture?")
    for module in [bundle.unet, *bundle.text_encoders]:
        module.to(device=device, dtype=DTYPES[precision]).eval()
    # The sampler decodes in the VAE's own dtype, so an fp32 VAE beside a half-precision UNet works.
    bundle.vae.to(device=device, dtype=vae_dtype(args.no_half_vae or None, bundle.family.vae_overflows_in_fp16, precision)).eval()
    size = bundle.native_resolution
    default_size = (args.size[0], args.size[-1]) if args.size else (size, size)
    name = args.name or parse_lora(args.lora[0])[0].stem
    text = bundle.family.caption_encoder(bundle.tokenizers, bundle.text_encoders, args.clip_skip,
                                         args.max_token_length)
    sampler = Sampler(prompts, args.out, name, default_size, sampler_name, args.seed, bundle.v_parameterization,
                      False, text=text, compare_base=args.compare_base)
    results = sampler.run(bundle, bundle.unet, device, None, nullcontext,
                          merged.set_enabled if args.compare_base else None)
    print(f"wrote {len(results) - 1} images and {results[-1][0]} to {args.out}")
    return 0


cli = command(main)  # the console command (pyproject.toml)

if __name__ == "__main__":
    sys.exit(cli())
