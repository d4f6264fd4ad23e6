"""Test helpers: image folders, config files, running the entry point in-process."""
from __future__ import annotations

import io
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = [(220, 40, 40), (40, 80, 220), (40, 180, 60), (230, 210, 40), (150, 60, 200), (240, 140, 30)]


def make_images(folder: Path, count: int, size: tuple[int, int] = (64, 64), caption: str | None = None,
                ext: str = ".png") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        img = Image.new("RGB", size, (240, 240, 240))
        draw = ImageDraw.Draw(img)
        w, h = size
        colour = COLOURS[i % len(COLOURS)]
        draw.ellipse((w // 4, h // 4, 3 * w // 4, 3 * h // 4), fill=colour)
        img.save(folder / f"img{i:02d}{ext}")
        (folder / f"img{i:02d}.txt").write_text(caption or f"a shape, colour {i}, plain background")
    return folder


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\") + '"'


def write_config(path: Path, tables: dict, datasets: list[dict] | None = None) -> Path:
    """tables: {"model": {...}, ...}; datasets: [{"resolution": 64, "subsets": [{...}]}]."""
    lines = []
    for table, values in tables.items():
        if isinstance(values, dict):
            lines.append(f"[{table}]")
            lines += [f"{k} = {toml_value(v)}" for k, v in values.items()]
        else:
            lines.insert(0, f"{table} = {toml_value(values)}")
    for ds in datasets or []:
        lines.append("[[datasets]]")
        lines += [f"{k} = {toml_value(v)}" for k, v in ds.items() if k != "subsets"]
        for sub in ds.get("subsets", []):
            lines.append("[[datasets.subsets]]")
            lines += [f"{k} = {toml_value(v)}" for k, v in sub.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def tiny_config(tmp_path: Path, model: Path, image_dir: Path, **training) -> Path:
    tables = {
        "model": {"pretrained_model_name_or_path": str(model)},
        "network": {"network_dim": 4, "network_alpha": 2.0},
        "optimizer": {"learning_rate": 1e-3},
        "training": {"max_train_steps": 3, "train_batch_size": 2, "seed": 7, **training},
        "saving": {"output_dir": str(tmp_path / "out"), "output_name": "lora"},
    }
    return write_config(tmp_path / "config.toml", tables, [{"resolution": 64, "subsets": [{"image_dir": str(image_dir)}]}])


def tiny_trainer(tmp_path: Path, model: Path, image_dir: Path, *overrides, **training):
    """A Trainer on `tiny_config` with command-line style overrides; logging off unless an override asks."""
    from library.config import build_config
    from library.train.loop import Trainer

    path = tiny_config(tmp_path, model, image_dir, **training)
    return Trainer(build_config(str(path), [("log_with", "none"), *overrides]))


def first_batch(trainer):
    """The trainer's first micro-batch of epoch 1, built as the loop builds it."""
    return trainer.parts.batches.build(trainer.parts.data.epoch_batches(1)[0], 1, 0)


def random_lora(model: Path, spec, seed: int = 0, scale: float = 0.2):
    """(bundle, network): a tiny model with random non-zero LoRA weights on every target of `spec`."""
    import torch

    from library.config.options import ModelOptions
    from library.lora.network import ADAPTER, LoraNetwork
    from library.models.loader import load_models

    bundle = load_models(ModelOptions(pretrained_model_name_or_path=str(model)))
    torch.manual_seed(seed)
    network = LoraNetwork(bundle.unet, bundle.text_encoders, bundle.arch, spec)
    with torch.no_grad():
        for _, layer in network.layers.values():
            for w in (layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight):
                w.copy_(torch.randn_like(w) * scale)
    return bundle, network


def run_main(argv: list[str]) -> tuple[int, str, str]:
    """Run train_apt_lora.main in-process; returns (exit code, stdout, stderr)."""
    import train_apt_lora

    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = train_apt_lora.main(argv)
    return code, out.getvalue(), err.getvalue()
