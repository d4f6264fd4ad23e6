#!/usr/bin/env python
"""Extract a LoRA from the difference between two checkpoints (a fine-tune and its base).

    python tools/extract_lora.py --base sd15.safetensors --tuned my_finetune.safetensors --rank 32 --out lora.safetensors

Each targeted layer's weight difference is factorised by SVD to --rank (and --conv_rank for 3x3
convolutions, which are skipped without it). Text-encoder layers are included when the text
encoders differ; layers whose difference is below --min_diff are left out. The per-module retained
Frobenius share is summarised at the end.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from library.utils.toolmain import command


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", type=Path, required=True, help="base model (single file or diffusers folder)")
    ap.add_argument("--tuned", type=Path, required=True, help="fine-tuned model of the same architecture")
    ap.add_argument("--rank", type=int, required=True, help="LoRA rank of linear and 1x1 layers")
    ap.add_argument("--conv_rank", type=int, help="also extract 3x3 convolutions with this rank")
    ap.add_argument("--out", type=Path, required=True, help="output LoRA .safetensors")
    ap.add_argument("--min_diff", type=float, default=1e-6,
                    help="skip layers whose largest absolute weight difference is below this (default 1e-6)")
    ap.add_argument("--save_precision", choices=["float", "fp16", "bf16"], default="fp16")
    ap.add_argument("--network_type", default="lora", help="only lora: an SVD of each layer's difference")
    args = ap.parse_args(argv)

    import torch
    from tqdm.auto import tqdm

    from library.config.options import ModelOptions
    from library.errors import UserError
    from library.lora.apply import module_of
    from library.lora.compat import arch_name
    from library.lora.index import NameIndex
    from library.lora.kohya_file import SAVE_DTYPES
    from library.lora.ops import factorise
    from library.lora.weights import LoraWeights, save_kohya
    from library.models.loader import load_models, plan_model
    from library.utils.writable import not_an_input, writable_file

    if args.network_type != "lora":
        raise UserError(f"--network_type {args.network_type}: extract_lora handles plain LoRA only (DoRA, LoHa and "
                        "LoKr cannot be fitted by an SVD of the weight difference)")
    if args.rank < 1 or (args.conv_rank is not None and args.conv_rank < 1):
        raise UserError("--rank and --conv_rank must be at least 1")
    not_an_input(args.out, [args.base, args.tuned], "--out")
    writable_file(args.out, "--out")
    # Both architectures are compared from configs and headers before either model loads.
    plans = [plan_model(ModelOptions(pretrained_model_name_or_path=str(p))) for p in (args.base, args.tuned)]
    if plans[0].arch != plans[1].arch or plans[0].unet_config != plans[1].unet_config:
        raise UserError(f"--tuned {args.tuned} is {arch_name(plans[1].arch)} but --base {args.base} is "
                        f"{arch_name(plans[0].arch)}" + (" of another size" if plans[0].arch == plans[1].arch else ""))
    base, tuned = (load_models(ModelOptions(pretrained_model_name_or_path=str(plan.path)), plan) for plan in plans)
    index = NameIndex.for_model(base)
    parts = {"unet": (base.unet, tuned.unet)}
    for i, (a, b) in enumerate(zip(base.text_encoders, tuned.text_encoders)):
        parts[f"te{i + 1}"] = (a, b)
    modules, shares = {}, []
    targets = [t for t in index.targets.values() if not t.conv3x3 or args.conv_rank]
    with torch.no_grad(), tqdm(total=len(targets), desc="extracting") as bar:
        for target in targets:
            bar.update(1)
            a, b = (module_of(m, target.path) for m in parts[target.component])
            if a is None or b is None or a.weight.shape != b.weight.shape:
                raise UserError(f"{target.name}: the two models differ in architecture at this layer")
            delta = b.weight.float() - a.weight.float()
            if delta.abs().max() < args.min_diff:
                continue
            conv = a.weight.shape[1:] if a.weight.ndim == 4 else None
            rank = args.conv_rank if target.conv3x3 else args.rank
            found = factorise(delta, 1.0, rank, conv=conv)
            modules[target.name] = found.module
            shares.append(found.retained)
    if not modules:
        raise UserError("the two models are identical (no layer differs by --min_diff); nothing to extract")
    meta = {"ss_base_model_version": base.base_model_version, "ss_network_module": "networks.lora",
            "ss_network_dim": str(args.rank), "ss_network_alpha": str(float(args.rank)),
            "ss_network_args": "{}" if args.conv_rank is None else f'{{"conv_dim": "{args.conv_rank}"}}',
            "ss_extracted_from": f"{args.tuned.name} - {args.base.name}"}
    save_kohya(LoraWeights(index, modules, meta), args.out, meta, SAVE_DTYPES[args.save_precision])
    te = sum(1 for n in modules if n.startswith("lora_te"))
    print(f"wrote {args.out}: {len(modules)} modules ({te} in text encoders); retained Frobenius share "
          f"mean {sum(shares) / len(shares):.4f}, minimum {min(shares):.4f}")
    return 0


cli = command(main)  # the console command (pyproject.toml)

if __name__ == "__main__":
    sys.exit(cli())
