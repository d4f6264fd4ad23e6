#!/usr/bin/env python
"""Step time and peak memory of plain LoRA against APT and its components, side by side in one run.

    python bench/apt_overhead.py                      # tiny SD1.5-architecture UNet, 64 px
    python bench/apt_overhead.py --model mid          # SD1.5 architecture at half width, 256 px
    python bench/apt_overhead.py --model mid --device cuda --mixed_precision bf16 --steps 20

Every variant trains the same model (one set of weights, LoRA re-initialised), on the same fixed
batch, with the same optimizer, for the same number of steps after a warm-up; the variants take
turns so that drifts of the machine affect all of them alike. Printed: seconds per step and peak
memory of each variant, and their ratios to plain LoRA. Peak memory is torch's allocator peak on
CUDA, and the process's peak resident memory on a CPU (reset between variants through
/proc/self/clear_refs), both as the whole peak and as the part above what the loaded model holds.
Targets (docs/apt.md): APT/plain time <= 1.4 (one extra no-grad forward is ~1.33), memory <= 1.15;
with `reference_every` (the reference pass every k-th step) <= 1.25. Keep --steps a multiple of 4
so that every variant times whole cycles of its reference schedule.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path


# The component variants run the reference pass on every step (as the paper), whatever the default.
VARIANTS = {
    "plain LoRA": None,
    "APT: indicator + ATA (ref pass)": {"rs": False, "aa": False, "reference_every": 1},
    "APT: ATA + RS": {"rs": True, "aa": False, "reference_every": 1},
    "APT: ATA + AA": {"rs": False, "aa": True, "reference_every": 1},
    "APT: full": {"rs": True, "aa": True, "reference_every": 1},
    "APT: full, reference every 2": {"rs": True, "aa": True, "reference_every": 2},
    "APT: full, reference every 4": {"rs": True, "aa": True, "reference_every": 4},
}


def mid_pipeline(seed: int):
    """SD1.5's UNet structure at half width with the real text-encoder size (random weights)."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from library.models import shipped

    sd = shipped.tree("sd15")
    torch.manual_seed(seed)
    cfg = shipped.read_json(sd / "unet" / "config.json")
    cfg.update(block_out_channels=[160, 320, 640, 640], sample_size=32)
    unet = UNet2DConditionModel.from_config(cfg)
    vae = AutoencoderKL.from_config(shipped.read_json(shipped.tree("tiny_sd15") / "vae" / "config.json"))
    te = CLIPTextModel(CLIPTextConfig.from_pretrained(str(sd / "text_encoder")))
    return StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=shipped.load_tokenizer(sd / "tokenizer"),
                                   unet=unet, scheduler=PNDMScheduler.from_config(
                                       shipped.read_json(sd / "scheduler" / "scheduler_config.json")),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def rss_now() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def rss_peak() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def reset_peak(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass


def peak(device) -> int:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    return rss_peak()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["tiny", "mid"], default="tiny")
    ap.add_argument("--resolution", type=int, help="default: 64 (tiny), 256 (mid)")
    ap.add_argument("--batch_size", type=int, default=2)
    ap.add_argument("--steps", type=int, default=8, help="timed steps per variant and round")
    ap.add_argument("--rounds", type=int, default=2, help="rounds over all variants (median reported)")
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda")
    ap.add_argument("--mixed_precision", default="no", choices=["no", "bf16", "fp16"])
    ap.add_argument("--gradient_checkpointing", action="store_true")
    ap.add_argument("--attention", default="sdpa", choices=["sdpa", "xformers"])
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--variants", nargs="+", choices=list(VARIANTS), metavar="NAME",
                    help="only these variants (plain LoRA is always timed: the ratios are to it)")
    args = ap.parse_args(argv)
    chosen = {name: parts for name, parts in VARIANTS.items()
              if args.variants is None or name == "plain LoRA" or name in args.variants}

    from library.utils.runtime import offline_and_quiet, setup_logging

    offline_and_quiet()
    setup_logging(main_process=False)
    import torch

    if args.device == "cpu":
        import os

        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    from dataclasses import replace

    from library.config import build_config
    from library.models.tiny import build_tiny_pipeline, save_diffusers
    from library.train.loop import Trainer
    from library.devkit import make_images, write_config

    resolution = args.resolution or (64 if args.model == "tiny" else 256)
    work = Path(tempfile.mkdtemp(prefix="apt_bench_"))
    pipe = build_tiny_pipeline("sd1") if args.model == "tiny" else mid_pipeline(0)
    save_diffusers(pipe, work / "model")
    del pipe
    images = make_images(work / "images", args.batch_size, size=(resolution, resolution))
    cfg_path = write_config(work / "c.toml", {
        "model": {"pretrained_model_name_or_path": str(work / "model")},
        "network": {"network_dim": 16, "network_alpha": 16.0},
        "training": {"max_train_steps": 10 ** 6, "train_batch_size": args.batch_size, "apt": True,
                     "mixed_precision": args.mixed_precision, "gradient_checkpointing": args.gradient_checkpointing,
                     "attention": args.attention},
        "data": {"cache_latents": True}, "saving": {"output_dir": str(work / "out")}, "logging": {"log_with": "none"},
    }, [{"resolution": resolution, "subsets": [{"image_dir": str(images)}]}])
    cfg = build_config(str(cfg_path), [])
    trainer = Trainer(cfg)
    probe = trainer.probe
    device = probe.device
    probe.fix_samples(0)  # the same batch every step, no loading cost
    variants = {name: None if parts is None else replace(cfg.apt, **parts) for name, parts in chosen.items()}
    base = rss_now()
    results: dict[str, dict[str, list]] = {name: {"time": [], "peak": []} for name in chosen}
    step = 0
    for _ in range(args.rounds):
        for name, opts in variants.items():
            if opts is None:
                probe.use_method("plain")
            else:
                probe.use_method("apt", apt=opts)
            for _ in range(2):  # warm-up
                probe.train_step(step)
                step += 1
            reset_peak(device)
            if device.type == "cuda":
                torch.cuda.synchronize()
            tick = time.perf_counter()
            for _ in range(args.steps):
                probe.train_step(step)
                step += 1
            if device.type == "cuda":
                torch.cuda.synchronize()
            results[name]["time"].append((time.perf_counter() - tick) / args.steps)
            results[name]["peak"].append(peak(device))
    plain_t = statistics.median(results["plain LoRA"]["time"])
    plain_m = statistics.median(results["plain LoRA"]["peak"])
    held = base if device.type != "cuda" else 0
    print(f"model {args.model}, {resolution} px, batch {args.batch_size}, device {device}, precision "
          f"{args.mixed_precision}, checkpointing {args.gradient_checkpointing}, {args.steps} steps x {args.rounds}")
    print(f"{'variant':34s} {'s/step':>8s} {'time x':>7s} {'peak MiB':>9s} {'mem x':>6s} {'above model x':>13s}")
    summary = {}
    for name, r in results.items():
        t, m = statistics.median(r["time"]), statistics.median(r["peak"])
        above = (m - held) / max(plain_m - held, 1)
        summary[name] = {"s_per_step": t, "time_ratio": t / plain_t, "peak_bytes": m, "memory_ratio": m / plain_m,
                         "memory_ratio_above_model": above}
        print(f"{name:34s} {t:8.4f} {t / plain_t:7.3f} {m / 2 ** 20:9.1f} {m / plain_m:6.3f} {above:13.3f}")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": summary},
                                        indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
