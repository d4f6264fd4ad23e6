#!/usr/bin/env python
"""Does APT overfit less than plain LoRA? A measured answer on the demo world, on a CPU.

    python bench/apt_efficacy.py                        # 5 variants x 3 seeds, presets/demo.toml settings
    python bench/apt_efficacy.py --seeds 5 --steps 600 --out runs/efficacy

Variants, at equal steps, learning rate, rank and data: plain LoRA (the DreamBooth-LoRA baseline),
+ATA (indicator-driven augmentation and loss weighting), +ATA+RS, and full APT (+AA), all with
the paper's constants, and full APT with presets/demo.toml's toy-world settings. Each is
trained on the five "sks crescent" images (always yellow, on blue or black) and scored with the
shipped toy-world classifier:

- concept fidelity: cosine similarity of classifier features between generations of the
  training captions and the training images (the DINO score of DreamBooth papers, in miniature);
- prompt following: on compositional prompts (the concept in colours and on backgrounds it was
  never shown with), how often the classifier sees the prompted colour and background, and the
  feature similarity of each generation to renderings of the prompted scene by the world generator
  (which can draw the crescent in any colour, on any background: the ground truth of the prompt);
- prior preservation: on prompts of the base world (no concept), the classifier's shape and
  colour accuracy, and the feature drift from the base model's image for the same seed;
- diversity: mean pairwise feature distance between seeds of the same concept prompt;
- memorisation: what the APT indicator measures, evaluated after training for every variant alike:
  the loss gap L_ref - L_theta on the training images (fixed timesteps and noise), averaged over
  the ten timestep bins. The raw gap, not gamma: with T = 1000 gamma saturates at 1 for them all.

The base model without a LoRA is scored the same way once, as the reference point of every column.
Writes a markdown table (mean +- std over seeds), a JSON file and a plot to --out.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# APT as shipped (the paper's constants: indicator scale T = 1000, zoom-out up to 3x, latent-space
# augmentation), pinned here so that presets/demo.toml's toy-world settings do not leak in.
PAPER = [("apt.indicator_scale", "none"), ("apt.augment_space", "latent"), ("apt.zoom_max", "3"),
         ("cache_latents", "true")]
VARIANTS = {
    "LoRA": [("apt", "false"), ("cache_latents", "true")],
    "+ATA": [("apt", "true"), *PAPER, ("apt.rs", "false"), ("apt.aa", "false")],
    "+ATA+RS": [("apt", "true"), *PAPER, ("apt.aa", "false")],
    "APT (full)": [("apt", "true"), *PAPER],
    # presets/demo.toml's [apt] table: indicator scale 20, rotation-only augmentation in pixel space.
    # Not the paper's method; chosen by looking at the demo's sample grid, not at these metrics.
    "APT (demo preset)": [("apt", "true")],
}
BASE = "base model (no LoRA)"
METRICS = [  # key, label, better
    ("fidelity", "concept fidelity (feature similarity to training images)", "higher"),
    ("follow_scene", "prompt following: similarity to renders of the prompted scene", "higher"),
    ("follow_colour", "prompt following: colour", "higher"),
    ("follow_background", "prompt following: background", "higher"),
    ("prior_shape", "prior prompts: shape accuracy", "higher"),
    ("prior_colour", "prior prompts: colour accuracy", "higher"),
    ("prior_drift", "prior prompts: feature drift from the base model", "lower"),
    ("diversity", "diversity (pairwise feature distance)", "higher"),
    ("memorisation", "memorisation (loss gap L_ref - L_theta on the training images, x1000)", "lower"),
]


def evaluation_prompts():
    from library.demo.world import COLOURS, PATTERNS, SHAPES, Scene, held_out_pairs

    concept_colours = [c for c in COLOURS if c not in ("yellow",)]
    backgrounds = [c for c in COLOURS if c not in ("blue", "black")]
    compositional = []
    for i, colour in enumerate(concept_colours):
        bg = backgrounds[(i * 3 + 1) % len(backgrounds)]
        if bg == colour:
            bg = backgrounds[(i * 3 + 2) % len(backgrounds)]
        compositional.append(Scene("crescent", colour, "large", bg, PATTERNS[i % 3]))
    held = held_out_pairs()
    prior = []
    for i, shape in enumerate(SHAPES):
        colour = list(COLOURS)[(i * 3) % len(COLOURS)]
        if (shape, colour) in held:
            colour = list(COLOURS)[(i * 3 + 1) % len(COLOURS)]
        bg = [c for c in COLOURS if c != colour][(i * 5) % (len(COLOURS) - 1)]
        prior.append(Scene(shape, colour, "large", bg, PATTERNS[(i + 1) % 3]))
    return compositional, prior


def scene_embeddings(classifier, scenes, renders: int = 8):
    """Per scene, the mean normalised classifier feature of renders at random positions/angles."""
    import random

    from library.demo.evaluate import score
    from library.demo.world import placed, render

    rng = random.Random(0)
    out = []
    for sc in scenes:
        renders_of_scene = [render(placed(sc, rng)) for _ in range(renders)]
        out.append(torch.nn.functional.normalize(score(classifier, renders_of_scene).embeddings.mean(0), dim=0))
    return torch.stack(out)


@dataclass
class References:
    """What every run is compared with, computed once: the base model's prior images, the renders
    of the prompted compositional scenes, and the training images."""
    base_prior: object           # Scores of the base model on the prior prompts
    scene_targets: torch.Tensor  # (compositional images, D)
    train_embeddings: torch.Tensor


def references(trainer, classifier, args) -> References:
    from PIL import Image

    from library.demo.evaluate import generate, pipeline, score
    from library.demo.models import to_tensor

    compositional, prior = evaluation_prompts()
    trainer.network.set_enabled(False)
    try:
        with torch.no_grad():
            pri = [(sc.caption(), 700 + s) for sc in prior for s in range(args.images_per_prompt)]
            base_prior = score(classifier, generate(pipeline(trainer.bundle, trainer.bundle.unet), pri,
                                                    steps=args.sample_steps, scale=args.cfg))
            train = to_tensor([Image.open(r.path).convert("RGB") for r in trainer.data.records])
            train_emb = torch.nn.functional.normalize(classifier.embed(train), dim=1)
    finally:
        trainer.network.set_enabled(True)
    comp_truth = [sc for sc in compositional for _ in range(args.images_per_prompt)]
    return References(base_prior, scene_embeddings(classifier, comp_truth), train_emb)


def memorisation(trainer, per_bin_seeds: int = 3) -> float:
    """1000 x (L_ref - L_theta) on the training images with fixed noise, averaged over 10 bins."""
    batch = trainer.batches.build_fixed(trainer.data.train_indices())
    gaps = []
    with torch.no_grad():
        for b in range(10):
            t = torch.full((len(batch.records),), b * 100 + 50)
            theta, ref = [], []
            for s in range(per_bin_seeds):
                for enabled, losses in ((True, theta), (False, ref)):
                    trainer.network.set_enabled(enabled)
                    gen = torch.Generator().manual_seed(10_000 + 97 * b + s)
                    losses.append(trainer.denoiser.loss(batch, gen, timesteps=t, unet=trainer.bundle.unet,
                                                        weighted=False, frozen_text=True).loss.item())
            trainer.network.set_enabled(True)
            gaps.append(1000 * (statistics.mean(ref) - statistics.mean(theta)))
    return statistics.mean(gaps)


def evaluate_run(trainer, classifier, refs: References, args) -> dict[str, float]:
    from library.demo.evaluate import generate, mean_pairwise_distance, pipeline, score

    compositional, prior = evaluation_prompts()
    pipe = pipeline(trainer.bundle, trainer.bundle.unet)
    with torch.no_grad(), trainer.accelerator.autocast():
        train_caps = sorted({r.caption for r in trainer.data.records})
        ident = [(c, 500 + s) for c in train_caps for s in range(args.images_per_prompt * 2)]
        comp = [(sc.caption(), 600 + s) for sc in compositional for s in range(args.images_per_prompt)]
        pri = [(sc.caption(), 700 + s) for sc in prior for s in range(args.images_per_prompt)]
        imgs = generate(pipe, ident + comp + pri, steps=args.sample_steps, scale=args.cfg)
    n1, n2 = len(ident), len(ident) + len(comp)
    s_ident, s_comp, s_prior = score(classifier, imgs[:n1]), score(classifier, imgs[n1:n2]), score(classifier, imgs[n2:])
    comp_truth = [sc for sc in compositional for _ in range(args.images_per_prompt)]
    prior_truth = [sc for sc in prior for _ in range(args.images_per_prompt)]

    def share(predictions, truth, head):
        return statistics.mean(p == getattr(t, head) for p, t in zip(predictions[head], truth))

    k = args.images_per_prompt
    return {
        "fidelity": float((s_ident.embeddings @ refs.train_embeddings.T).mean()),
        "follow_scene": float((s_comp.embeddings * refs.scene_targets).sum(1).mean()),
        "follow_colour": share(s_comp.predictions, comp_truth, "colour"),
        "follow_background": share(s_comp.predictions, comp_truth, "background"),
        "prior_shape": share(s_prior.predictions, prior_truth, "shape"),
        "prior_colour": share(s_prior.predictions, prior_truth, "colour"),
        "prior_drift": float((1 - (s_prior.embeddings * refs.base_prior.embeddings).sum(1)).mean()),
        "diversity": statistics.mean(mean_pairwise_distance(s_comp.embeddings[i:i + k])
                                     for i in range(0, len(comp), k)),
        "memorisation": memorisation(trainer),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--learning_rate", type=float, default=1e-3)
    ap.add_argument("--images_per_prompt", type=int, default=3)
    ap.add_argument("--sample_steps", type=int, default=25)
    ap.add_argument("--cfg", type=float, default=5.0)
    ap.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "efficacy")
    args = ap.parse_args(argv)

    from library.utils.runtime import offline_and_quiet, setup_logging

    offline_and_quiet()
    setup_logging(main_process=False)
    from library.config import build_config
    from library.demo.models import load_classifier
    from library.train.loop import Trainer

    args.out.mkdir(parents=True, exist_ok=True)
    classifier = load_classifier()
    started = time.time()

    def make_trainer(name: str, seed: int):
        overrides = [("max_train_steps", str(args.steps)), ("learning_rate", str(args.learning_rate)),
                     ("seed", str(seed)), ("output_dir", str(args.out / "lora")), ("log_with", "none"),
                     ("sample_prompts", "none"), ("sample_every_n_steps", "none"), *VARIANTS[name]]
        trainer = Trainer(build_config(str(ROOT / "presets" / "demo.toml"), overrides))
        trainer.bundle.vae.to(trainer.device)
        return trainer

    # The reference point: the base model, scored like the LoRAs (its drift and memorisation are 0).
    trainer = make_trainer("LoRA", 0)
    refs = references(trainer, classifier, args)
    trainer.network.set_enabled(False)
    base_metrics = evaluate_run(trainer, classifier, refs, args)
    results: dict[str, list[dict]] = {BASE: [{**base_metrics, "train_seconds": 0.0}]}
    print(f"{BASE} " + " ".join(f"{k}={v:.3f}" for k, v in base_metrics.items()), flush=True)
    results.update({v: [] for v in args.variants})
    for seed in range(args.seeds):
        for name in args.variants:
            trainer = make_trainer(name, seed)
            tick = time.time()
            trainer.run()
            trainer.bundle.vae.to(trainer.device)
            metrics = evaluate_run(trainer, classifier, refs, args)
            metrics["train_seconds"] = time.time() - tick
            results[name].append(metrics)
            print(f"seed {seed} {name:10s} " + " ".join(f"{k}={v:.3f}" for k, v in metrics.items()), flush=True)
    write_report(results, args, time.time() - started)
    return 0


def write_report(results: dict[str, list[dict]], args, seconds: float) -> None:
    def cell(values):
        if len(values) == 1:
            return f"{values[0]:.3f}"
        return f"{statistics.mean(values):.3f} +- {statistics.stdev(values):.3f}"

    lines = [f"{args.seeds} seeds, {args.steps} steps, lr {args.learning_rate}, {args.images_per_prompt} images per "
             f"prompt, DDIM {args.sample_steps} steps, CFG {args.cfg}; {seconds / 60:.0f} minutes", "",
             "| metric | better | " + " | ".join(results) + " |", "|---|---|" + "---|" * len(results)]
    for key, label, better in METRICS:
        lines.append(f"| {label} | {better} | " + " | ".join(cell([r[key] for r in rows]) for rows in results.values())
                     + " |")
    lines.append("| training time per run (s) | | " + " | ".join(cell([r["train_seconds"] for r in rows])
                                                        for rows in results.values()) + " |")
    text = "\n".join(lines) + "\n"
    (args.out / "apt_efficacy.md").write_text(text)
    (args.out / "apt_efficacy.json").write_text(json.dumps(results, indent=2))
    print(text)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 3, figsize=(15, 11))
    for ax, (key, label, better) in zip(axes.flat, METRICS):
        names = list(results)
        means = [statistics.mean(r[key] for r in results[n]) for n in names]
        errs = [statistics.stdev([r[key] for r in results[n]]) if len(results[n]) > 1 else 0 for n in names]
        ax.bar(range(len(names)), means, yerr=errs, color=["#ccc", "#888", "#6a9", "#39c", "#c63", "#a5c"][:len(names)], capsize=3)
        ax.set_xticks(range(len(names)), names, rotation=20, fontsize=8)
        ax.set_title(f"{label} ({better} is better)", fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out / "apt_efficacy.png", dpi=100)


if __name__ == "__main__":
    sys.exit(main())
