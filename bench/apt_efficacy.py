#!/usr/bin/env python
"""Does APT overfit less than what users would pick instead? Measured on the demo world, on a CPU.

    python bench/apt_efficacy.py --seeds 0 1 2 --steps 400                 # development seeds
    python bench/apt_efficacy.py --seeds 100 101 102 103 104 --steps 1200 400   # the held-out table
    python bench/apt_efficacy.py --regime low_lr --variants LoRA APT        # 3x lower learning rate
    python bench/apt_efficacy.py --ablations                                # + components, paper indicator, reference_every

Variants, at equal steps, learning rate, rank and data (presets/demo.toml's settings):
- LoRA: plain LoRA, the DreamBooth-LoRA baseline;
- LoRA + prior preservation: DreamBooth-style class images, generated once by the base model from
  the training captions without the identifier (the bench caches them in --out/class_images), as
  an is_reg subset weighted by prior_loss_weight (1);
- APT: APT with its defaults (the relative indicator) and the preset's augmentation settings,
  except that the reference pass runs on every step, as in the paper;
- APT + prior preservation (reference pass on every step too);
- with --ablations: +ATA (indicator-driven augmentation and weighting only), +ATA+RS, APT with the
  paper's indicator (T = 1000), and APT with the reference pass every 2nd and every 4th step
  (`reference_every = 4` is the trainer's default: APT exactly as users get it).
Regimes: demo (the preset), low_lr (a third of its learning rate), rank32 (network_dim 32).

Each run is trained on the five "sks crescent" images (always yellow, on blue or black) and scored
with the shipped toy-world classifier:
- concept fidelity: cosine similarity of classifier features between generations of the
  training captions and the training images (the DINO score of DreamBooth papers, in miniature);
- prompt following: on compositional prompts (the concept in colours and on backgrounds it was
  never shown with), how often the classifier sees the prompted colour and background, and the
  feature similarity of each generation to renderings of the prompted scene by the world generator
  (which can draw the crescent in any colour, on any background: the ground truth of the prompt);
- prior preservation: on prompts of the base world (no concept), the classifier's shape and
  colour accuracy, and the feature drift from the base model's image for the same seed;
- diversity: mean pairwise feature distance between seeds of the same concept prompt;
- memorisation: the loss gap L_ref - L_theta on the training images (fixed timesteps and noise),
  averaged over the ten timestep bins, evaluated after training for every variant alike.

The base model without a LoRA is scored the same way once, as the reference point of every column.
Every finished run is kept in --out/runs/ and not redone when the bench is started again. Writes,
per step count, a markdown table (mean and 95% confidence interval over seeds, and the paired
difference to plain LoRA with its interval), a JSON file and a plot to --out, and prints the
wall time.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

# The preset's APT without its [apt] table's augmentation choices would be another method; these
# pin only what each variant changes.
APT_OFF = [("apt", "false")]
# "APT" runs the reference pass on every step (as the paper); "APT (reference every 4)" is the
# trainer's default since the held-out table measured it against that (docs/results.md).
EVERY_STEP = ("apt.reference_every", "1")
VARIANTS = {
    "LoRA": APT_OFF,
    "LoRA + prior preservation": APT_OFF,
    "APT": [("apt", "true"), EVERY_STEP],
    "APT + prior preservation": [("apt", "true"), EVERY_STEP],
}
ABLATIONS = {
    "+ATA": [("apt", "true"), ("apt.rs", "false"), ("apt.aa", "false"), EVERY_STEP],
    "+ATA+RS": [("apt", "true"), ("apt.aa", "false"), EVERY_STEP],
    "APT (paper indicator)": [("apt", "true"), ("apt.indicator", "paper"), EVERY_STEP],
    "APT (reference every 2)": [("apt", "true"), ("apt.reference_every", "2")],
    "APT (reference every 4)": [("apt", "true"), ("apt.reference_every", "4")],
}
PRIOR_PRESERVATION = {"LoRA + prior preservation", "APT + prior preservation"}
REGIMES = {"demo": [], "low_lr": [("learning_rate", "3.3e-4")],
           "rank32": [("network_dim", "32"), ("network_alpha", "32")]}
# two-sided 95% quantiles of Student's t by degrees of freedom
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}
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

    from library.demo.evaluate import generate, score
    from library.demo.models import to_tensor

    compositional, prior = evaluation_prompts()
    probe = trainer.probe
    with probe.adapters(False), torch.no_grad():
        pri = [(sc.caption(), 700 + s) for sc in prior for s in range(args.images_per_prompt)]
        base_prior = score(classifier, generate(probe.pipeline(), pri, steps=args.sample_steps, scale=args.cfg))
        train = to_tensor([Image.open(path).convert("RGB") for path, _ in probe.training_images()])
        train_emb = torch.nn.functional.normalize(classifier.embed(train), dim=1)
    comp_truth = [sc for sc in compositional for _ in range(args.images_per_prompt)]
    return References(base_prior, scene_embeddings(classifier, comp_truth), train_emb)


def memorisation(trainer, per_bin_seeds: int = 3) -> float:
    """1000 x (L_ref - L_theta) on the training images with fixed noise, averaged over 10 bins."""
    probe = trainer.probe
    batch = probe.training_batch()
    gaps = []
    for b in range(10):
        t = torch.full((len(batch.records),), b * 100 + 50)
        theta, ref = [], []
        for s in range(per_bin_seeds):
            for enabled, losses in ((True, theta), (False, ref)):
                with probe.adapters(enabled):
                    gen = torch.Generator().manual_seed(10_000 + 97 * b + s)
                    losses.append(probe.losses(batch, t, gen=gen).mean().item())
        gaps.append(1000 * (statistics.mean(ref) - statistics.mean(theta)))
    return statistics.mean(gaps)


def evaluate_run(trainer, classifier, refs: References, args) -> dict[str, float]:
    from library.demo.evaluate import generate, mean_pairwise_distance, score

    compositional, prior = evaluation_prompts()
    probe = trainer.probe
    pipe = probe.pipeline()
    with torch.no_grad(), probe.autocast():
        train_caps = sorted({caption for _, caption in probe.training_images()})
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


def class_images(trainer, args) -> Path:
    """DreamBooth-style class images: the base model's generations of the training captions with the
    identifier removed, 4 per caption, cached in --out/class_images."""
    from library.demo.evaluate import generate

    folder = args.out / "class_images"
    if (folder / "done").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    captions = sorted({caption.replace("sks ", "") for _, caption in trainer.probe.training_images()})
    prompts = [(c, 900 + k) for c in captions for k in range(4)]
    with trainer.probe.adapters(False), torch.no_grad():
        images = generate(trainer.probe.pipeline(), prompts, steps=args.sample_steps, scale=args.cfg)
    for n, (image, (caption, _)) in enumerate(zip(images, prompts)):
        image.save(folder / f"class_{n:02d}.png")
        (folder / f"class_{n:02d}.txt").write_text(caption)
    (folder / "done").write_text(str(len(images)))
    return folder


def preset_with_class_images(folder: Path, out: Path) -> Path:
    """presets/demo.toml with the class images as a regularisation subset (paths made absolute)."""
    text = (ROOT / "presets" / "demo.toml").read_text().replace('"../demo/', f'"{ROOT / "demo"}/')
    text += f'\n  [[datasets.subsets]]\n  image_dir = "{folder}"\n  is_reg = true\n'
    path = out / "demo_prior_preservation.toml"
    path.write_text(text)
    return path


def slug(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text).strip("_").lower()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, nargs="+", default=[400])
    ap.add_argument("--regime", choices=list(REGIMES), default="demo")
    ap.add_argument("--images_per_prompt", type=int, default=3)
    ap.add_argument("--sample_steps", type=int, default=25)
    ap.add_argument("--cfg", type=float, default=5.0)
    ap.add_argument("--ablations", action="store_true", help="also the component, indicator and reference_every "
                                                             "variants")
    ap.add_argument("--variants", nargs="+", help="only these variants (names as in the table)")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "efficacy")
    ap.add_argument("--cpu_threads", type=int, default=0, help="torch threads (0 = the trainer's default: all "
                                                               "cores; 1 when other jobs share the cores)")
    args = ap.parse_args(argv)
    variants = {**VARIANTS, **(ABLATIONS if args.ablations else {})}
    if args.variants:
        unknown = [v for v in args.variants if v not in {**VARIANTS, **ABLATIONS}]
        if unknown:
            ap.error(f"unknown variants {unknown}; valid: {list({**VARIANTS, **ABLATIONS})}")
        variants = {v: {**VARIANTS, **ABLATIONS}[v] for v in args.variants}

    from library.utils.runtime import offline_and_quiet, setup_logging

    offline_and_quiet()
    setup_logging(main_process=False)
    from library.config import build_config
    from library.demo.models import load_classifier
    from library.train.loop import Trainer

    (args.out / "runs").mkdir(parents=True, exist_ok=True)
    classifier = load_classifier()
    started = time.time()
    preset = ROOT / "presets" / "demo.toml"

    def make_trainer(name: str, seed: int, steps: int, config: Path):
        overrides = [("max_train_steps", str(steps)), ("seed", str(seed)), ("output_dir", str(args.out / "lora")),
                     ("log_with", "none"), ("sample_prompts", "none"), ("sample_every_n_steps", "none"),
                     ("cpu_threads", str(args.cpu_threads)), *REGIMES[args.regime], *variants.get(name, APT_OFF)]
        return Trainer(build_config(str(config), overrides))

    # The reference point: the base model, scored like the LoRAs (its drift and memorisation are 0).
    trainer = make_trainer("LoRA", 0, 1, preset)
    refs = references(trainer, classifier, args)
    pp_config = preset_with_class_images(class_images(trainer, args), args.out) if \
        PRIOR_PRESERVATION & set(variants) else None
    base_file = args.out / "runs" / "base.json"
    if base_file.is_file():
        base_metrics = json.loads(base_file.read_text())
    else:
        with trainer.probe.adapters(False):
            base_metrics = evaluate_run(trainer, classifier, refs, args)
        base_file.write_text(json.dumps(base_metrics))
    print(f"{BASE} " + " ".join(f"{k}={v:.3f}" for k, v in base_metrics.items()), flush=True)
    for steps in args.steps:
        results: dict[str, list[dict]] = {BASE: [{**base_metrics, "train_seconds": 0.0, "seed": -1}]}
        for seed in args.seeds:
            for name in variants:
                run_file = args.out / "runs" / f"{args.regime}_{slug(name)}_s{seed}_{steps}.json"
                if run_file.is_file():  # finished runs are not redone
                    metrics = json.loads(run_file.read_text())
                else:
                    config = pp_config if name in PRIOR_PRESERVATION else preset
                    trainer = make_trainer(name, seed, steps, config)
                    tick = time.time()
                    trainer.run()
                    metrics = evaluate_run(trainer, classifier, refs, args)
                    metrics["train_seconds"] = time.time() - tick
                    metrics["seed"] = seed
                    indicator = args.out / "lora" / "apt_indicator.csv"
                    if indicator.is_file():
                        metrics["indicator_csv"] = indicator.read_text()
                        indicator.unlink()
                    run_file.write_text(json.dumps(metrics))
                results.setdefault(name, []).append(metrics)
                print(f"{steps} steps, seed {seed} {name:28s} " + " ".join(
                    f"{k}={metrics[k]:.3f}" for k, _, _ in METRICS), flush=True)
        write_report(results, args, steps, time.time() - started)
    print(f"wall time {(time.time() - started) / 60:.1f} min")
    return 0


def interval(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% confidence interval (Student's t)."""
    mean = statistics.mean(values)
    if len(values) < 2:
        return mean, float("nan")
    return mean, T95.get(len(values) - 1, 1.96) * statistics.stdev(values) / math.sqrt(len(values))


def paired(rows: list[dict], baseline: list[dict], key: str, ratio: bool = False) -> tuple[float, float]:
    """Mean per-seed difference to the baseline over the seeds both have, with its 95% interval; with
    `ratio`, the per-seed ratio minus 1 (-0.3 = 30% lower)."""
    base = {r["seed"]: r[key] for r in baseline}
    pairs = [(r[key], base[r["seed"]]) for r in rows if r["seed"] in base]
    return interval([x / b - 1 for x, b in pairs if b] if ratio else [x - b for x, b in pairs])


def loss_weights(indicator_csv: str, early: int = 100) -> tuple[float, float]:
    """From a run's apt_indicator.csv: the lowest mean loss weight (1 - gamma, averaged over the bins)
    in the first `early` steps, and the mean loss weight at the last step."""
    rows = [line.split(",") for line in indicator_csv.strip().splitlines()[1:]]
    weights = [(int(r[0]), 1 - statistics.mean(float(g) for g in r[1:])) for r in rows]
    return min(w for s, w in weights if s <= early), weights[-1][1]


def write_report(results: dict[str, list[dict]], args, steps: int, seconds: float) -> None:
    def cell(values):
        mean, half = interval(values)
        return f"{mean:.3f}" if math.isnan(half) else f"{mean:.3f} +- {half:.3f}"

    names = list(results)
    lines = [f"{args.regime} regime, seeds {args.seeds}, {steps} steps, {args.images_per_prompt} images per prompt, "
             f"DDIM {args.sample_steps} steps, CFG {args.cfg}; {seconds / 60:.0f} minutes so far; mean +- 95% "
             "confidence interval over seeds", "",
             "| metric | better | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for key, label, better in METRICS:
        lines.append(f"| {label} | {better} | " + " | ".join(cell([r[key] for r in rows]) for rows in results.values())
                     + " |")
    lines.append("| training time per run (s) | | " + " | ".join(cell([r["train_seconds"] for r in rows])
                                                        for rows in results.values()) + " |")
    # Plain LoRA is what APT must not lose to; prior preservation is what users would pick instead;
    # the reference pass on every step is what a cheaper schedule must match.
    for baseline, label_of, compared in (("LoRA", "plain LoRA", lambda n: True),
                                         ("LoRA + prior preservation", "LoRA + prior preservation",
                                          lambda n: "APT" in n),
                                         ("APT", "APT with the reference pass on every step",
                                          lambda n: n.startswith("APT (reference every"))):
        others = [n for n in names if n not in (BASE, "LoRA", baseline) and compared(n)]
        if baseline not in results or not others or len(args.seeds) < 2:
            continue
        lines += ["", f"Paired difference to {label_of} (same seed), mean +- 95% interval:", "",
                  "| metric | " + " | ".join(others) + " |", "|---|" + "---|" * len(others)]
        for key, label, _ in METRICS:
            cells = []
            for n in others:
                mean, half = paired(results[n], results[baseline], key)
                cells.append(f"{mean:+.3f} +- {half:.3f}")
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    others = [n for n in names if n not in (BASE, "LoRA")]
    if "LoRA" in results and others and len(args.seeds) > 1:  # the bars are stated in percent
        lines += ["", "Relative to plain LoRA (per-seed ratio - 1), mean +- 95% interval:", "",
                  "| metric | " + " | ".join(others) + " |", "|---|" + "---|" * len(others)]
        for key in ("fidelity", "prior_drift"):
            label = next(lab for k, lab, _ in METRICS if k == key)
            cells = []
            for n in others:
                mean, half = paired(results[n], results["LoRA"], key, ratio=True)
                cells.append(f"{100 * mean:+.1f}% +- {100 * half:.1f}%")
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    with_indicator = [n for n in names if all("indicator_csv" in r for r in results[n])]
    if with_indicator:
        lines += ["", "APT's mean loss weight (1 - gamma over the bins; mean +- 95% interval over seeds):", "",
                  "| variant | lowest in steps 1-100 | at the last step |", "|---|---|---|"]
        for n in with_indicator:
            early, end = zip(*(loss_weights(r["indicator_csv"]) for r in results[n]))
            lines.append(f"| {n} | {cell(list(early))} | {cell(list(end))} |")
    text = "\n".join(lines) + "\n"
    stem = f"apt_efficacy_{args.regime}_{steps}"
    (args.out / f"{stem}.md").write_text(text)
    (args.out / f"{stem}.json").write_text(json.dumps(results, indent=2))
    print(text)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 3, figsize=(15, 11))
    for ax, (key, label, better) in zip(axes.flat, METRICS):
        stats = [interval([r[key] for r in results[n]]) for n in names]
        ax.bar(range(len(names)), [m for m, _ in stats], yerr=[0 if math.isnan(h) else h for _, h in stats],
               color=plt.get_cmap("tab10")(range(len(names))), capsize=3)
        ax.set_xticks(range(len(names)), names, rotation=25, fontsize=7, ha="right")
        ax.set_title(f"{label} ({better} is better)", fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out / f"{stem}.png", dpi=100)


if __name__ == "__main__":
    sys.exit(main())
