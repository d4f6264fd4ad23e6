"""Dataset preparation tools: captioning, tagging, caption editing, resizing (tiny models built here)."""
from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

TOOLS = Path(__file__).resolve().parents[1] / "tools"
sys.path.insert(0, str(TOOLS))

import caption_images  # noqa: E402
import edit_captions  # noqa: E402
import resize_images  # noqa: E402
import tag_images  # noqa: E402
from library.utils.toolmain import run_tool  # noqa: E402

TAGS = [("9999", "general", 9), ("9998", "sensitive", 9), ("9997", "questionable", 9), ("9996", "explicit", 9),
        ("1", "red_hair", 0), ("2", "blue_sky", 0), ("3", "simple_background", 0), ("4", "^_^", 0),
        ("5", "hero_(character)", 4)]


def colour_images(folder: Path, recursive: bool = False) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, colour in (("red", (230, 20, 20)), ("blue", (20, 20, 230)), ("white", (250, 250, 250))):
        path = folder / f"{name}.png"
        Image.new("RGB", (40, 30), colour).save(path)
        paths.append(path)
    if recursive:
        (folder / "sub").mkdir(exist_ok=True)
        Image.new("RGB", (30, 30), (230, 20, 20)).save(folder / "sub" / "deep.jpg")
        paths.append(folder / "sub" / "deep.jpg")
    (folder / "broken.png").write_bytes(b"not an image")
    return paths


@pytest.fixture(scope="module")
def blip_folder(tmp_path_factory) -> Path:
    """A tiny random BLIP-architecture captioner with its processor, saved like any BLIP folder."""
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    folder = tmp_path_factory.mktemp("blip")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "a", "photo", "of", "red", "blue", "circle"]
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    tokenizer = BertTokenizer(str(folder / "vocab.txt"), bos_token="[DEC]")
    config = BlipConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=16),
        text_config=dict(vocab_size=len(words), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, encoder_hidden_size=32, bos_token_id=5, pad_token_id=0,
                         sep_token_id=3, eos_token_id=3),
        projection_dim=32)
    torch.manual_seed(0)
    BlipForConditionalGeneration(config).save_pretrained(str(folder))
    BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}),
                  tokenizer=tokenizer).save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def tagger_folder(tmp_path_factory) -> Path:
    """A tiny ONNX tagger: tag scores from the mean B, G, R of an NHWC 0-255 BGR image."""

    class Tagger(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, len(TAGS))
            w = torch.zeros(len(TAGS), 3)
            b = torch.full((len(TAGS),), -6.0)
            w[4, 2] = 12.0     # red_hair: red channel (BGR index 2)
            w[5, 0] = 12.0     # blue_sky: blue channel
            b[6] = 0.0         # simple_background: always 0.5
            w[7, 1] = 12.0     # ^_^: green channel (white images)
            w[8, 2] = 8.0      # hero_(character): red too (p ~0.77), character category
            b[0] = 3.0         # rating general
            self.lin.weight.data, self.lin.bias.data = w, b

        def forward(self, x):
            return torch.sigmoid(self.lin(x.mean(dim=(1, 2)) / 255.0))

    folder = tmp_path_factory.mktemp("tagger")
    torch.onnx.export(Tagger(), torch.zeros(1, 32, 32, 3), str(folder / "model.onnx"), input_names=["input_1:0"],
                      output_names=["predictions_sigmoid"], dynamic_axes={"input_1:0": {0: "batch"}}, dynamo=False)
    with open(folder / "selected_tags.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["tag_id", "name", "category", "count"])
        for tag_id, name, cat in TAGS:
            writer.writerow([tag_id, name, cat, 100])
    return folder


# --- caption_images ---------------------------------------------------------------------------

def test_captions_written_for_every_image_with_prefix(tmp_path, blip_folder, capsys):
    images = colour_images(tmp_path / "imgs", recursive=True)
    assert caption_images.main([str(tmp_path / "imgs"), "--model", str(blip_folder), "--prefix", "sks, ",
                                "--recursive", "--batch_size", "2", "--max_length", "5"]) == 0
    for path in images:
        text = path.with_suffix(".txt").read_text()
        assert text.startswith("sks, ") and text.endswith("\n")
    out = capsys.readouterr()
    assert "broken.png" in out.err and "4 captions written" in out.out and "1 unreadable" in out.out


def test_captioning_skips_existing_unless_overwrite_and_dry_run_writes_nothing(tmp_path, blip_folder, capsys):
    images = colour_images(tmp_path / "imgs")
    images[0].with_suffix(".txt").write_text("mine\n")
    assert caption_images.main([str(tmp_path / "imgs"), "--model", str(blip_folder), "--dry_run"]) == 0
    assert images[0].with_suffix(".txt").read_text() == "mine\n" and not images[1].with_suffix(".txt").exists()
    assert caption_images.main([str(tmp_path / "imgs"), "--model", str(blip_folder), "--suffix", ", end"]) == 0
    assert images[0].with_suffix(".txt").read_text() == "mine\n"
    assert images[1].with_suffix(".txt").read_text().endswith(", end\n")
    assert caption_images.main([str(tmp_path / "imgs"), "--model", str(blip_folder), "--overwrite",
                                "--extension", ".caption", "--num_beams", "2"]) == 0
    assert images[0].with_suffix(".caption").exists()
    assert "subfolders" not in capsys.readouterr().err
    # Images only in a subfolder and no --recursive: the error points at the option.
    colour_images(tmp_path / "nested" / "sub")
    assert run_tool(caption_images.main, [str(tmp_path / "nested"), "--model", str(blip_folder)]) == 2
    assert "subfolders" in capsys.readouterr().err


def test_missing_model_folder_names_the_layout(tmp_path, capsys):
    colour_images(tmp_path / "imgs")
    assert run_tool(caption_images.main, [str(tmp_path / "imgs"), "--model", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --model") and "config.json" in err and "model.safetensors" in err
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text("{}")
    assert run_tool(caption_images.main, [str(tmp_path / "imgs"), "--model", str(tmp_path / "half")]) == 2
    assert "missing model.safetensors, processor_config.json" in capsys.readouterr().err


# --- tag_images -------------------------------------------------------------------------------

def test_tags_thresholds_and_ordering(tmp_path, tagger_folder, capsys):
    images = colour_images(tmp_path / "imgs", recursive=True)
    assert tag_images.main([str(tmp_path / "imgs"), "--model", str(tagger_folder), "--recursive"]) == 0
    red = images[0].with_suffix(".txt").read_text().strip()
    assert red == "red_hair, simple_background"  # character below 0.85, rating not asked
    assert images[1].with_suffix(".txt").read_text().strip() == "blue_sky, simple_background"
    assert (tmp_path / "imgs" / "sub" / "deep.txt").exists()
    assert "broken.png" in capsys.readouterr().err
    assert tag_images.main([str(tmp_path / "imgs"), "--model", str(tagger_folder), "--overwrite",
                            "--character_threshold", "0.5", "--character_tags_first", "--include_rating",
                            "--replace_underscores", "--undesired_tags", "simple background",
                            "--general_threshold", "0.6"]) == 0
    assert images[0].with_suffix(".txt").read_text().strip() == "general, hero (character), red hair"
    white = images[2].with_suffix(".txt").read_text().strip()
    assert "^_^" in white  # kaomoji keep their underscores
    assert tag_images.main([str(tmp_path / "imgs"), "--model", str(tagger_folder), "--overwrite",
                            "--always_first_tags", "simple_background", "--caption_separator", "|"]) == 0
    assert images[0].with_suffix(".txt").read_text().strip() == "simple_background|red_hair"


def test_tags_append_and_skip(tmp_path, tagger_folder):
    images = colour_images(tmp_path / "imgs")
    images[0].with_suffix(".txt").write_text("sks, red_hair\n")
    images[1].with_suffix(".txt").write_text("keep me\n")
    assert tag_images.main([str(tmp_path / "imgs"), "--model", str(tagger_folder), "--append"]) == 0
    assert images[0].with_suffix(".txt").read_text().strip() == "sks, red_hair, simple_background"
    assert images[1].with_suffix(".txt").read_text().strip() == "keep me, blue_sky, simple_background"
    images[2].with_suffix(".txt").write_text("untouched\n")
    assert tag_images.main([str(tmp_path / "imgs"), "--model", str(tagger_folder)]) == 0
    assert images[2].with_suffix(".txt").read_text() == "untouched\n"
    # An existing caption that is not UTF-8 is left as it was under --append; the others are tagged.
    images[1].with_suffix(".txt").write_bytes(b"\xff\xfe bad")
    images[2].with_suffix(".txt").unlink()
    assert tag_images.main([str(tmp_path / "imgs"), "--model", str(tagger_folder), "--append"]) == 0
    assert images[1].with_suffix(".txt").read_bytes() == b"\xff\xfe bad"
    assert images[2].with_suffix(".txt").is_file()
    # A blank separator splits on spaces (it used to stop with a traceback).
    images[0].with_suffix(".txt").write_text("sks red_hair\n")
    assert tag_images.main([str(tmp_path / "imgs"), "--model", str(tagger_folder), "--append",
                            "--caption_separator", " "]) == 0
    assert images[0].with_suffix(".txt").read_text().strip() == "sks red_hair simple_background"


def test_tagger_preprocessing_pads_white_and_uses_bgr():
    img = Image.new("RGB", (20, 10), (255, 0, 0))
    arr = tag_images.prepare(img, 20)
    assert arr.shape == (20, 20, 3) and arr.dtype == np.float32
    assert tuple(arr[10, 10]) == (0.0, 0.0, 255.0)     # red in BGR order
    assert tuple(arr[0, 10]) == (255.0, 255.0, 255.0)  # white padding above


def test_tagger_missing_model_is_a_clear_error(tmp_path, capsys):
    colour_images(tmp_path / "imgs")
    assert run_tool(tag_images.main, [str(tmp_path / "imgs"), "--model", str(tmp_path)]) == 2
    assert "expected a folder with model.onnx and selected_tags.csv" in capsys.readouterr().err


# --- edit_captions and resize_images ----------------------------------------------------------

def test_edit_captions(tmp_path, capsys):
    folder = tmp_path / "imgs"
    images = colour_images(folder)
    images[0].with_suffix(".txt").write_text("1girl, red hair, watermark, red hair\n")
    images[1].with_suffix(".txt").write_text("blue sky, sks dog\n")
    assert edit_captions.main([str(folder), "--replace", "1girl=1woman", "--remove", "watermark", "--add", "photo",
                               "--dedupe", "--trigger", "sks dog"]) == 0
    assert images[0].with_suffix(".txt").read_text() == "sks dog, 1woman, red hair, photo\n"
    assert images[1].with_suffix(".txt").read_text() == "sks dog, blue sky, photo\n"
    assert edit_captions.main([str(folder), "--show_frequency"]) == 0
    out = capsys.readouterr().out
    assert "2  sks dog" in out and "2 without a caption file" in out
    assert edit_captions.main([str(folder), "--remove", "photo", "--dry_run"]) == 0
    assert "photo" in images[0].with_suffix(".txt").read_text()
    assert run_tool(edit_captions.main, [str(folder)]) == 2
    with pytest.raises(SystemExit):  # argparse: "'txt': must start with a dot, e.g. .txt", not a traceback
        edit_captions.main([str(folder), "--add", "x", "--extension", "txt"])
    assert "must start with a dot" in capsys.readouterr().err
    # An unreadable caption is reported and left as it is; the others are still edited.
    images[1].with_suffix(".txt").write_bytes(b"\xff\xfe bad")
    assert edit_captions.main([str(folder), "--add", "new"]) == 0
    assert images[0].with_suffix(".txt").read_text() == "sks dog, 1woman, red hair, photo, new\n"
    assert images[1].with_suffix(".txt").read_bytes() == b"\xff\xfe bad"
    assert "1 unreadable" in capsys.readouterr().out


def test_resize_images_keeps_captions_and_skips_bad_files(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    Image.new("RGB", (2000, 1000), (10, 200, 10)).save(src / "wide.jpg")
    Image.new("RGB", (300, 200), (10, 10, 200)).save(src / "small.png")
    (src / "wide.txt").write_text("a wide image\n")
    (src / "bad.webp").write_bytes(b"")
    assert resize_images.main([str(src), str(tmp_path / "dst"), "--max_resolution", "512x512", "--divisible_by",
                               "64"]) == 0
    wide = Image.open(tmp_path / "dst" / "wide.jpg")
    assert wide.size[0] * wide.size[1] <= 512 * 512 and wide.size[0] % 64 == 0 and wide.size[1] % 64 == 0
    assert wide.size == (704, 320)  # 724 x 362 after scaling, cropped to multiples of 64
    assert (tmp_path / "dst" / "wide.txt").read_text() == "a wide image\n"
    assert Image.open(tmp_path / "dst" / "small.png").size == (256, 192)  # only cropped to multiples of 64
    out = capsys.readouterr()
    assert "bad.webp" in out.err and "2 written" in out.out
    assert resize_images.main([str(src), str(tmp_path / "dst"), "--format", "png"]) == 0
    assert (tmp_path / "dst" / "wide.png").exists()
    assert run_tool(resize_images.main, [str(src), str(src)]) == 2
    # Smaller than --divisible_by: reported and skipped, never padded with black.
    Image.new("RGB", (50, 200), (10, 10, 200)).save(src / "thin.png")
    capsys.readouterr()
    assert resize_images.main([str(src), str(tmp_path / "dst2"), "--divisible_by", "64"]) == 0
    assert not (tmp_path / "dst2" / "thin.png").exists() and "thin.png: 50x200" in capsys.readouterr().err
