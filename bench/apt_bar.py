#!/usr/bin/env python
"""The issue's bar for APT as shipped, per concept and regime, read from the efficacy bench's cache.

    python bench/apt_bar.py                       # 1200 steps, held-out seeds 300-304 where cached
    python bench/apt_bar.py --steps 400

Reads the finished runs that bench/apt_efficacy.py keeps (--out/runs/, by default the repository's
bench/results/efficacy/runs/); trains nothing. For every concept and regime whose plain LoRA and
"APT (reference every 4)" (APT exactly as shipped) runs are cached on two or more of --seeds, it
pairs them by seed and states each item of the bar as

- met: the 95% interval of the paired difference lies on the good side of the bar;
- met in the mean: the mean is on the good side, the interval reaches over the bar;
- not met in the mean: the mean is on the wrong side, the interval reaches over the bar;
- not met: the interval lies on the wrong side.

The bar (at 1200 steps, against plain LoRA unless named): concept fidelity within 2%; prior drift
-30% or better; class-mark share below plain LoRA's (concepts with class prompts); training-caption
coverage, copy distance and compositional joint accuracy at or above plain LoRA's; and against
LoRA + prior preservation, higher fidelity at equal or lower prior drift. The seeds each cell used
are printed with it. Writes the table to --out/apt_bar_<steps>.md too.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

# Run as a script, its own folder is first on sys.path, so the sibling bench imports as a module.
from apt_efficacy import PRESETS, REGIMES, ROOT, SHIPPED_NAME, check_tag, paired, slug

from library.utils.atomic import atomic_write_text

PP = "LoRA + prior preservation"
# label, metric key, baseline variant, per-seed ratio (else difference), bar, good side, bar itself good
BAR = [
    ("concept fidelity within 2% of plain LoRA", "fidelity", "LoRA", True, -0.02, "higher", True),
    ("prior drift -30% or better", "prior_drift", "LoRA", True, -0.30, "lower", True),
    ("class-mark share below plain LoRA's", "class_mark", "LoRA", False, 0.0, "lower", False),
    ("training-caption coverage at or above plain LoRA's", "coverage_train", "LoRA", False, 0.0, "higher", True),
    ("copy distance at or above plain LoRA's", "copy", "LoRA", False, 0.0, "higher", True),
    ("joint accuracy at or above plain LoRA's", "joint", "LoRA", False, 0.0, "higher", True),
    ("fidelity above prior preservation's", "fidelity", PP, False, 0.0, "higher", False),
    ("prior drift at or below prior preservation's", "prior_drift", PP, False, 0.0, "lower", True),
]


def verdict(mean: float, half: float, bar: float, better: str, bar_is_good: bool) -> str:
    """Where a paired difference (mean +- half) lies against the bar; `bar_is_good`: reaching the bar
    exactly meets it ("at or above"), else the difference must pass it ("below")."""
    if math.isnan(mean):
        return "n/a"
    sign = 1.0 if better == "higher" else -1.0

    def good(x: float) -> bool:
        return sign * (x - bar) >= 0 if bar_is_good else sign * (x - bar) > 0

    if math.isnan(half):
        return "met in the mean" if good(mean) else "not met in the mean"
    worse, better_end = mean - sign * half, mean + sign * half
    if good(worse):
        return "met"
    if good(mean):
        return "met in the mean"
    return "not met in the mean" if good(better_end) else "not met"


def load(runs: Path, concept: str, regime: str, variant: str, seeds: list[int], steps: int,
         images_per_prompt: int) -> list[dict]:
    rows = []
    for seed in seeds:
        path = runs / f"{concept}_{regime}_{slug(variant)}_s{seed}_{steps}_n{images_per_prompt}.json"
        if path.is_file():
            rows.append(json.loads(path.read_text()))
    return rows


def cell(rows: list[dict], baseline: list[dict], key: str, ratio: bool, bar: float, better: str,
         bar_is_good: bool) -> str:
    if not baseline or not any(key in r for r in rows):
        return "no runs" if not baseline else "n/a"
    mean, half = paired(rows, baseline, key, ratio=ratio)
    if ratio:
        figure = f"{100 * mean:+.1f}% +- {100 * half:.1f}%"
    else:
        figure = f"{mean:+.3f} +- {half:.3f}"
    return f"{verdict(mean, half, bar, better, bar_is_good)} ({figure})"


def table(runs: Path, seeds: list[int], steps: int, images_per_prompt: int) -> str:
    columns = []
    for concept in PRESETS:
        for regime in REGIMES:
            found = {v: load(runs, concept, regime, v, seeds, steps, images_per_prompt)
                     for v in ("LoRA", PP, SHIPPED_NAME)}
            lora_seeds = {r["seed"] for r in found["LoRA"]}
            shipped = [r for r in found[SHIPPED_NAME] if r["seed"] in lora_seeds]
            if len(shipped) < 2:
                continue
            used = sorted(r["seed"] for r in shipped)
            found = {v: [r for r in rows if r["seed"] in used] for v, rows in found.items()}
            columns.append((f"{concept}, {regime} (seeds {', '.join(map(str, used))})", found))
    if not columns:
        return f"no concept and regime has plain LoRA and {SHIPPED_NAME} cached on two of the seeds {seeds}\n"
    lines = [f"APT as shipped (\"{SHIPPED_NAME}\") against the bar, {steps} steps; paired by seed, mean +- 95% "
             "interval (Student's t)", "",
             "| item | " + " | ".join(name for name, _ in columns) + " |", "|---|" + "---|" * len(columns)]
    for label, key, baseline, ratio, bar, better, bar_is_good in BAR:
        cells = []
        for _, found in columns:
            pp_seeds = {r["seed"] for r in found[PP]}
            rows = found[SHIPPED_NAME] if baseline == "LoRA" else [r for r in found[SHIPPED_NAME]
                                                                    if r["seed"] in pp_seeds]
            cells.append(cell(rows, found[baseline], key, ratio, bar, better, bar_is_good))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "efficacy",
                    help="the efficacy bench's --out (its cache is runs/ there)")
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--seeds", type=int, nargs="+", default=[300, 301, 302, 303, 304])
    ap.add_argument("--images_per_prompt", type=int, default=9)
    # a table over other seeds (a later held-out set) must not overwrite the one docs/results.md quotes
    ap.add_argument("--tag", default="", help="appended to the table's file name (apt_bar_<steps>_<tag>.md)")
    args = ap.parse_args(argv)
    check_tag(ap, args.tag)
    if not (args.out / "runs").is_dir():
        ap.error(f"--out {args.out}: no runs/ folder of bench/apt_efficacy.py there")
    text = table(args.out / "runs", args.seeds, args.steps, args.images_per_prompt)
    print(text, end="")
    atomic_write_text(args.out / f"apt_bar_{args.steps}{'_' + args.tag if args.tag else ''}.md", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
