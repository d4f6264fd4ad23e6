"""Config: TOML + command line into one validated, read-only object; one-line errors."""
from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from library.config.cli import help_text, parse_argv
from library.config.loader import all_options, build_config
from library.errors import UserError
from tests.helpers import make_images, run_main, write_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def model_dir(tmp_path) -> Path:
    # Config validation only checks that the model path exists; no weights are read.
    folder = tmp_path / "model"
    (folder / "unet").mkdir(parents=True)
    return folder


def base_tables(model_dir: Path, **network) -> dict:
    return {"model": {"pretrained_model_name_or_path": str(model_dir)}, "network": {"network_dim": 8, **network}}


def dataset(image_dir: Path, **kw) -> list[dict]:
    return [{"resolution": 64, **kw, "subsets": [{"image_dir": str(image_dir)}]}]


def error_of(cfg_path: Path | None, *overrides: str) -> str:
    argv = (["--config", str(cfg_path)] if cfg_path else []) + list(overrides)
    code, out, err = run_main(argv)
    assert code == 2, (code, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def test_values_come_from_tables_top_level_and_cli(tmp_path, model_dir, images):
    path = write_config(tmp_path / "c.toml", {"learning_rate": 3e-4, **base_tables(model_dir)}, dataset(images))
    cfg = build_config(str(path), [("network_dim", "4"), ("cache_latents", "true"), ("text_encoder_lr", "[1e-5, 2e-5]")])
    assert cfg.network.network_dim == 4
    assert cfg.optimizer.learning_rate == 3e-4
    assert cfg.data.cache_latents is True
    assert cfg.optimizer.text_encoder_lr == (1e-5, 2e-5)
    assert cfg.optimizer.text_encoder_lrs(2) == [1e-5, 2e-5]
    assert cfg.network.alpha == 4.0  # unset alpha = dim (scale 1), explicit in the file
    assert cfg.dataset.datasets[0].resolution == (64, 64)


def test_config_is_read_only(tmp_path, model_dir, images):
    cfg = build_config(str(write_config(tmp_path / "c.toml", base_tables(model_dir), dataset(images))), [])
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.network.network_dim = 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.training = None
    assert isinstance(cfg.optimizer.optimizer_args, tuple)


def test_bare_boolean_flag_and_dotted_table_name(tmp_path, model_dir, images):
    path = write_config(tmp_path / "c.toml", base_tables(model_dir), dataset(images))
    cmd = parse_argv(["--config", str(path), "--cache_latents", "--network.network_dim", "2", "--seed=5"])
    cfg = build_config(cmd.config_file, cmd.overrides)
    assert cfg.data.cache_latents is True and cfg.network.network_dim == 2 and cfg.training.seed == 5


def test_unknown_key_in_file_suggests_closest(tmp_path, model_dir, images):
    path = write_config(tmp_path / "c.toml", base_tables(model_dir, network_dimm=4), dataset(images))
    msg = error_of(path)
    assert msg == f"error: {path}: [network] network_dimm: unknown option; did you mean network_dim?"


def test_unknown_option_on_command_line_suggests_closest(tmp_path, model_dir, images):
    path = write_config(tmp_path / "c.toml", base_tables(model_dir), dataset(images))
    assert error_of(path, "--max_train_step", "4") == \
        "error: command line: --max_train_step: unknown option; did you mean max_train_steps?"


def test_unknown_table_suggests_closest(tmp_path, model_dir, images):
    tables = base_tables(model_dir)
    tables["netwrk"] = {"network_dim": 4}
    path = write_config(tmp_path / "c.toml", tables, dataset(images))
    assert error_of(path) == f"error: {path}: [netwrk]: unknown table; did you mean network?"


def test_option_in_the_wrong_table(tmp_path, model_dir, images):
    tables = base_tables(model_dir)
    tables["training"] = {"network_alpha": 1.0}
    path = write_config(tmp_path / "c.toml", tables, dataset(images))
    assert error_of(path) == \
        f"error: {path}: [training] network_alpha: belongs in [network] (or at the top level), not in [training]"


def test_wrong_type_lists_what_is_allowed(tmp_path, model_dir, images):
    path = write_config(tmp_path / "c.toml", base_tables(model_dir, network_dim="eight"), dataset(images))
    assert error_of(path) == f"error: {path}: [network] network_dim: expected an integer >= 1, got 'eight'"
    path = write_config(tmp_path / "c.toml", base_tables(model_dir), dataset(images))
    assert error_of(path, "--mixed_precision", "fp32") == \
        "error: command line: --mixed_precision: expected one of 'auto', 'no', 'fp16', 'bf16', got 'fp32'"
    assert error_of(path, "--cache_latents", "maybe") == \
        "error: command line: --cache_latents: expected true or false, got 'maybe'"


def test_out_of_range(tmp_path, model_dir, images):
    path = write_config(tmp_path / "c.toml", base_tables(model_dir, network_dropout=1.5), dataset(images))
    assert error_of(path) == f"error: {path}: [network] network_dropout: expected a number >= 0 and < 1, got 1.5"


def test_missing_required_option(tmp_path, images):
    path = write_config(tmp_path / "c.toml", {"network": {"network_dim": 4}}, dataset(images))
    assert error_of(path) == (f"error: {path}: [model] pretrained_model_name_or_path: required option missing; "
                              "set it in [model] or pass --pretrained_model_name_or_path")


def test_missing_model_path(tmp_path, images):
    path = write_config(tmp_path / "c.toml", {"model": {"pretrained_model_name_or_path": "nowhere/model.safetensors"}},
                        dataset(images))
    msg = error_of(path)
    assert msg.startswith(f"error: {path}: [model] pretrained_model_name_or_path: no such model file or folder: "
                          "nowhere/model.safetensors")
    assert error_of(path, "--pretrained_model_name_or_path", "/no/such.safetensors") == \
        "error: command line: --pretrained_model_name_or_path: no such model file or folder: /no/such.safetensors"


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".bin"])
def test_pickle_checkpoint_needs_opt_in(tmp_path, images, suffix):
    ckpt = tmp_path / f"model{suffix}"
    ckpt.write_bytes(b"not really a pickle")
    path = write_config(tmp_path / "c.toml", {"model": {"pretrained_model_name_or_path": str(ckpt)}}, dataset(images))
    assert error_of(path) == (
        f"error: {path}: [model] pretrained_model_name_or_path: model{suffix} is a pickle checkpoint, which can run "
        "arbitrary code when loaded; convert it to .safetensors, or set allow_pickle = true if you trust its source")
    cfg = build_config(str(path), [("allow_pickle", "true")])
    assert cfg.model.allow_pickle


def test_no_dataset(tmp_path, model_dir):
    path = write_config(tmp_path / "c.toml", base_tables(model_dir))
    assert "no dataset; set dataset_config" in error_of(path)


def test_dataset_config_file_and_inline_tables(tmp_path, model_dir, images):
    ds = write_config(tmp_path / "ds.toml", {}, dataset(images, batch_size=3))
    path = write_config(tmp_path / "c.toml", {"data": {"dataset_config": str(ds)}, **base_tables(model_dir)})
    cfg = build_config(str(path), [])
    assert cfg.dataset.source == str(ds) and cfg.dataset.datasets[0].batch_size == 3
    both = write_config(tmp_path / "c2.toml", {"data": {"dataset_config": str(ds)}, **base_tables(model_dir)},
                        dataset(images))
    assert "both dataset_config and inline [[datasets]]" in error_of(both)


def test_relative_paths_from_cwd_or_next_to_the_file(tmp_path, model_dir, monkeypatch):
    folder = tmp_path / "project"
    make_images(folder / "imgs", 1)
    path = write_config(folder / "c.toml", base_tables(model_dir), [{"subsets": [{"image_dir": "imgs"}]}])
    monkeypatch.chdir(tmp_path)  # "imgs" does not exist here, so it is found beside the file
    cfg = build_config(str(path), [])
    assert Path(cfg.dataset.datasets[0].subsets[0].image_dir) == folder / "imgs"


def test_print_config_shows_resolved_values(tmp_path, model_dir, images):
    path = write_config(tmp_path / "c.toml", base_tables(model_dir), dataset(images))
    code, out, err = run_main(["--config", str(path), "--print_config", "--learning_rate", "2e-4"])
    assert code == 0, err
    assert "learning_rate = 0.0002" in out and "network_dim = 8" in out and "# vae = (unset)" in out
    assert f'image_dir = "{images}"' in out
    import tomllib

    assert tomllib.loads(out)["network"]["network_dim"] == 8  # the output is itself valid TOML


def test_help_lists_every_option_with_default():
    text = help_text()
    for name, info in all_options().items():
        assert f"--{name} (" in text, name
    assert "--network_dim (an integer >= 1; default 16)" in text
    assert "--pretrained_model_name_or_path (a string; required)" in text
    code, out, _ = run_main(["--help"])
    assert code == 0 and out == text


def test_kohya_names_are_used():
    names = set(all_options())
    for kohya in ("pretrained_model_name_or_path", "output_dir", "output_name", "network_dim", "network_alpha",
                  "learning_rate", "unet_lr", "text_encoder_lr", "max_train_steps", "mixed_precision", "seed",
                  "dataset_config", "network_train_unet_only", "network_weights", "conv_dim", "conv_alpha",
                  "network_dropout", "v_parameterization", "vae", "save_precision", "cache_latents",
                  "gradient_accumulation_steps", "gradient_checkpointing", "clip_skip", "prior_loss_weight",
                  "max_grad_norm", "optimizer_type", "optimizer_args", "train_batch_size", "lr_scheduler"):
        assert kohya in names, kohya


def test_real_process_exit_code_and_no_traceback(tmp_path, model_dir, images):
    """The same errors from a real `python train_apt_lora.py` process (no torch import on this path)."""
    path = write_config(tmp_path / "c.toml", base_tables(model_dir, network_dimm=4), dataset(images))
    proc = subprocess.run([sys.executable, str(REPO / "train_apt_lora.py"), "--config", str(path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: {path}: [network] network_dimm: unknown option; did you mean network_dim?"
    assert proc.stdout == ""


def test_error_raised_before_any_model_loads(tmp_path, images, monkeypatch):
    import library.train.builder as builder

    # The name the training run calls (a patch of library.models.loader.load_models would not be seen).
    monkeypatch.setattr(builder, "load_models", lambda *a, **k: pytest.fail("model loaded"))
    path = write_config(tmp_path / "c.toml", {"model": {"pretrained_model_name_or_path": str(tmp_path)},
                                              "training": {"max_train_steps": 0}}, dataset(images))
    assert "max_train_steps: expected an integer >= 1, got 0" in error_of(path)


def test_user_error_type():
    with pytest.raises(UserError):
        build_config(None, [])
