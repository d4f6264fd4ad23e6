"""Data pipeline: kohya dataset schema, images, captions, buckets, balancing, caches."""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from library.config.dataset import DatasetBlueprint, folder_blueprint, parse_blueprint
from library.config.loader import build_config
from library.data.buckets import BucketTable, bucket_resolutions
from library.data.captions import process_caption, read_caption_file
from library.data.dataset import TrainingData
from library.data.images import BadImage, load_image, probe_image
from library.data.latent_cache import LatentCache
from library.errors import UserError
from tests.helpers import make_images, run_main, write_config


def blueprint(doc: dict, base: Path = Path(".")) -> DatasetBlueprint:
    return parse_blueprint(doc, "ds.toml", base)


def one(image_dir, **subset) -> dict:
    return {"datasets": [{"resolution": 64, "subsets": [{"image_dir": str(image_dir), **subset}]}]}


# --- schema -----------------------------------------------------------------------------------

def test_precedence_subset_over_dataset_over_general_over_default(images):
    bp = blueprint({
        "general": {"shuffle_caption": True, "keep_tokens": 1, "caption_extension": ".cap", "batch_size": 3},
        "datasets": [
            {"keep_tokens": 2, "resolution": [96, 64], "subsets": [
                {"image_dir": str(images), "keep_tokens": 3},
                {"image_dir": str(images), "caption_extension": ".txt"},
            ]},
            {"batch_size": 5, "subsets": [{"image_dir": str(images)}]},
        ]})
    a, b = bp.datasets[0].subsets
    c = bp.datasets[1].subsets[0]
    assert (a.keep_tokens, b.keep_tokens, c.keep_tokens) == (3, 2, 1)                  # subset > dataset > general
    assert (a.caption_extension, b.caption_extension) == (".cap", ".txt")
    assert a.shuffle_caption and c.shuffle_caption                                      # general reaches every subset
    assert (a.num_repeats, a.flip_aug, a.caption_separator) == (1, False, ",")         # defaults
    assert bp.datasets[0].resolution == (96, 64) and bp.datasets[1].resolution is None
    assert (bp.datasets[0].batch_size, bp.datasets[1].batch_size) == (3, 5)


def test_alpha_mask_allowed_at_every_level(images):
    for doc in ({"general": {"alpha_mask": True}, **one(images)},
                {"datasets": [{"alpha_mask": True, "subsets": [{"image_dir": str(images)}]}]},
                one(images, alpha_mask=True)):
        assert blueprint(doc).datasets[0].subsets[0].alpha_mask


@pytest.mark.parametrize("doc,message", [
    ({"datasets": [{"subsets": [{"image_dir": "x", "resolution": 512}]}]},
     "ds.toml: [[datasets]] #1 [[datasets.subsets]] #1: resolution: not allowed here; it belongs in [general] or "
     "[[datasets]]"),
    ({"general": {"image_dir": "x"}, "datasets": [{"subsets": [{"image_dir": "x"}]}]},
     "ds.toml: [general]: image_dir: not allowed here; it belongs in [[datasets.subsets]]"),
    ({"datasets": [{"is_reg": True, "subsets": [{"image_dir": "x"}]}]},
     "ds.toml: [[datasets]] #1: is_reg: not allowed here; it belongs in [[datasets.subsets]]"),
    ({"datasets": [{"subsets": [{"image_dir": "x"}]}, {"subsets": [{"image_dir": "x", "num_repeat": 2}]}]},
     "ds.toml: [[datasets]] #2 [[datasets.subsets]] #1: num_repeat: unknown dataset key; did you mean num_repeats?"),
    ({"datasets": [{"bucket_reso_step": 64, "subsets": [{"image_dir": "x"}]}]},
     "ds.toml: [[datasets]] #1: bucket_reso_step: unknown dataset key; did you mean bucket_reso_steps?"),
    ({"general": {"enable_buckets": True}, "datasets": [{"subsets": [{"image_dir": "x"}]}]},
     "ds.toml: [general]: enable_buckets: unknown dataset key; did you mean enable_bucket?"),
    ({"datasets": [{"color_aug": True, "subsets": [{"image_dir": "x"}]}]},
     "ds.toml: [[datasets]] #1: color_aug: colour augmentation is not supported (kohya deprecated it too); remove the key"),
    ({"datasets": [{"subsets": [{"image_dir": "x", "num_repeats": 0}]}]},
     "ds.toml: [[datasets]] #1 [[datasets.subsets]] #1: num_repeats: expected an integer >= 1, got 0"),
    ({"datasets": [{"resolution": 500, "subsets": [{"image_dir": "x"}]}]},
     "ds.toml: [[datasets]] #1: resolution: expected 512 or [width, height] with edges >= 64 and divisible by 8, "
     "got [500, 500]"),
    ({"datasets": [{"subsets": [{"num_repeats": 2}]}]},
     "ds.toml: [[datasets]] #1 [[datasets.subsets]] #1: image_dir: required (the folder of this subset's images)"),
    ({"datasets": [{"resolution": 64}]},
     "ds.toml: [[datasets]] #1: needs at least one [[datasets.subsets]] table with image_dir"),
])
def test_misplaced_unknown_and_invalid_keys(doc, message):
    with pytest.raises(UserError) as err:
        blueprint(doc)
    assert str(err.value) == message


def test_folder_convention_only_with_train_data_dir(tmp_path):
    make_images(tmp_path / "train" / "10_sks dog", 2)
    make_images(tmp_path / "reg" / "1_dog", 3)
    bp = folder_blueprint(str(tmp_path / "train"), str(tmp_path / "reg"), {"resolution": 64}, "cfg.toml")
    subs = bp.datasets[0].subsets
    assert [(s.num_repeats, s.class_tokens, s.is_reg) for s in subs] == [(10, "sks dog", False), (1, "dog", True)]
    assert bp.datasets[0].resolution == (64, 64)
    (tmp_path / "train" / "dogs").mkdir()
    with pytest.raises(UserError, match="subfolder 'dogs' of .* is not named <repeats>_<caption tokens>"):
        folder_blueprint(str(tmp_path / "train"), None, {}, "cfg.toml")
    model = tmp_path / "model"
    model.mkdir()
    cfg = write_config(tmp_path / "c.toml", {"model": {"pretrained_model_name_or_path": str(model)},
                                             "data": {"train_data_dir": str(tmp_path / "reg")}})
    assert build_config(str(cfg), []).dataset.datasets[0].subsets[0].class_tokens == "dog"


# --- buckets ----------------------------------------------------------------------------------

def test_kohya_bucket_tables():
    b512 = bucket_resolutions((512, 512), 256, 1024, 64)
    assert b512 == [(256, 832), (256, 896), (256, 960), (256, 1024), (320, 704), (320, 768), (384, 640), (448, 576),
                    (512, 512), (576, 448), (640, 384), (704, 320), (768, 320), (832, 256), (896, 256), (960, 256),
                    (1024, 256)]
    b1024 = bucket_resolutions((1024, 1024), 256, 2048, 64)
    assert len(b1024) == 41
    assert {(832, 1216), (1216, 832), (896, 1152), (1024, 1024), (256, 2048)} <= set(b1024)


@pytest.mark.parametrize("size,bucket,resized", [
    ((1000, 500), (704, 320), (704, 352)),   # wide: nearest ratio 2.2, cover by width, crop rows
    ((600, 900), (384, 640), (427, 640)),    # portrait 0.667: nearest 0.6 (384x640), cover by height
    ((300, 300), (512, 512), (512, 512)),    # small square: upscaled
    ((512, 2048), (256, 1024), (256, 1024)),  # extreme portrait: the tallest bucket
])
def test_image_goes_to_nearest_aspect_bucket_and_covers_it(size, bucket, resized):
    table = BucketTable((512, 512), True, 256, 1024, 64, no_upscale=False)
    p = table.place(*size)
    assert (p.bucket, p.resized) == (bucket, resized)
    assert p.resized[0] >= p.bucket[0] and p.resized[1] >= p.bucket[1]


def test_bucket_no_upscale():
    table = BucketTable((512, 512), True, 256, 1024, 64, no_upscale=True)
    small = table.place(300, 200)
    assert small.resized == (300, 200) and small.bucket == (256, 192)
    big = table.place(2000, 1000)
    assert big.bucket[0] * big.bucket[1] <= 512 * 512 and big.bucket[0] % 64 == 0 and big.bucket[1] % 64 == 0
    assert big.resized[0] >= big.bucket[0] and big.resized[1] >= big.bucket[1]


def test_without_buckets_every_image_is_scaled_and_centre_cropped(tmp_path):
    folder = tmp_path / "imgs"
    make_images(folder, 1, size=(100, 60))
    data = TrainingData(blueprint(one(folder)), native_resolution=64, default_batch_size=1, seed=0)
    p = data.placements[0]
    assert p.bucket == (64, 64) and p.resized == (107, 64)
    s = data.sample(0, 1, "0:0")
    assert s.crop_left_top == (21, 0) and tuple(s.pixels.shape) == (3, 64, 64)
    # SDXL conditioning: true original size (h, w), crop (top, left), target (h, w)
    assert data.size_info(s) == (60, 100, 0, 21, 64, 64)


def test_sdxl_crop_offset_is_mirrored_when_flipped(tmp_path):
    folder = tmp_path / "imgs"
    make_images(folder, 1, size=(100, 60))
    data = TrainingData(blueprint(one(folder, flip_aug=True, random_crop=True)), native_resolution=64,
                        default_batch_size=1, seed=0)
    seen = set()
    for slot in range(40):
        s = data.sample(0, 1, str(slot))
        left = s.crop_left_top[0]
        expected_left = (107 - 64 - left) if s.flipped else left
        assert data.size_info(s)[3] == expected_left
        seen.add(s.flipped)
    assert seen == {True, False}


# --- images -----------------------------------------------------------------------------------

def test_exif_rotation_rgba_grayscale_palette_and_16_bit(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when shown
    Image.new("RGB", (80, 40), (255, 0, 0)).save(tmp_path / "rot.jpg", exif=exif)
    assert probe_image(tmp_path / "rot.jpg") == (40, 80)
    assert load_image(tmp_path / "rot.jpg").rgb.size == (40, 80)

    rgba = Image.new("RGBA", (8, 8), (0, 0, 255, 0))
    rgba.putpixel((0, 0), (0, 0, 255, 255))
    rgba.save(tmp_path / "alpha.png")
    loaded = load_image(tmp_path / "alpha.png", keep_alpha_mask=True)
    assert loaded.rgb.getpixel((1, 1)) == (255, 255, 255) and loaded.rgb.getpixel((0, 0)) == (0, 0, 255)
    assert loaded.mask[0, 0] == 1.0 and loaded.mask[1, 1] == 0.0

    Image.new("L", (8, 8), 100).save(tmp_path / "gray.png")
    assert load_image(tmp_path / "gray.png").rgb.getpixel((0, 0)) == (100, 100, 100)

    pal = Image.new("P", (8, 8))
    pal.putpalette([0, 200, 0] * 256)
    pal.save(tmp_path / "pal.png")
    assert load_image(tmp_path / "pal.png").rgb.getpixel((0, 0)) == (0, 200, 0)

    Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16)).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    assert load_image(tmp_path / "deep.png").rgb.getpixel((0, 0)) == (255, 255, 255)
    Image.fromarray(np.full((8, 8), 32768, dtype=np.uint16)).save(tmp_path / "mid.png")
    assert load_image(tmp_path / "mid.png").rgb.getpixel((0, 0))[0] in (127, 128)


def bad_folder(tmp_path) -> Path:
    folder = make_images(tmp_path / "imgs", 3)
    (folder / "empty.png").write_bytes(b"")
    good = (folder / "img00.png").read_bytes()
    (folder / "cut.png").write_bytes(good[: len(good) // 2])
    return folder


def test_corrupt_and_empty_images_stop_before_training_or_are_skipped(tmp_path):
    folder = bad_folder(tmp_path)
    with pytest.raises(UserError) as err:
        TrainingData(blueprint(one(folder)), native_resolution=64, default_batch_size=1, seed=0)
    assert "cut.png: cannot be decoded as an image" in str(err.value)
    assert "set skip_bad_images = true" in str(err.value)
    (folder / "cut.png").unlink()
    with pytest.raises(UserError, match=r"empty.png: empty file \(0 bytes\)"):
        TrainingData(blueprint(one(folder)), native_resolution=64, default_batch_size=1, seed=0)
    bad_folder(tmp_path)
    data = TrainingData(blueprint(one(folder)), native_resolution=64, default_batch_size=1, seed=0,
                        skip_bad_images=True)
    assert len(data.records) == 3 and len(data.report.bad_images) == 2
    with pytest.raises(BadImage):
        load_image(folder / "empty.png")


def test_no_images_and_missing_captions(tmp_path):
    empty = tmp_path / "none"
    empty.mkdir()
    with pytest.raises(UserError, match=f"no images in {empty}"):
        TrainingData(blueprint(one(empty)), native_resolution=64, default_batch_size=1, seed=0)
    folder = make_images(tmp_path / "imgs", 2)
    (folder / "img01.txt").unlink()
    data = TrainingData(blueprint(one(folder)), native_resolution=64, default_batch_size=1, seed=0)
    assert [r.caption for r in data.records][1] == "" and data.report.missing_captions == [str(folder / "img01.png")]
    data = TrainingData(blueprint(one(folder, class_tokens="sks cat")), native_resolution=64, default_batch_size=1,
                        seed=0)
    assert data.records[1].caption == "sks cat" and data.report.missing_captions == []


def test_captions_must_be_utf8_bom_tolerated(tmp_path):
    (tmp_path / "a.txt").write_bytes("\ufeffred, circle\nsecond line".encode("utf-8"))
    assert read_caption_file(tmp_path / "a.txt") == "red, circle"
    folder = make_images(tmp_path / "imgs", 1)
    (folder / "img00.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(UserError, match="img00.txt: caption is not UTF-8 text"):
        TrainingData(blueprint(one(folder)), native_resolution=64, default_batch_size=1, seed=0)


def test_metadata_file_captions(tmp_path):
    folder = make_images(tmp_path / "imgs", 2)
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({"img00": {"caption": "a photo", "tags": "red, round"},
                                str(folder / "img01.png"): {"tags": "blue"}}))
    bp = blueprint({"datasets": [{"resolution": 64, "subsets": [{"image_dir": str(folder),
                                                                  "metadata_file": str(meta)}]}]})
    data = TrainingData(bp, native_resolution=64, default_batch_size=1, seed=0)
    assert [r.caption for r in data.records] == ["a photo, red, round", "blue"]


# --- captions ---------------------------------------------------------------------------------

def subset(**kw):
    return blueprint({"datasets": [{"subsets": [{"image_dir": "x", **kw}]}]}).datasets[0].subsets[0]


def test_shuffle_keeps_tokens_and_is_deterministic_per_seed():
    sub = subset(shuffle_caption=True, keep_tokens=2)
    caption = "sks, dog, red, small, grass, sunny, park"
    runs = [process_caption(caption, sub, 1, random.Random(f"7:{i}")) for i in range(20)]
    assert all(r.startswith("sks, dog, ") for r in runs)
    assert all(sorted(r.split(", ")) == sorted(caption.split(", ")) for r in runs)
    assert len(set(runs)) > 5
    assert runs == [process_caption(caption, sub, 1, random.Random(f"7:{i}")) for i in range(20)]
    sep = subset(shuffle_caption=True, keep_tokens_separator="|||")
    out = process_caption("sks, dog ||| red, small, grass", sep, 1, random.Random(0))
    assert out.startswith("sks, dog, ") and "|||" not in out
    assert process_caption("sks, dog ||| red", subset(keep_tokens_separator="|||"), 1, random.Random(0)) == "sks, dog red"


def test_caption_dropout_prefix_suffix_and_tag_dropout():
    rng = random.Random(0)
    assert process_caption("a dog", subset(caption_prefix="sks", caption_suffix="photo"), 1, rng) == "sks a dog photo"
    assert process_caption("a dog", subset(caption_dropout_rate=1.0), 1, rng) == ""
    every = subset(caption_dropout_every_n_epochs=2)
    assert [process_caption("a dog", every, e, rng) for e in (1, 2, 3, 4)] == ["a dog", "", "a dog", ""]
    half = subset(caption_dropout_rate=0.5)
    dropped = sum(process_caption("a dog", half, 1, random.Random(i)) == "" for i in range(400))
    assert 150 < dropped < 250
    tags = subset(caption_tag_dropout_rate=0.5, keep_tokens=1)
    outs = [process_caption("sks, a, b, c, d, e, f, g", tags, 1, random.Random(i)) for i in range(200)]
    assert all(o.startswith("sks") for o in outs)
    kept = np.mean([len(o.split(", ")) - 1 for o in outs])
    assert 2.5 < kept < 4.5  # 7 droppable tags at rate 0.5
    # Deterministic per seed: the same seed drops the same captions and tags, another seed others.
    def run(seed):
        rng = random.Random(seed)
        both = subset(caption_dropout_rate=0.3, caption_tag_dropout_rate=0.4, keep_tokens=1)
        return [process_caption("sks, a, b, c, d, e, f, g", both, 1, rng) for _ in range(50)]
    assert run(3) == run(3) and run(3) != run(4)


# --- order, repeats, regularisation ----------------------------------------------------------

def test_regularisation_images_are_balanced_as_kohya(tmp_path):
    train = make_images(tmp_path / "train", 2)
    reg = make_images(tmp_path / "reg", 4)
    bp = blueprint({"datasets": [{"resolution": 64, "subsets": [
        {"image_dir": str(train), "num_repeats": 3}, {"image_dir": str(reg), "is_reg": True}]}]})
    data = TrainingData(bp, native_resolution=64, default_batch_size=2, seed=0)
    assert [r.repeats for r in data.records if r.subset.is_reg] == [2, 2, 1, 1]
    assert sum(r.repeats for r in data.records) == 12
    assert data.batches_per_epoch() == 6


def test_batches_stay_in_one_bucket_and_order_depends_on_seed_and_epoch(tmp_path):
    folder = tmp_path / "imgs"
    make_images(folder, 3, size=(64, 64))
    make_images(tmp_path / "wide", 3, size=(192, 64))
    for p in (tmp_path / "wide").iterdir():
        p.rename(folder / f"w_{p.name}")
    bp = blueprint({"datasets": [{"resolution": 64, "enable_bucket": True, "min_bucket_reso": 32,
                                  "max_bucket_reso": 128, "bucket_reso_steps": 32,
                                  "subsets": [{"image_dir": str(folder), "num_repeats": 2}]}]})
    data = TrainingData(bp, native_resolution=64, default_batch_size=2, seed=3)
    for ref in data.epoch_batches(1):
        assert {data.placements[i].bucket for i in ref.items} == {ref.bucket}
    assert {ref.bucket for ref in data.epoch_batches(1)} == {(64, 64), (96, 32)}
    again = TrainingData(bp, native_resolution=64, default_batch_size=2, seed=3)
    assert data.epoch_batches(1) == again.epoch_batches(1)
    assert data.epoch_batches(1) != data.epoch_batches(2)
    other = TrainingData(bp, native_resolution=64, default_batch_size=2, seed=4)
    assert data.epoch_batches(1) != other.epoch_batches(1)
    counts = {}
    for ref in data.epoch_batches(1):
        for i in ref.items:
            counts[i] = counts.get(i, 0) + 1
    assert set(counts.values()) == {2}  # num_repeats


def test_validation_split_holds_images_out(tmp_path):
    folder = make_images(tmp_path / "imgs", 10)
    bp = blueprint({"datasets": [{"resolution": 64, "validation_split": 0.2,
                                  "subsets": [{"image_dir": str(folder)}]}]})
    data = TrainingData(bp, native_resolution=64, default_batch_size=1, seed=0)
    assert len(data.validation) == 2 and len(data.train_indices()) == 8
    trained = {i for ref in data.epoch_batches(1) for i in ref.items}
    assert not trained & set(data.validation)


# --- latent cache -----------------------------------------------------------------------------

class CountingEncoder:
    """A stand-in VAE: 8x average pooling to 4 channels, counting the images it encodes."""

    def __init__(self):
        self.calls = 0

    def __call__(self, pixels):
        self.calls += pixels.shape[0]
        pooled = torch.nn.functional.avg_pool2d(pixels, 8)
        return torch.cat([pooled, pooled[:, :1]], dim=1)


def cache_for(bp, encoder, vae_id="vae-a", cache_dir=None):
    data = TrainingData(bp, native_resolution=64, default_batch_size=1, seed=0)
    cache = LatentCache(data, encoder, vae_id, to_disk=True, cache_dir=cache_dir)
    cache.fill()
    return cache


def test_disk_cache_hits_and_is_invalidated_by_image_resolution_and_vae(tmp_path):
    folder = make_images(tmp_path / "imgs", 3)
    bp = blueprint(one(folder, flip_aug=True))
    enc = CountingEncoder()
    first = cache_for(bp, enc)
    assert enc.calls == 6 and first.encoded == 6  # both orientations of 3 images
    entries = sorted((folder / ".latent_cache").iterdir())
    assert len(entries) == 6
    second = cache_for(bp, enc)
    assert enc.calls == 6 and second.hits == 6
    assert all(torch.equal(first.get(i, f)[0], second.get(i, f)[0]) for i in range(3) for f in (False, True))
    # Changing one image re-encodes just that image (both orientations) and drops its stale entries.
    Image.new("RGB", (64, 64), (0, 0, 0)).save(folder / "img01.png")
    third = cache_for(bp, enc)
    assert (third.encoded, third.hits) == (2, 4)
    assert len(list((folder / ".latent_cache").iterdir())) == 6
    # A new resolution and a new VAE are new keys too.
    bp96 = blueprint({"datasets": [{"resolution": 96, "subsets": [{"image_dir": str(folder), "flip_aug": True}]}]})
    data96 = TrainingData(bp96, native_resolution=64, default_batch_size=1, seed=0)
    c96 = LatentCache(data96, enc, "vae-a", to_disk=True)
    c96.fill()
    assert c96.encoded == 6
    assert cache_for(bp, enc, vae_id="vae-b").encoded == 6


def test_disk_cache_never_reads_a_damaged_entry(tmp_path):
    folder = make_images(tmp_path / "imgs", 1)
    bp = blueprint(one(folder))
    enc = CountingEncoder()
    cache = cache_for(bp, enc, cache_dir=str(tmp_path / "cache"))
    entry = next((tmp_path / "cache").iterdir())
    entry.write_bytes(entry.read_bytes()[:20])  # as if a crash cut it short
    again = cache_for(bp, enc, cache_dir=str(tmp_path / "cache"))
    assert again.encoded == 1 and torch.equal(again.get(0, False)[0], cache.get(0, False)[0])
    assert not list((tmp_path / "cache").glob("*.tmp"))


def test_cache_with_random_crop_is_refused_before_loading(tmp_path, images):
    model = tmp_path / "model"
    model.mkdir()
    cfg = write_config(tmp_path / "c.toml", {"model": {"pretrained_model_name_or_path": str(model)},
                                             "data": {"cache_latents": True}},
                       [{"subsets": [{"image_dir": str(images), "random_crop": True}]}])
    code, _, err = run_main(["--config", str(cfg)])
    assert code == 2 and "random_crop cannot be combined with cache_latents" in err
    code, _, err = run_main(["--config", str(cfg), "--cache_latents", "false", "--cache_text_encoder_outputs",
                             "true", "--network_train_unet_only", "false"])
    assert code == 2 and "cache_text_encoder_outputs cannot be used while training the text encoders" in err
    cfg2 = write_config(tmp_path / "c2.toml", {"model": {"pretrained_model_name_or_path": str(model)},
                                               "data": {"cache_text_encoder_outputs": True}},
                        [{"subsets": [{"image_dir": str(images), "shuffle_caption": True}]}])
    code, _, err = run_main(["--config", str(cfg2)])
    assert code == 2 and "shuffle_caption changes captions during training, so cache_text_encoder_outputs" in err


# --- check_dataset tool -----------------------------------------------------------------------

def test_check_dataset_json(tmp_path, capsys):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    import check_dataset

    folder = make_images(tmp_path / "imgs", 3, size=(64, 64))
    make_images(tmp_path / "w", 2, size=(192, 64))
    for p in (tmp_path / "w").iterdir():
        p.rename(folder / f"w_{p.name}")
    (folder / "broken.png").write_bytes(b"")
    ds = write_config(tmp_path / "ds.toml", {}, [{"resolution": 64, "enable_bucket": True, "min_bucket_reso": 32,
                                                  "max_bucket_reso": 128, "bucket_reso_steps": 32,
                                                  "subsets": [{"image_dir": str(folder), "num_repeats": 3}]}])
    assert check_dataset.main(["--dataset_config", str(ds), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["buckets"] == [{"width": 64, "height": 64, "count": 3}, {"width": 96, "height": 32, "count": 2}]
    assert rep["subsets"][0]["images"] == 5 and rep["subsets"][0]["samples_per_epoch"] == 15
    assert len(rep["bad_files"]) == 1 and "broken.png" in rep["bad_files"][0]
    assert rep["tag_frequency"]["a shape"] == 5
    assert check_dataset.main(["--dataset_config", str(ds)]) == 0
    text = capsys.readouterr().out
    assert "subset #1" in text and "96 x 32" in text and "broken.png" in text
