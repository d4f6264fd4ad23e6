"""The indicator over a run: apt_indicator.csv and apt_indicator.png (gamma per bin over steps)."""
from __future__ import annotations

import csv
import io
from pathlib import Path

from library.apt.indicator import bin_ranges
from library.utils.atomic import atomic_write_bytes, atomic_write_text


def write_csv(path: Path, steps: list[int], gammas: list[list[float]], num_timesteps: int = 1000) -> None:
    ranges = bin_ranges(len(gammas[0]), num_timesteps) if gammas else []
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["step"] + [f"t{lo}-{hi}" for lo, hi in ranges])
    for step, row in zip(steps, gammas):
        writer.writerow([step] + [f"{g:.6f}" for g in row])
    atomic_write_text(path, out.getvalue())


def write_png(path: Path, steps: list[int], gammas: list[list[float]], num_timesteps: int = 1000,
              title: str = "APT overfitting indicator") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ranges = bin_ranges(len(gammas[0]), num_timesteps) if gammas else []
    bins = len(ranges)
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    cmap = plt.get_cmap("viridis")
    for b in range(bins):
        ax.plot(steps, [row[b] for row in gammas], color=cmap(b / max(bins - 1, 1)),
                label=f"t {ranges[b][0]}-{ranges[b][1]}")
    ax.set_xlabel("step")
    ax.set_ylabel("gamma (0 = no overfitting, 1 = memorising)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, title="timestep bin")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
