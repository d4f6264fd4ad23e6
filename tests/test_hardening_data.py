"""Messy datasets and options (issue 26): images, captions, dataset tables and options a user gets
wrong. Each case either trains what the user meant or stops with one line naming the file, image,
key or folder; unit-level (data and config layers), no model is loaded."""
from __future__ import annotations

import logging
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from library.config.dataset import parse_blueprint
from library.config.loader import build_config
from library.models.families import get_family
from library.data.captions import read_caption_file
from library.data.dataset import TrainingData
from library.data.images import BadImage, find_images, inspect_image, load_image, probe_image
from library.data.summary import dataset_warnings, log_dataset, long_captions
from library.errors import UserError
from library.train.optimizers import parse_optimizer_args
from library.train.prompts import load_prompts, parse_line
from tests.helpers import make_images, write_config


def one(folder: Path, **subset) -> dict:
    return {"datasets": [{"resolution": 64, "subsets": [{"image_dir": str(folder), **subset}]}]}


def scan(doc: dict, skip_bad_images: bool = False, batch_size: int = 1) -> TrainingData:
    return TrainingData(parse_blueprint(doc, "ds.toml", Path(".")), native_resolution=64,
                        default_batch_size=batch_size, seed=0, skip_bad_images=skip_bad_images)


def png(width: int, height: int, bit_depth: int, colour_type: int, rows: bytes) -> bytes:
    """A PNG written chunk by chunk: 16-bit colour, and headers that claim any size."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


# --- images -------------------------------------------------------------------------------------

# A 16x8 image with a red top-left pixel, shown by viewers per EXIF orientation: (size, red pixel (x, y)).
ORIENTATIONS = {1: ((16, 8), (0, 0)), 2: ((16, 8), (15, 0)), 3: ((16, 8), (15, 7)), 4: ((16, 8), (0, 7)),
                5: ((8, 16), (0, 0)), 6: ((8, 16), (7, 0)), 7: ((8, 16), (7, 15)), 8: ((8, 16), (0, 15))}


@pytest.mark.parametrize("orientation", sorted(ORIENTATIONS))
def test_exif_orientation_is_applied_as_viewers_show_it(tmp_path, orientation):
    img = Image.new("RGB", (16, 8), (0, 0, 0))
    img.putpixel((0, 0), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = orientation
    img.save(tmp_path / "o.png", exif=exif)  # PNG: lossless, so the red pixel stays one pixel
    size, red = ORIENTATIONS[orientation]
    loaded = load_image(tmp_path / "o.png").rgb
    assert loaded.size == size == probe_image(tmp_path / "o.png")
    arr = np.asarray(loaded)
    assert tuple(int(v) for v in np.unravel_index(np.argmax(arr[..., 0]), arr.shape[:2]))[::-1] == red


def test_png_transparent_colour_is_composited_on_white_like_an_alpha_channel(tmp_path):
    rgb = Image.new("RGB", (8, 8), (10, 20, 30))
    rgb.putpixel((0, 0), (200, 0, 0))
    rgb.save(tmp_path / "rgb.png", transparency=(10, 20, 30))  # every (10, 20, 30) pixel is transparent
    loaded = load_image(tmp_path / "rgb.png", keep_alpha_mask=True)
    assert loaded.rgb.getpixel((1, 1)) == (255, 255, 255) and loaded.rgb.getpixel((0, 0)) == (200, 0, 0)
    assert loaded.mask[1, 1] == 0.0 and loaded.mask[0, 0] == 1.0
    Image.new("L", (8, 8), 7).save(tmp_path / "gray.png", transparency=7)
    assert load_image(tmp_path / "gray.png").rgb.getpixel((0, 0)) == (255, 255, 255)
    pal = Image.new("P", (8, 8), 3)
    pal.putpalette([0, 200, 0] * 256)
    pal.save(tmp_path / "pal.png", transparency=3)
    assert load_image(tmp_path / "pal.png").rgb.getpixel((0, 0)) == (255, 255, 255)


def test_16_bit_colour_and_alpha_become_8_bit(tmp_path):
    (tmp_path / "rgb16.png").write_bytes(png(4, 4, 16, 2, (b"\x00" + b"\xff\xff\x00\x00\x80\x00" * 4) * 4))
    assert load_image(tmp_path / "rgb16.png").rgb.getpixel((0, 0)) == (255, 0, 128)
    # RGBA 16-bit: red at half opacity on white
    (tmp_path / "rgba16.png").write_bytes(png(4, 4, 16, 6, (b"\x00" + b"\xff\xff\x00\x00\x00\x00\x80\x00" * 4) * 4))
    r, g, b = load_image(tmp_path / "rgba16.png").rgb.getpixel((0, 0))
    assert r == 255 and 125 <= g <= 129 and g == b


@pytest.mark.parametrize("ext", [".png", ".webp"])
def test_animated_image_trains_its_first_frame_and_is_said_once(tmp_path, ext):
    folder = make_images(tmp_path / "imgs", 2)
    frames = [Image.new("RGB", (64, 64), (255, 0, 0)), Image.new("RGB", (64, 64), (0, 255, 0))]
    frames[0].save(folder / f"anim{ext}", save_all=True, append_images=frames[1:], lossless=True)
    (folder / "anim.txt").write_text("an animation")
    assert inspect_image(folder / f"anim{ext}").frames == 2
    assert load_image(folder / f"anim{ext}").rgb.getpixel((0, 0)) == (255, 0, 0)
    data = scan(one(folder))
    assert data.report.animated == [str(folder / f"anim{ext}")]
    said = [m for m in dataset_warnings(data) if "animated" in m]
    assert said == [f"1 animated images: only the first frame of each is trained: {folder / f'anim{ext}'}"]


@pytest.mark.parametrize("size", [(1, 1), (1, 600), (7, 64)])
def test_images_smaller_than_a_latent_cell_are_refused_naming_them(tmp_path, size):
    folder = make_images(tmp_path / "imgs", 2)
    Image.new("RGB", size, (9, 9, 9)).save(folder / "tiny.png")
    with pytest.raises(UserError) as err:
        scan(one(folder))
    assert str(err.value).startswith(f"{folder / 'tiny.png'}: {size[0]}x{size[1]} pixels is too small to train on")
    assert "at least 8 pixels" in str(err.value) and "skip_bad_images = true" in str(err.value)
    data = scan(one(folder), skip_bad_images=True)
    assert len(data.records) == 2 and "tiny.png" in data.report.bad_images[0]


def test_decompression_bomb_is_refused_and_large_images_reported_once(tmp_path, monkeypatch):
    # Pillow's limits scaled down (warning above 1000 pixels, error above 2000): no huge file is needed
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    folder = make_images(tmp_path / "imgs", 1, size=(20, 20))
    Image.new("RGB", (40, 40), (1, 2, 3)).save(folder / "large.png")   # 1600 pixels: allowed, said once
    (folder / "bomb.png").write_bytes(png(50, 50, 8, 0, b"\x00" * 51 * 50))  # 2500 pixels: refused
    with pytest.raises(UserError) as err:
        scan(one(folder))
    assert str(err.value).startswith(f"{folder / 'bomb.png'}: larger than the 0 megapixels an image may have")
    with pytest.raises(BadImage, match="decompression bomb"):
        load_image(folder / "bomb.png")
    data = scan(one(folder), skip_bad_images=True)
    assert data.report.large == [str(folder / "large.png")]
    assert sum("larger than 89 megapixels" in m for m in dataset_warnings(data)) == 1


def test_the_content_decides_the_format_not_the_extension(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("RGB", (16, 16), (0, 0, 255)).save(folder / "jpeg_named.png", format="JPEG")
    Image.new("RGB", (16, 16), (0, 255, 0)).save(folder / "png_named.webp", format="PNG")
    data = scan(one(folder))
    assert [r.size for r in data.records] == [(16, 16), (16, 16)]
    assert load_image(folder / "png_named.webp").rgb.getpixel((0, 0)) == (0, 255, 0)
    (folder / "text.jpg").write_text("<html>not an image</html>")
    with pytest.raises(UserError, match=r"text\.jpg: cannot be decoded as an image"):
        scan(one(folder))


def test_uppercase_extensions_and_their_captions(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("RGB", (16, 16)).save(folder / "IMG_0001.JPG")
    (folder / "IMG_0001.TXT").write_text("a camera photo")
    Image.new("RGB", (16, 16)).save(folder / "b.PNG")
    (folder / "b.txt").write_text("lower-case caption")
    data = scan(one(folder))
    assert [(r.path.name, r.caption) for r in data.records] == [("IMG_0001.JPG", "a camera photo"),
                                                                ("b.PNG", "lower-case caption")]


def test_names_with_spaces_and_non_ascii(tmp_path):
    folder = tmp_path / "données d'été"
    folder.mkdir()
    Image.new("RGB", (16, 16)).save(folder / "mon chat 猫 é.png")
    (folder / "mon chat 猫 é.txt").write_text("un chat, 猫", encoding="utf-8")
    data = scan(one(folder))
    assert [(r.path.name, r.caption) for r in data.records] == [("mon chat 猫 é.png", "un chat, 猫")]
    from library.data.summary import tag_frequency
    assert tag_frequency(data) == {"données d'été": {"un chat": 1, "猫": 1}}


def test_symlink_loops_in_image_folders_are_reported_never_followed(tmp_path):
    folder = make_images(tmp_path / "imgs", 2)
    (folder / "back").symlink_to(folder)               # a folder loop: never followed
    (folder / "self.png").symlink_to(folder / "self.png")  # a file link to itself
    assert len(find_images(tmp_path, recursive=True)) == 3
    with pytest.raises(UserError) as err:
        scan(one(folder))
    assert str(err.value).startswith(f"{folder / 'self.png'}: a symbolic link that loops")
    (folder / "self.png").unlink()
    (folder / "gone.png").symlink_to(tmp_path / "deleted.png")
    with pytest.raises(UserError, match=r"gone\.png: a symbolic link to .*deleted\.png, which does not exist"):
        scan(one(folder))
    data = scan(one(folder), skip_bad_images=True)
    assert len(data.records) == 2 and len(data.report.bad_images) == 1
    (tmp_path / "loop_dir").symlink_to(tmp_path / "loop_dir")
    with pytest.raises(UserError, match="image_dir: not a folder"):
        scan(one(tmp_path / "loop_dir"))


def test_a_subset_whose_images_are_all_unreadable_is_an_error_naming_it(tmp_path):
    good = make_images(tmp_path / "good", 2)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.png").write_bytes(b"")
    (bad / "b.jpg").write_text("not a jpeg")
    doc = {"datasets": [{"resolution": 64, "subsets": [{"image_dir": str(good)}, {"image_dir": str(bad)}]}]}
    with pytest.raises(UserError) as err:
        scan(doc, skip_bad_images=True)
    assert str(err.value).startswith(f"ds.toml: [[datasets]] #1 [[datasets.subsets]] #2: none of the 2 images in "
                                     f"{bad} could be read (first: {bad / 'a.png'}: empty file (0 bytes))")


# --- captions -----------------------------------------------------------------------------------

@pytest.mark.parametrize("raw", [b"\xef\xbb\xbfred, circle\r\nsecond line\r\n", b"red, circle\rsecond\r",
                                 b"\r\n\r\n  red, circle  \r\n", "red, circle\n".encode("utf-16")])
def test_caption_bom_crlf_and_cr(tmp_path, raw):
    (tmp_path / "a.txt").write_bytes(raw)
    if raw.startswith(b"\xff\xfe"):  # UTF-16 is refused, naming the file
        with pytest.raises(Exception, match="a.txt: caption is not UTF-8 text"):
            read_caption_file(tmp_path / "a.txt")
    else:
        assert read_caption_file(tmp_path / "a.txt") == "red, circle"


def test_empty_caption_files_count_as_missing_and_are_said(tmp_path, caplog):
    folder = make_images(tmp_path / "imgs", 3)
    (folder / "img00.txt").write_bytes(b"")
    (folder / "img01.txt").write_bytes(b" \r\n\r\n")
    data = scan(one(folder, class_tokens="sks cat"))
    assert [r.caption for r in data.records] == ["sks cat", "sks cat", "a shape, colour 2, plain background"]
    assert data.report.empty_captions == [str(folder / "img00.txt"), str(folder / "img01.txt")]
    assert any(m.startswith("2 caption files are empty") for m in dataset_warnings(data))
    data = scan(one(folder))  # without class_tokens: an empty caption, with the missing-caption warning
    with caplog.at_level(logging.WARNING):
        log_dataset(data)
    text = caplog.text
    assert "2 images have no caption (no caption file, or an empty one)" in text and "2 caption files are empty" in text


def test_a_caption_path_that_is_a_folder_is_an_error_naming_it(tmp_path):
    folder = make_images(tmp_path / "imgs", 2)
    (folder / "img01.txt").unlink()
    (folder / "img01.txt").mkdir()
    with pytest.raises(UserError) as err:
        scan(one(folder))
    assert str(err.value).startswith(f"{folder / 'img01.txt'}: a folder where the caption file")


def test_captions_longer_than_the_token_limit_are_warned_once_per_image(tmp_path, caplog):
    folder = make_images(tmp_path / "imgs", 3)
    (folder / "img01.txt").write_text(", ".join(f"tag{i}" for i in range(60)))
    data = scan(one(folder, num_repeats=5))
    found = long_captions(data)
    assert [p for p, _ in found] == [str(folder / "img01.png")] and found[0][1] > 75
    with caplog.at_level(logging.WARNING):
        log_dataset(data)
    lines = [r.getMessage() for r in caplog.records if "tokens" in r.getMessage()]
    assert found[0][1] > 225  # so the hint can only offer 225 of them
    assert lines == [f"{folder / 'img01.png'}: the caption is {found[0][1]} tokens; the text encoder reads the first "
                     "75, the rest is ignored (max_token_length = 225 reads 225 of them)"]
    # a prefix counts: it is part of what the text encoder reads
    assert len(long_captions(scan(one(folder, caption_prefix="word " * 80)))) == 3


# --- dataset tables -----------------------------------------------------------------------------

def test_batch_larger_than_the_images_is_said(tmp_path):
    folder = make_images(tmp_path / "imgs", 2)
    data = scan(one(folder), batch_size=8)
    assert [len(b.items) for b in data.epoch_batches(1)] == [2]
    assert "ds.toml: [[datasets]] #1: batch size 8 is more than its 2 samples per epoch (images x num_repeats): " \
           "every step trains 2" in " ".join(dataset_warnings(data))
    assert not [m for m in dataset_warnings(scan(one(folder, num_repeats=4), batch_size=8)) if "batch size" in m]


def test_dataset_without_subsets_and_subsets_outside_a_dataset(tmp_path, images):
    model = tmp_path / "model"
    model.mkdir()
    ds = tmp_path / "ds.toml"
    for text, message in [
        ("[[datasets]]\nresolution = 64\n", "needs at least one [[datasets.subsets]] table with image_dir"),
        (f'[[datasets]]\nresolution = 64\n[[subsets]]\nimage_dir = "{images}"\n',
         "[[subsets]]: subsets belong to a dataset; write them as [[datasets.subsets]]"),
        (f'[genral]\nresolution = 64\n[[datasets]]\n[[datasets.subsets]]\nimage_dir = "{images}"\n',
         "[genral]: unknown table in a dataset file; did you mean [general]?"),
        (f'resolution = 64\n[[datasets]]\n[[datasets.subsets]]\nimage_dir = "{images}"\n',
         "resolution: a dataset key at the top level of the file is not used"),
    ]:
        ds.write_text(text)
        cfg = write_config(tmp_path / "c.toml", {"model": {"pretrained_model_name_or_path": str(model)},
                                                 "data": {"dataset_config": str(ds)}})
        with pytest.raises(UserError) as err:
            build_config(str(cfg), [])
        assert str(err.value).startswith(str(ds)) and message in str(err.value), err.value
    inline = tmp_path / "inline.toml"
    inline.write_text(f'pretrained_model_name_or_path = "{model}"\n[[subsets]]\nimage_dir = "{images}"\n')
    with pytest.raises(UserError, match=r"\[\[subsets\]\]: subsets belong to a dataset"):
        build_config(str(inline), [])


def test_two_subsets_on_the_same_folder_are_said(tmp_path):
    folder = make_images(tmp_path / "imgs", 2)
    doc = {"datasets": [{"resolution": 64, "subsets": [{"image_dir": str(folder)},
                                                       {"image_dir": str(folder) + "/", "flip_aug": True}]}]}
    data = scan(doc)
    assert len(data.records) == 4  # kohya's meaning: both subsets train the images
    said = [m for m in dataset_warnings(data) if "same folder" in m]
    assert said == [f"ds.toml: [[datasets]] #1 [[datasets.subsets]] #2: reads the same folder as [[datasets]] #1 "
                    f"[[datasets.subsets]] #1 ({folder}): each of its images is trained by both subsets; remove one "
                    "of them unless that is meant (num_repeats repeats images)"]


def test_keep_tokens_longer_than_the_caption_is_said(tmp_path):
    from library.data.captions import process_caption

    folder = make_images(tmp_path / "imgs", 2, caption="red, circle")
    (folder / "img01.txt").write_text("red, circle, plain, background, shape")
    data = scan(one(folder, shuffle_caption=True, keep_tokens=3))
    said = [m for m in dataset_warnings(data) if "keep_tokens" in m]
    assert said == ["ds.toml: [[datasets]] #1 [[datasets.subsets]] #1: keep_tokens = 3 keeps every tag of 1 captions, "
                    "which are therefore never shuffled or dropped (img00.png: 2 tags)"]
    import random
    assert process_caption("red, circle", data.records[0].subset, 1, random.Random(0)) == "red, circle"
    assert not [m for m in dataset_warnings(scan(one(folder, keep_tokens=3))) if "keep_tokens" in m]  # no shuffle


@pytest.mark.parametrize("family, resolution, message", [
    ("sdxl", 1000, "resolution 1000x1000: SDXL needs edges that are multiples of 32; use 992 or 1024"),
    ("sdxl", [1016, 1024], "resolution 1016x1024: SDXL needs edges that are multiples of 32; use 992 or 1024 by 1024"),
    ("sd15", 736, "resolution 736x736: SD1.x needs edges that are multiples of 64; use 704 or 768"),
])
def test_resolutions_off_the_models_grid_are_refused_naming_the_dataset(tmp_path, family, resolution, message):
    import json

    from library.models.shipped import CONFIG_ROOT

    configs = [json.loads((CONFIG_ROOT / family / part / "config.json").read_text()) for part in ("unet", "vae")]
    multiple = get_family({"sdxl": "sdxl", "sd15": "sd1"}[family]).latent_multiple(*configs)
    assert multiple == {"sdxl": 32, "sd15": 64}[family]
    folder = make_images(tmp_path / "imgs", 1)
    data = scan({"datasets": [{"resolution": resolution, "subsets": [{"image_dir": str(folder)}]}]})
    with pytest.raises(UserError) as err:
        data.check_grid(multiple, {"sdxl": "SDXL", "sd15": "SD1.x"}[family])
    assert str(err.value) == f"ds.toml: [[datasets]] #1: {message}"
    bucketed = scan({"datasets": [{"resolution": 1024, "enable_bucket": True, "bucket_reso_steps": 40,
                                   "subsets": [{"image_dir": str(folder)}]}]})
    with pytest.raises(UserError, match="set bucket_reso_steps to a multiple of"):
        bucketed.check_grid(multiple, "this model")
    scan({"datasets": [{"resolution": 1024, "subsets": [{"image_dir": str(folder)}]}]}).check_grid(multiple, "m")


# --- options ------------------------------------------------------------------------------------

@pytest.fixture
def base_config(tmp_path, images) -> Path:
    model = tmp_path / "model"
    model.mkdir()
    return write_config(tmp_path / "c.toml", {"model": {"pretrained_model_name_or_path": str(model)}},
                        [{"resolution": 64, "subsets": [{"image_dir": str(images)}]}])


@pytest.mark.parametrize("name, value", [
    ("learning_rate", "nan"), ("learning_rate", "inf"), ("learning_rate", "-inf"), ("unet_lr", "nan"),
    ("text_encoder_lr", "[1e-5, nan]"), ("lr_warmup_steps", "inf"), ("learning_rate", "0"),
])
def test_nan_and_infinite_learning_rates_are_refused(base_config, name, value):
    with pytest.raises(UserError) as err:
        build_config(str(base_config), [(name, value)])
    assert str(err.value).startswith(f"command line: --{name}: expected ") and "got" in str(err.value)


def test_nan_learning_rate_in_the_toml_file_and_optimizer_args(tmp_path, base_config):
    text = base_config.read_text()
    base_config.write_text("learning_rate = nan\n" + text)
    with pytest.raises(UserError, match=r"\[optimizer\] learning_rate: expected a number > 0, got nan"):
        build_config(str(base_config), [])
    for args in (["eps=1e999"], ["betas=(0.9, 1e999)"], ["lr=nan"], {"eps": float("inf")}):
        with pytest.raises(UserError, match=r"optimizer_args: (eps|betas|lr) = .* is not a finite number"):
            parse_optimizer_args(args)
    assert parse_optimizer_args(["weight_decay=0.01", "betas=(0.9,0.99)"]) == {"weight_decay": 0.01,
                                                                                "betas": (0.9, 0.99)}


@pytest.mark.parametrize("name", ["max_train_steps", "max_train_epochs"])
def test_zero_steps_are_refused(base_config, name):
    with pytest.raises(UserError, match=f"--{name}: expected an integer >= 1, got 0"):
        build_config(str(base_config), [(name, "0")])


@pytest.mark.parametrize("overrides, message", [
    ([("full_bf16", "true"), ("mixed_precision", "no")], 'full_bf16 needs mixed_precision = "bf16"'),
    ([("full_bf16", "true"), ("mixed_precision", "fp16")], 'full_bf16 needs mixed_precision = "bf16"'),
])
def test_contradictory_precision_options_are_refused(base_config, overrides, message):
    with pytest.raises(UserError, match=message):
        build_config(str(base_config), overrides)


def test_precision_the_machine_cannot_run_is_refused():
    from library.train.setup import resolve_precision

    with pytest.raises(UserError, match='mixed_precision = "fp16" needs a CUDA GPU'):
        resolve_precision("fp16", cpu=True)
    assert resolve_precision("auto", cpu=True) == "no"


@pytest.mark.parametrize("line, message", [
    ("a cat --w abc", "--w: expected a whole number of pixels, got 'abc'"),
    ("a cat --w", "--w: missing value"),
    ("a cat --w 500", "--w: expected at least 64 and a multiple of 8, got 500"),
    ("a cat --s 0", "--s: expected a positive number, got '0'"),
    ("a cat --s 2.5", "--s: expected a whole number, got '2.5'"),
    ("a cat --l nan", "--l: expected a finite number, got 'nan'"),
    ("a cat --l inf", "--l: expected a finite number, got 'inf'"),
    ("a cat --d 99999999999999999999999", "--d: expected a seed that fits in 64 bits"),
    ("a cat --ss turbo", "unknown sampler 'turbo'"),
    ("a cat --q 3", "unknown option --q; valid: --n --w --h --s --l --d --ss"),
    ("--w 512", "the line has options but no prompt"),
])
def test_bad_kohya_sample_prompt_options_are_one_line_errors(line, message):
    with pytest.raises(UserError) as err:
        parse_line(line, "prompts.txt:3")
    assert str(err.value).startswith("prompts.txt:3: ") and message in str(err.value)


def test_kohya_sample_prompt_options_are_case_insensitive(tmp_path):
    got = parse_line("a cat --W 512 --H 640 --D -1 --SS Euler", "p")
    assert (got.prompt, got.width, got.height, got.seed, got.sampler) == ("a cat", 512, 640, -1, "euler")
    toml = tmp_path / "p.toml"
    toml.write_text('[[prompt]]\nprompt = "a cat"\nscale = nan\n')
    with pytest.raises(UserError, match="prompt #1: scale: expected a finite number"):
        load_prompts(toml)
    toml.write_text('[[prompt]]\nprompt = 5\n')
    with pytest.raises(UserError, match="prompt #1: prompt: expected text, got 5"):
        load_prompts(toml)


@pytest.mark.parametrize("name", ["../escape", "sub/lora", "..", "a\\b", "", "   ", "bad\x00name"])
def test_output_name_with_a_path_is_refused(base_config, name):
    with pytest.raises(UserError) as err:
        build_config(str(base_config), [("output_name", name)])
    assert str(err.value).startswith(f"{base_config}: [saving] output_name: {name!r}")
    assert "plain file name" in str(err.value)


def test_plain_output_names_are_accepted(base_config):
    for name in ("my_lora", "my lora v2.1", "ジョン", ".hidden"):
        assert build_config(str(base_config), [("output_name", name)]).saving.output_name == name
