"""kohya users' files work unchanged: every sd-scripts option has an answer, a kohya_ss GUI config trains."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest

from library.config import kohya_options
from library.config.dataset import COMMON, DATASET_LEVEL
from library.config.loader import all_options, build_config
from library.errors import UserError
from tests.helpers import make_images, run_main

sd_scripts_options = kohya_options.sd_scripts_options


def answer(name: str) -> str | None:
    found = kohya_options.describe(name, set(all_options()), set(COMMON) | set(DATASET_LEVEL))
    return found and found[0]


def test_every_sd_scripts_option_has_an_answer():
    names = sd_scripts_options()
    assert len(names) > 190  # the whole list, not a sample
    unanswered = [n for n in names if answer(n) is None]
    assert unanswered == []
    # the table answers only names sd-scripts (or the GUI) has, and never shadows one of our options
    stale = [k.name for k in kohya_options.KEYS if not k.gui and k.name not in names]
    assert stale == []
    assert not set(kohya_options.TABLE) & set(all_options())


def test_answers_cover_all_four_kinds():
    answers = {n: answer(n) for n in sd_scripts_options()}
    assert answers["network_dim"] == "supported" and answers["enable_bucket"] == "mapped"
    assert answers["xformers"] == "mapped"
    assert answers["persistent_data_loader_workers"] == "no effect"
    assert answers["full_fp16"] == "refused"


def gui_config(tmp_path: Path, model: Path, images: Path, **extra) -> Path:
    """A flat config as the kohya_ss GUI writes it for an SD1.5 LoRA (its keys, its value spellings)."""
    root = images.parent
    train = root / "train"
    (train / "2_shape").mkdir(parents=True, exist_ok=True)
    for p in images.iterdir():
        (train / "2_shape" / p.name).write_bytes(p.read_bytes())
    values = {
        "bucket_no_upscale": True, "bucket_reso_steps": 64, "cache_latents": True, "caption_extension": ".txt",
        "clip_skip": 1, "dynamo_backend": "no", "enable_bucket": True, "epoch": 1, "gradient_accumulation_steps": 1,
        "huber_c": 0.1, "huber_scale": 1, "huber_schedule": "snr", "learning_rate": 0.001,
        "logging_dir": str(tmp_path / "logs"), "loss_type": "l2", "lr_scheduler": "constant",
        "lr_scheduler_args": [], "lr_scheduler_num_cycles": 1, "lr_scheduler_power": 1, "lr_warmup_steps": 0,
        "max_bucket_reso": 128, "max_data_loader_n_workers": 0, "max_grad_norm": 1, "max_timestep": 1000,
        "max_token_length": 75, "max_train_steps": 2, "mem_eff_attn": True, "min_bucket_reso": 64,
        "mixed_precision": "no", "network_alpha": 2, "network_args": [], "network_dim": 4,
        "network_module": "networks.lora", "network_train_unet_only": True, "noise_offset_type": "Original",
        "optimizer_args": ["weight_decay=0.01"], "optimizer_type": "torch.optim.AdamW",
        "output_dir": str(tmp_path / "out"), "output_name": "gui_lora", "persistent_data_loader_workers": 1,
        "pretrained_model_name_or_path": str(model), "prior_loss_weight": 1, "resolution": "64,64",
        "sample_sampler": "euler_a", "save_every_n_epochs": 1, "save_model_as": "safetensors",
        "save_precision": "fp16", "sdpa": True, "seed": 1234, "train_batch_size": 2, "train_data_dir": str(train),
        "wandb_run_name": "gui_lora", "log_with": "tensorboard",
        **extra,
    }
    from library.devkit import toml_value

    path = tmp_path / "gui.toml"
    path.write_text("\n".join(f"{k} = {toml_value(v)}" for k, v in values.items() if v is not None) + "\n")
    return path


def test_gui_config_loads_with_mapped_values(tmp_path, tiny_models, images):
    cfg = build_config(str(gui_config(tmp_path, tiny_models["sd15"], images)), [])
    assert cfg.training.attention == "sdpa"
    assert cfg.optimizer.optimizer_type == "AdamW"       # "torch.optim.AdamW"
    ds = cfg.dataset.datasets[0]
    assert ds.resolution == (64, 64) and ds.enable_bucket and ds.max_bucket_reso == 128   # top-level dataset keys
    assert ds.subsets[0].num_repeats == 2 and ds.subsets[0].class_tokens == "shape"
    no_effect = " ".join(cfg.kohya_no_effect)
    assert "persistent_data_loader_workers" in no_effect and "epoch" in no_effect and "wandb_run_name" in no_effect
    assert "save_model_as" not in no_effect            # mapped: what is written anyway


def test_gui_config_trains_with_one_info_line(tmp_path, tiny_models, images, caplog):
    path = gui_config(tmp_path, tiny_models["sd15"], images, xformers=None, sdpa=True,
                      optimizer_type="bitsandbytes.optim.AdamW8bit")
    text = path.read_text().replace('optimizer_type = "bitsandbytes.optim.AdamW8bit"', 'optimizer_type = "AdamW"')
    text += 'lr_scheduler_type = "torch.optim.lr_scheduler.StepLR"\n'
    text = text.replace("lr_scheduler_args = []", 'lr_scheduler_args = ["step_size=1", "gamma=0.5"]')
    path.write_text(text)
    with caplog.at_level(logging.INFO):
        code, out, err = run_main(["--config", str(path), "--log_with", "none"])
    assert code == 0, err
    assert (tmp_path / "out" / "gui_lora.safetensors").exists()
    lines = [r.getMessage() for r in caplog.records if "kohya options with no effect" in r.getMessage()]
    assert len(lines) == 1 and "persistent_data_loader_workers" in lines[0]


@pytest.mark.parametrize("path, name", [("bitsandbytes.optim.AdamW8bit", "AdamW8bit"), ("prodigyopt.Prodigy", "Prodigy"),
                                        ("adamw8bit", "AdamW8bit"), ("torch.optim.RAdam", "torch.optim.RAdam")])
def test_optimizer_class_paths(tmp_path, tiny_models, images, path, name):
    cfg = build_config(str(gui_config(tmp_path, tiny_models["sd15"], images, optimizer_type=path)), [])
    assert cfg.optimizer.optimizer_type == name


def test_class_path_optimizer_and_scheduler_are_built(tmp_path):
    import torch

    from library.train.optimizers import build_optimizer
    from library.train.schedules import build_scheduler

    p = torch.nn.Parameter(torch.ones(2))
    opt = build_optimizer("torch.optim.RAdam", ["weight_decay=0.1"], [{"params": [p], "lr": 0.5}], 0.5)
    assert type(opt).__name__ == "RAdam" and opt.param_groups[0]["weight_decay"] == 0.1
    sched = build_scheduler("constant", opt, 10, 0, scheduler_type="torch.optim.lr_scheduler.StepLR",
                            scheduler_args=["step_size=2", "gamma=0.1"])
    lrs = []
    for _ in range(4):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.5, 0.5, 0.05, 0.05])


@pytest.mark.parametrize("extra, needle", [
    ({"save_model_as": "ckpt"}, "save_model_as = 'ckpt'"),
    ({"full_fp16": True}, "full_fp16"),
    ({"weighted_captions": True}, "weighted_captions"),
    ({"t5xxl": "t5.safetensors"}, "t5xxl"),
    ({"optimizer_type": "DAdaptAdam"}, "D-Adaptation"),
    ({"network_train_text_encoder_only": True}, "network_train_text_encoder_only"),
])
def test_refused_keys_name_key_and_reason(tmp_path, tiny_models, images, extra, needle):
    with pytest.raises(UserError) as exc:
        build_config(str(gui_config(tmp_path, tiny_models["sd15"], images, **extra)), [])
    message = str(exc.value)
    assert needle in message and "\n" not in message
    key = next(iter(extra))
    assert key in message


def test_inactive_refused_keys_pass(tmp_path, tiny_models, images):
    cfg = build_config(str(gui_config(tmp_path, tiny_models["sd15"], images, full_fp16=False, fp8_base=False,
                                      token_warmup_min=1, save_n_epoch_ratio=0)), [])
    assert cfg.kohya_no_effect  # and no error


def test_mapped_conflicts_with_our_option(tmp_path, tiny_models, images):
    path = gui_config(tmp_path, tiny_models["sd15"], images, sdpa=None, xformers=True)
    path.write_text(path.read_text() + '[training]\nattention = "sdpa"\n')
    with pytest.raises(UserError, match="xformers.*attention"):
        build_config(str(path), [])


def test_kohya_sections_are_flattened(tmp_path, tiny_models, images):
    """kohya's documented layout: any [*_arguments] tables, flattened."""
    make_images(tmp_path / "img", 2)
    path = tmp_path / "sections.toml"
    path.write_text(f"""
[model_arguments]
pretrained_model_name_or_path = "{tiny_models['sd15']}"
[additional_network_arguments]
network_module = "networks.lora"
network_dim = 4
[optimizer_arguments]
optimizer_type = "AdamW8bit"
learning_rate = 1e-4
[training_arguments]
xformers = true
max_token_length = 75
persistent_data_loader_workers = true
[dataset_arguments]
resolution = 64
[[datasets]]
[[datasets.subsets]]
image_dir = "{tmp_path / 'img'}"
""")
    cfg = build_config(str(path), [])
    assert cfg.training.attention == "xformers" and cfg.optimizer.optimizer_type == "AdamW8bit"
    assert cfg.network.network_dim == 4 and cfg.dataset.datasets[0].resolution == (64, 64)


def test_kohya_keys_on_the_command_line(tmp_path, tiny_models, images):
    from library.config.cli import parse_argv

    path = gui_config(tmp_path, tiny_models["sd15"], images, sdpa=None, mem_eff_attn=None)
    cmd = parse_argv(["--config", str(path), "--xformers", "--persistent_data_loader_workers", "--seed", "3"])
    cfg = build_config(cmd.config_file, cmd.overrides)
    assert cfg.training.attention == "xformers" and cfg.training.seed == 3


def test_sdxl_gui_config_with_a_dataset_toml_trains(tmp_path, tiny_models, images):
    """The SDXL case: the GUI's flat config pointing at a kohya dataset TOML, long captions read with
    max_token_length, LoRA+ in network_args, Adafactor with kohya's arguments."""
    for p in images.glob("*.txt"):
        p.write_text(", ".join(f"tag{i} word{i}" for i in range(20)))  # over 75 tokens
    dataset = tmp_path / "dataset.toml"
    dataset.write_text(f"""[general]
shuffle_caption = true
caption_extension = ".txt"
keep_tokens = 1

[[datasets]]
resolution = 64
batch_size = 2

  [[datasets.subsets]]
  image_dir = "{images}"
  num_repeats = 1
""")
    path = gui_config(tmp_path, tiny_models["sdxl"], images, train_data_dir=None, dataset_config=str(dataset),
                      no_half_vae=True, max_token_length=150, optimizer_type="Adafactor",
                      optimizer_args=["scale_parameter=False", "relative_step=False", "warmup_init=False"],
                      lr_scheduler="constant_with_warmup", network_args=["loraplus_lr_ratio=4"], max_train_steps=1,
                      cache_latents=False, max_bucket_reso=64, mem_eff_attn=None)
    cfg = build_config(str(path), [])
    assert cfg.dataset.datasets[0].enable_bucket          # the GUI's top-level enable_bucket, below [general]
    assert cfg.dataset.datasets[0].subsets[0].keep_tokens == 1 and cfg.network.loraplus_lr_ratio == 4
    code, _, err = run_main(["--config", str(path), "--log_with", "none"])
    assert code == 0, err
    from safetensors import safe_open

    with safe_open(str(tmp_path / "out" / "gui_lora.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["ss_base_model_version"].startswith("sdxl") and "loraplus_lr_ratio" in meta["ss_network_args"]


def test_in_json_fine_tune_dataset(tmp_path, tiny_models, images):
    meta = tmp_path / "meta.json"
    meta.write_text('{"img00": {"caption": "a disc"}, "img01": {"tags": "disc, red"}}')
    path = gui_config(tmp_path, tiny_models["sd15"], images, train_data_dir=str(images), in_json=str(meta),
                      dataset_repeats=3)
    cfg = build_config(str(path), [])
    sub = cfg.dataset.datasets[0].subsets[0]
    assert sub.metadata_file == str(meta) and sub.num_repeats == 3 and sub.image_dir == str(images)


def test_option_list_extractor_reads_argparse_calls(tmp_path):
    """tools/list_sd_scripts_options.py follows setup_parser into the add_*_arguments helpers."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    import list_sd_scripts_options

    (tmp_path / "library").mkdir()
    (tmp_path / "library" / "train_util.py").write_text(
        "def add_training_arguments(parser, flag):\n    parser.add_argument('--seed', type=int)\n"
        "    if flag:\n        parser.add_argument('--xformers', action='store_true')\n")
    (tmp_path / "train_network.py").write_text(
        "from library import train_util\ndef setup_parser():\n    parser = None\n"
        "    train_util.add_training_arguments(parser, True)\n    parser.add_argument('--network_dim')\n")
    (tmp_path / "sdxl_train_network.py").write_text(
        "import train_network\ndef setup_parser():\n    parser = train_network.setup_parser()\n"
        "    parser.add_argument('--cache_text_encoder_outputs')\n    return parser\n")
    found = list_sd_scripts_options.collect(tmp_path)
    assert found == {"seed": {"train_network", "sdxl_train_network"}, "xformers": {"train_network",
                     "sdxl_train_network"}, "network_dim": {"train_network", "sdxl_train_network"},
                     "cache_text_encoder_outputs": {"sdxl_train_network"}}


def test_metadata_options_are_written(tmp_path, tiny_models, images):
    from safetensors import safe_open

    path = gui_config(tmp_path, tiny_models["sd15"], images, metadata_title="Round things", metadata_author="me",
                      metadata_tags="disc, shape", training_comment="trained for a test", max_train_steps=1,
                      metadata_thumbnail="data:image/png;base64,AAAA")
    code, _, err = run_main(["--config", str(path), "--log_with", "none"])
    assert code == 0, err
    with safe_open(str(tmp_path / "out" / "gui_lora.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["modelspec.title"] == "Round things" and meta["modelspec.author"] == "me"
    assert meta["modelspec.tags"] == "disc, shape" and meta["ss_training_comment"] == "trained for a test"
    assert "modelspec.license" not in meta and "modelspec.thumbnail" not in meta
