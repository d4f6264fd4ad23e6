"""Sample prompts (kohya text, TOML, JSON) and sample images during training."""
from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from library.config import build_config
from library.errors import UserError
from library.train.loop import Trainer
from library.train.prompts import SamplePrompt, load_prompts, parse_line
from tests.helpers import tiny_config


def test_text_format_with_every_option(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text(
        "# a comment line\n"
        "\n"
        "a photo of sks dog, on a beach --n blurry, lowres --w 1024 --h 768 --s 25 --l 6.5 --d 42 --ss euler\n"
        "  a plain prompt\n"
        "anime girl --ss dpm++ 2m karras --d 0\n"
        "two--dashes-inside --ss k_euler_a\n")
    prompts = load_prompts(path)
    assert prompts == [
        SamplePrompt("a photo of sks dog, on a beach", "blurry, lowres", 1024, 768, 25, 6.5, 42, "euler"),
        SamplePrompt("a plain prompt"),
        SamplePrompt("anime girl", seed=0, sampler="dpm++_2m_karras"),
        SamplePrompt("two--dashes-inside", sampler="euler_a"),
    ]


@pytest.mark.parametrize("line,message", [
    ("a cat --x 3", "unknown option --x; valid: --n --w --h --s --l --d --ss"),
    ("a cat --ss heun", "unknown sampler 'heun'"),
    ("a cat --w 100", "--w: expected at least 64 and a multiple of 8, got 100"),
    ("a cat --s many", "--s: expected a whole number, got 'many'"),
    ("--w 512", "the line has options but no prompt"),
])
def test_text_format_errors(line, message):
    with pytest.raises(UserError) as err:
        parse_line(line, "p.txt:3")
    assert str(err.value).startswith("p.txt:3: ") and message in str(err.value)


def test_toml_and_json_formats(tmp_path):
    kohya = tmp_path / "kohya.toml"
    kohya.write_text('[prompt]\nwidth = 768\nsample_steps = 12\nscale = 5\n\n'
                     '[[prompt.subset]]\nprompt = "a cat"\nseed = 3\n\n'
                     '[[prompt.subset]]\nprompt = "a dog"\nnegative_prompt = "ugly"\nwidth = 512\n'
                     'sample_sampler = "ddim"\n')
    assert load_prompts(kohya) == [SamplePrompt("a cat", "", 768, None, 12, 5.0, 3, None),
                                   SamplePrompt("a dog", "ugly", 512, None, 12, 5.0, None, "ddim")]
    plain = tmp_path / "plain.toml"
    plain.write_text('[[prompt]]\nprompt = "a cat"\nheight = 640\nguidance_scale = 4\nsteps = 9\n')
    assert load_prompts(plain) == [SamplePrompt("a cat", height=640, scale=4.0, steps=9)]
    as_json = tmp_path / "p.json"
    as_json.write_text(json.dumps([{"prompt": "a cat", "sampler": "dpm++ 2m", "seed": 1}]))
    assert load_prompts(as_json) == [SamplePrompt("a cat", seed=1, sampler="dpm++_2m")]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"prompt": "x", "cfg": 3}]))
    with pytest.raises(UserError, match="bad.json: prompt #1: unknown key 'cfg'"):
        load_prompts(bad)
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n")
    with pytest.raises(UserError, match="no prompts found"):
        load_prompts(empty)


def prompts_file(tmp_path, text: str):
    path = tmp_path / "prompts.txt"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("model", ["sd15", "sdxl"])
def test_samples_during_training(tmp_path, tiny_models, images, model):
    prompts = prompts_file(tmp_path, "a red circle --s 2 --d 11\na blue square --s 2 --w 128 --ss ddim\n")
    cfg = build_config(str(tiny_config(tmp_path, tiny_models[model], images, max_train_steps=4)),
                       [("sample_prompts", prompts), ("sample_every_n_steps", "2"), ("sample_at_first", "true")])
    trainer = Trainer(cfg)
    trainer.run()
    folder = tmp_path / "out" / "sample"
    names = sorted(p.name for p in folder.iterdir())
    # step and seed in every name; the second prompt's seed is the training seed (7) + its index
    assert names == ["lora_000000_00_11.png", "lora_000000_01_8.png", "lora_000000_grid.png",
                     "lora_000002_00_11.png", "lora_000002_01_8.png", "lora_000002_grid.png",
                     "lora_000004_00_11.png", "lora_000004_01_8.png", "lora_000004_grid.png"]
    assert Image.open(folder / "lora_000002_00_11.png").size == (64, 64)  # the training resolution
    assert Image.open(folder / "lora_000002_01_8.png").size == (128, 64)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logs = list((tmp_path / "out" / "logs").rglob("events.out.tfevents.*"))
    acc = EventAccumulator(str(logs[0].parent), size_guidance={"images": 0})
    acc.Reload()
    assert "samples/lora_000002_grid" in acc.Tags()["images"]


def test_sampling_does_not_change_training(tmp_path, tiny_models, images):
    results = []
    prompts = prompts_file(tmp_path, "a red circle --s 2\n")
    for n, extra in enumerate(([], [("sample_prompts", prompts), ("sample_every_n_steps", "1")])):
        d = tmp_path / f"r{n}"
        d.mkdir()
        cfg = build_config(str(tiny_config(d, tiny_models["sd15"], images)), [("save_precision", "float"), *extra])
        torch.manual_seed(0)
        results.append(load_file(str(Trainer(cfg).run())))
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])


@pytest.mark.parametrize("sampler", ["euler_a", "euler", "ddim", "dpm++_2m", "dpm++_2m_karras"])
def test_every_sampler(tmp_path, tiny_models, images, sampler):
    prompts = prompts_file(tmp_path, "a red circle --s 3 --d 1\n")
    cfg = build_config(str(tiny_config(tmp_path, tiny_models["sd15"], images, max_train_steps=1)),
                       [("sample_prompts", prompts), ("sample_at_first", "true"), ("sample_sampler", sampler),
                        ("log_with", "none")])
    trainer = Trainer(cfg)
    images_out = trainer.reporting.sampler.run(trainer.parts.bundle, trainer.parts.bundle.unet, trainer.parts.device, 0,
                                     trainer.parts.accelerator.autocast)
    assert len(images_out) == 2 and images_out[0][1].size == (64, 64)


def test_samples_every_n_epochs(tmp_path, tiny_models, images):
    prompts = prompts_file(tmp_path, "a red circle --s 2 --d 3\n")
    cfg = build_config(str(tiny_config(tmp_path, tiny_models["sd15"], images, max_train_steps=6)),
                       [("sample_prompts", prompts), ("sample_every_n_epochs", "2")])
    trainer = Trainer(cfg)
    assert trainer.parts.plan.steps_per_epoch == 2  # 4 images, batch 2: epochs end at steps 2, 4, 6
    trainer.run()
    grids = sorted(p.name for p in (tmp_path / "out" / "sample").glob("*_grid.png"))
    # after epoch 2 (step 4), and at the end of the run (step 6, epoch 3)
    assert grids == ["lora_000004_grid.png", "lora_000006_grid.png"]
