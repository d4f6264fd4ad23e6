"""Test helpers: image folders and config files (library.devkit, shared with the benches), tiny
trainers, running the entry point in-process."""
from __future__ import annotations

import io
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

from library.devkit import COLOURS, make_images, toml_value, write_config  # noqa: F401  (the tests' names)


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


def random_lora_file(model: Path, path: Path, spec, seed: int = 0):
    """(bundle, path): random_lora's network written to `path` as a kohya fp32 file, as a tool reads it."""
    import torch

    from library.lora.kohya_file import write_lora

    bundle, network = random_lora(model, spec, seed)
    write_lora(path, network.kohya_state_dict(torch.float32), {"ss_base_model_version": bundle.base_model_version})
    return bundle, path


def run_main(argv: list[str]) -> tuple[int, str, str]:
    """Run train_apt_lora.main in-process; returns (exit code, stdout, stderr)."""
    import train_apt_lora

    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = train_apt_lora.main(argv)
    return code, out.getvalue(), err.getvalue()
