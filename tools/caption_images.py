#!/usr/bin/env python
"""Write a natural-language caption next to every image, with an image-to-text model on disk.

    python tools/caption_images.py data/subject --model models/blip-large --prefix "sks dog, "
    python tools/caption_images.py data --model models/git-base --recursive --num_beams 3 --dry_run

--model is a folder saved by transformers (`save_pretrained`), holding the model's config.json,
its weights (model.safetensors) and its processor files (preprocessor_config.json, tokenizer
files). BLIP, BLIP-2, GIT and other models that transformers' AutoModelForImageTextToText loads
work. Nothing is downloaded: get the folder once, e.g. with `huggingface-cli download
Salesforce/blip-image-captioning-large --local-dir models/blip-large` on a connected machine.

Existing captions are kept unless --overwrite; unreadable images are reported and skipped;
captions are written atomically as UTF-8.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from library.utils.toolmain import command

LAYOUT = ("config.json, the weights (model.safetensors), the processor settings (processor_config.json or "
          "preprocessor_config.json) and the tokenizer files, as written by save_pretrained")


def check_model_folder(folder: Path) -> None:
    from library.errors import UserError

    if not folder.is_dir():
        raise UserError(f"--model {folder}: no such folder; expected a transformers model folder with {LAYOUT}")
    missing = []
    if not (folder / "config.json").is_file():
        missing.append("config.json")
    if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
        missing.append("model.safetensors")
    if not (folder / "processor_config.json").is_file() and not (folder / "preprocessor_config.json").is_file():
        missing.append("processor_config.json")
    if missing:
        raise UserError(f"--model {folder}: missing {', '.join(missing)}; the folder must hold {LAYOUT}")


def resolve_device(name: str):
    import torch

    from library.errors import UserError

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is available; use --device cpu")
    return torch.device(name)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", type=Path, help="folder of images")
    ap.add_argument("--model", type=Path, required=True, help="transformers image-to-text model folder")
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    ap.add_argument("--max_length", type=int, default=75, help="longest caption in tokens")
    ap.add_argument("--num_beams", type=int, default=1, help="beam search width (1 = greedy)")
    ap.add_argument("--prefix", default="", help="text put before every caption (e.g. a trigger word)")
    ap.add_argument("--suffix", default="", help="text put after every caption")
    from library.data.labelling import add_output_args

    add_output_args(ap, "caption")
    args = ap.parse_args(argv)

    from tqdm.auto import tqdm

    from library.data.labelling import BatchLoader, select_images
    from library.errors import UserError
    from library.utils.atomic import atomic_write_text

    images, todo = select_images(args.folder, args.recursive, args.extension, args.overwrite)
    check_model_folder(args.model)
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    device = resolve_device(args.device)
    dtype = getattr(torch, args.dtype)
    try:
        processor = AutoProcessor.from_pretrained(str(args.model), local_files_only=True)
        model = AutoModelForImageTextToText.from_pretrained(str(args.model), local_files_only=True, dtype=dtype)
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"--model {args.model}: cannot be loaded as an image-to-text model "
                        f"({' '.join(str(exc).split())[:200]})") from None
    model.to(device).eval()
    written = 0
    with tqdm(total=len(todo), desc="captioning", unit="image") as bar:
        batches = BatchLoader(todo, args.batch_size, progress=bar.update)
        for chunk, pictures in batches:
            inputs = processor(images=pictures, return_tensors="pt").to(device)
            inputs = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in inputs.items()}
            with torch.no_grad():
                out = model.generate(**inputs, max_new_tokens=args.max_length, num_beams=args.num_beams)
            texts = processor.batch_decode(out, skip_special_tokens=True)
            for path, text in zip(chunk, texts):
                caption = f"{args.prefix}{' '.join(text.split())}{args.suffix}"
                if args.dry_run:
                    tqdm.write(f"{path}: {caption}")
                else:
                    atomic_write_text(path.with_suffix(args.extension), caption + "\n")
                    written += 1
    for message in batches.bad:
        print(f"skipped: {message}", file=sys.stderr)
    skipped = len(images) - len(todo)
    print(f"{len(images)} images: {written} captions written, {skipped} kept (use --overwrite to replace), "
          f"{len(batches.bad)} unreadable" + (" (dry run: nothing written)" if args.dry_run else ""))
    return 0


cli = command(main)  # the console command (pyproject.toml)

if __name__ == "__main__":
    sys.exit(cli())
