"""Where relative paths in configs point.

kohya resolves every relative path against the current folder, and users' configs rely on that;
a dataset TOML kept next to its images is easier to move around, so a relative input path that
does not exist from the current folder is looked up next to the TOML file that names it.
"""
from __future__ import annotations

from pathlib import Path


def resolve_input(value: str, base_dir: Path | None) -> str:
    path = Path(value).expanduser()
    if path.is_absolute() or path.exists() or base_dir is None:
        return str(path)
    beside = base_dir / path
    return str(beside) if beside.exists() else str(path)


def looked_in(value: str, base_dir: Path | None) -> str:
    """Where `resolve_input` looked, for error messages."""
    if Path(value).expanduser().is_absolute() or base_dir is None:
        return ""
    return f" (looked in the current folder and in {base_dir})"


LATENT_CACHE_FOLDER = ".latent_cache"  # inside each image folder when latent_cache_dir is unset


def output_locations(cfg) -> list[tuple[Path, str]]:
    """Every folder a training run writes to, with the option that chose it (for error messages)."""
    out = Path(cfg.saving.output_dir).expanduser()
    places = [(out, "output_dir")]
    if cfg.logging.log_with != "none":
        places.append((Path(cfg.logging.logging_dir) if cfg.logging.logging_dir else out / "logs", "logging_dir"))
    if cfg.sampling.sample_prompts:
        places.append((out / "sample", "output_dir (sample images)"))
    if cfg.data.cache_latents_to_disk:
        if cfg.data.latent_cache_dir:
            places.append((Path(cfg.data.latent_cache_dir), "latent_cache_dir"))
        elif cfg.dataset is not None:
            for ds in cfg.dataset.datasets:
                for sub in ds.subsets:
                    if not sub.image_dir:
                        continue
                    places.append((Path(sub.image_dir) / LATENT_CACHE_FOLDER,
                                   "latent_cache_dir (unset: a .latent_cache folder in each image folder)"))
    return places


def check_output_locations(cfg) -> None:
    """Create every output folder of a run, or stop with a one-line error, before any model loads."""
    from library.utils.writable import writable_dir

    for path, option in output_locations(cfg):
        writable_dir(path, option)
