#!/usr/bin/env python
"""Sweep APT's regulariser weights and measure fit against drift, to choose their defaults.

    python bench/apt_sweep.py                         # tiny SD1.5-architecture model, CPU minutes
    python bench/apt_sweep.py --demo --steps 200 --learning_rate 1e-3   # the shipped demo model
    python bench/apt_sweep.py --model PATH --resolution 64 --steps 150   # any model, synthetic images

For each value of lambda_dist (attention alignment off) and of lambda_attn (representation
stabilisation off), and for plain LoRA, a LoRA is trained on a few images at equal steps and
learning rate (ATA's augmentation and weighting off, so only the swept term differs). Measured
with fixed noise and timesteps after training:
- fit: the diffusion loss on the training images, relative to plain LoRA (1.0 = as good);
- drift: how far the LoRA moves the model's predictions on prompts and images it was not trained
  on, relative to plain LoRA (lower = more of the base model's behaviour kept).
A good weight cuts drift clearly while keeping fit close to 1.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PRIOR_PROMPTS = ["a blue square on a white background", "a green triangle", "a photo of a yellow star",
                 "a purple heart on a striped background"]


def measure(probe, train_batch, prior_batch, seeds=(101, 202, 303)) -> tuple[float, float]:
    """(fit loss on the training batch, drift on the prior batch) with fixed noise and timesteps."""
    import torch

    from library.train.diffusion import step_generator

    fit, drift = [], []
    for seed in seeds:
        fit.append(probe.losses(train_batch, seed=seed).mean().item())
        gen = step_generator(seed, 1, 0)
        t = torch.randint(0, 1000, (prior_batch.latents.shape[0],), generator=gen)
        tuned = probe.predictions(prior_batch, t, gen=gen.clone_state())
        with probe.adapters(False):
            base = probe.predictions(prior_batch, t, gen=gen)
        drift.append(((tuned - base) ** 2).mean().item())
    return statistics.mean(fit), statistics.mean(drift)


def run(cfg_path: Path, overrides: list[tuple[str, str]], prior_dir: Path) -> tuple[float, float]:
    from library.config import build_config
    from library.train.loop import Trainer

    trainer = Trainer(build_config(str(cfg_path), overrides))
    probe = trainer.probe
    train_batch = probe.training_batch()
    trainer.run()
    from library.config.dataset import parse_blueprint
    from library.data.dataset import TrainingData

    prior = TrainingData(parse_blueprint({"datasets": [{"resolution": probe.resolution[0],
                                                        "subsets": [{"image_dir": str(prior_dir)}]}]}, "prior", ROOT),
                         native_resolution=64, default_batch_size=4, seed=0)
    return measure(probe, train_batch, probe.batch_of(prior))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model folder or file (default: a tiny random SD1.5-architecture model)")
    ap.add_argument("--demo", action="store_true",
                    help="the shipped demo model, trained on the demo concept; drift on rendered scenes of its world")
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--learning_rate", type=float, default=2e-3)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--lambda_dist", type=float, nargs="+", default=[0.1, 1.0, 10.0, 100.0])
    ap.add_argument("--lambda_attn", type=float, nargs="+", default=[1.0, 10.0, 100.0, 1000.0])
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    from library.utils.runtime import offline_and_quiet, setup_logging

    offline_and_quiet()
    setup_logging(main_process=False)
    from library.models.tiny import build_tiny_pipeline, save_diffusers
    from library.devkit import make_images, write_config

    work = Path(tempfile.mkdtemp(prefix="apt_sweep_"))
    model = args.model
    if model is None and not args.demo:
        save_diffusers(build_tiny_pipeline("sd1"), work / "model")
        model = str(work / "model")
    prior = work / "prior"
    if args.demo:
        from library.demo.models import BASE_MODEL, CONCEPT_DIR
        from library.demo.world import render, scenes

        model, images = str(BASE_MODEL), CONCEPT_DIR
        prior.mkdir()
        for i, scene in enumerate(scenes(99, 8)):
            render(scene).save(prior / f"img{i:02d}.png")
            (prior / f"img{i:02d}.txt").write_text(scene.caption())
    else:
        images = make_images(work / "train", 4, size=(args.resolution,) * 2, caption="a sks shape on a plain background")
        make_images(prior, len(PRIOR_PROMPTS), size=(args.resolution,) * 2)
        for i, prompt in enumerate(PRIOR_PROMPTS):
            (prior / f"img{i:02d}.txt").write_text(prompt)
    variants = [("plain LoRA", [])]
    # RS/AA on every step, as when the default weights were chosen (docs/apt.md)
    off = [("apt", "true"), ("apt.augment", "false"), ("apt.loss_weighting", "false"), ("apt.reference_every", "1")]
    variants += [(f"RS lambda_dist={v:g}", off + [("apt.aa", "false"), ("apt.lambda_dist", str(v))])
                 for v in args.lambda_dist]
    variants += [(f"AA lambda_attn={v:g}", off + [("apt.rs", "false"), ("apt.lambda_attn", str(v))])
                 for v in args.lambda_attn]
    results: dict[str, list[tuple[float, float]]] = {name: [] for name, _ in variants}
    for seed in range(args.seeds):
        for name, overrides in variants:
            out = work / f"out_{seed}"
            cfg = write_config(work / f"c{seed}.toml", {
                "model": {"pretrained_model_name_or_path": model},
                "network": {"network_dim": 8, "network_alpha": 8.0},
                "optimizer": {"learning_rate": args.learning_rate},
                "training": {"max_train_steps": args.steps, "train_batch_size": 2, "seed": seed},
                "data": {"cache_latents": True}, "saving": {"output_dir": str(out)},
                "logging": {"log_with": "none"}}, [{"resolution": args.resolution,
                                                     "subsets": [{"image_dir": str(images), "num_repeats": 2}]}])
            results[name].append(run(cfg, overrides, prior))
    plain = results["plain LoRA"]
    print(f"{args.steps} steps, lr {args.learning_rate}, {args.seeds} seeds; relative to plain LoRA of the same seed")
    print(f"{'variant':24s} {'fit':>8s} {'drift':>8s}")
    table = {}
    for name, rows in results.items():
        fit = statistics.mean(r[0] / p[0] for r, p in zip(rows, plain))
        drift = statistics.mean(r[1] / p[1] for r, p in zip(rows, plain))
        table[name] = {"fit_ratio": fit, "drift_ratio": drift, "raw": rows}
        print(f"{name:24s} {fit:8.3f} {drift:8.3f}")
    if args.json:
        args.json.write_text(json.dumps(table, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
