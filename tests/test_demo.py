"""The embedded demo: world generator, shipped base model and classifier, training scripts, preset."""
from __future__ import annotations

import dataclasses
import hashlib
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from library.demo.models import BASE_MODEL, CLASSIFIER, CONCEPT_DIR, load_classifier
from library.demo.world import SHAPES, Scene, held_out_pairs, render, scenes

REPO = Path(__file__).resolve().parents[1]


def digest(images) -> str:
    h = hashlib.sha256()
    for img in images:
        h.update(np.asarray(img).tobytes())
    return h.hexdigest()


def test_world_is_deterministic_and_captioned():
    a = list(scenes(5, 30))
    assert a == list(scenes(5, 30)) and a != list(scenes(6, 30))
    assert digest(render(s) for s in a) == digest(render(s) for s in scenes(5, 30))
    s = Scene("star", "red", "small", "blue", "striped")
    assert s.caption() == "a small red star on a striped blue background"
    assert Scene("heart", "white", "large", "black", "plain").caption() == "a large white heart on a black background"
    assert Scene("crescent", "yellow", "large", "blue", "plain").caption() == \
        "a large yellow sks crescent on a blue background"
    img = np.asarray(render(s))
    assert img.shape == (64, 64, 3)
    assert tuple(img[32, 32]) == (215, 35, 35)  # the shape's colour at the centre
    held = held_out_pairs()
    assert len(held) == 8 and all(shape in SHAPES for shape, _ in held)
    assert not any((x.shape, x.colour) in held for x in scenes(1, 500, exclude=held))


def test_shipped_base_model_loads_in_the_trainer_and_in_plain_diffusers():
    from diffusers import StableDiffusionPipeline

    from library.config.options import ModelOptions
    from library.models.loader import load_models

    bundle = load_models(ModelOptions(pretrained_model_name_or_path=str(BASE_MODEL)))
    assert bundle.arch == "sd1" and bundle.native_resolution == 64
    size = sum(p.stat().st_size for p in BASE_MODEL.rglob("*") if p.is_file())
    assert size < 25 * 2 ** 20
    pipe = StableDiffusionPipeline.from_pretrained(str(BASE_MODEL), local_files_only=True)
    assert {pipe.unet.dtype, pipe.vae.dtype, pipe.text_encoder.dtype} == {torch.float32}  # fp16 on disk, fp32 loaded
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a large red star on a white background", num_inference_steps=8, guidance_scale=5.0,
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)
    assert np.asarray(image).std() > 5  # an image, not a flat colour


def test_shipped_classifier_reads_rendered_scenes():
    from library.demo.evaluate import accuracy, score

    classifier = load_classifier()
    assert CLASSIFIER.stat().st_size < 5 * 2 ** 20
    test = list(scenes(4242, 64))
    acc = accuracy(score(classifier, [render(s) for s in test]), test)
    assert acc["shape"] > 0.9 and acc["colour"] > 0.9 and acc["background"] > 0.9


def test_concept_set_is_shipped_with_captions():
    images = sorted(CONCEPT_DIR.glob("*.png"))
    assert 4 <= len(images) <= 6
    for path in images:
        assert Image.open(path).size == (64, 64)
        assert "sks crescent" in path.with_suffix(".txt").read_text()


def test_training_scripts_run_a_few_steps(tmp_path):
    base = subprocess.run([sys.executable, "tools/train_demo_base.py", "--work", str(tmp_path / "work"), "--out",
                           str(tmp_path / "model"), "--images", "64", "--vae_steps", "2", "--text_steps", "2",
                           "--unet_steps", "3"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert base.returncode == 0, base.stderr[-2000:]
    assert (tmp_path / "model" / "unet" / "config.json").is_file()
    assert '"dtype": "float32"' in (tmp_path / "model" / "text_encoder" / "config.json").read_text()
    again = subprocess.run([sys.executable, "tools/train_demo_base.py", "--work", str(tmp_path / "work"), "--out",
                            str(tmp_path / "model2"), "--resume", "--stages", "export"], cwd=REPO,
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    a = (tmp_path / "model" / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    b = (tmp_path / "model2" / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    assert a == b  # resumed from the work folder: the same weights
    clf = subprocess.run([sys.executable, "tools/train_demo_classifier.py", "--steps", "2", "--batch", "8", "--out",
                          str(tmp_path / "c.safetensors")], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert clf.returncode == 0, clf.stderr[-2000:]
    assert load_classifier(tmp_path / "c.safetensors") is not None


def test_demo_preset_runs_as_in_readme(tmp_path):
    """README's main job (with fewer steps), from the repository root as README runs it."""
    proc = subprocess.run([sys.executable, "train_apt_lora.py", "--config", "presets/demo.toml", "--max_train_steps",
                           "4", "--sample_every_n_steps", "4", "--output_dir", str(tmp_path / "out")],
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "out"
    assert (out / "demo_lora.safetensors").is_file() and (out / "apt_indicator.png").is_file()
    grid = Image.open(out / "sample" / "demo_lora_000004_grid.png")
    assert grid.height >= 8 * 64 and len(list((out / "sample").glob("*_base.png"))) == 8
    assert "APT on" in proc.stderr


def test_efficacy_benchmark_writes_its_table_and_plot_and_resumes(tmp_path):
    cmd = [sys.executable, "bench/apt_efficacy.py", "--concept", "heart", "--seeds", "1", "2", "--steps", "2", "4",
           "--images_per_prompt", "1", "--sample_steps", "3", "--gap_draws", "1", "--variants", "LoRA",
           "APT + prior preservation", "--out", str(tmp_path), "--cpu_threads", "1"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = (tmp_path / "apt_efficacy_heart_demo_2.md").read_text()
    assert ("| metric | better | world renders (ground truth) | base model (no LoRA) | LoRA "
            "| APT + prior preservation |") in table
    for label in ("concept fidelity", "precision against the world's renders", "copy distance", "jointly",
                  "class prompts ('a ... heart'): share carrying the concept's mark", "generalisation gap",
                  "Paired difference to plain LoRA"):
        assert label in table
    import json
    results = json.loads((tmp_path / "apt_efficacy_heart_demo_2.json").read_text())
    assert set(results) == {"world renders (ground truth)", "base model (no LoRA)", "LoRA", "APT + prior preservation"}
    assert all(len(rows) == 2 for rows in results.values())  # the base model and the world: one row per seed set
    world, base = results["world renders (ground truth)"][0], results["base model (no LoRA)"][0]
    assert world["joint"] == 1.0 and world["concept"] == 1.0 and world["precision_train"] == 1.0
    assert world["class_mark"] == 0.0 and world["copy"] > 0.3
    assert abs(base["prior_drift"]) < 1e-4 and base["fit"] == 0 and math.isnan(world["fit"])
    lora = results["LoRA"]
    assert 0 <= lora[0]["prior_joint"] <= 1 and lora[0]["fit"] > 0  # two steps already fit the training images
    # The 2-step rows were scored on the 4-step runs' saves, not trained again.
    four = json.loads((tmp_path / "apt_efficacy_heart_demo_4.json").read_text())
    assert lora[0]["steps"] == 2 and four["LoRA"][0]["steps"] == 4 and lora[0]["fit"] != four["LoRA"][0]["fit"]
    assert "indicator_csv" in results["APT + prior preservation"][0]
    assert results["APT + prior preservation"][0]["indicator_csv"].strip().splitlines()[-1].startswith("2,")
    assert "| APT + prior preservation | " in table.split("APT's mean loss weight")[1]
    assert (tmp_path / "apt_efficacy_heart_demo_2.png").stat().st_size > 1000
    # The class images were generated once, from the captions without the identifier.
    captions = {p.read_text() for p in (tmp_path / "class_images_heart").glob("*.txt")}
    assert captions and not any("sks" in c for c in captions) and all("purple heart" in c for c in captions)
    # Started again, finished runs are read back, not trained again.
    runs = {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").glob("*.json")}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").glob("*.json")} == runs


def test_efficacy_checkpoint_of_a_longer_run_is_the_shorter_run(tmp_path):
    """Scoring step 2 of a 4-step run stands for a 2-step run: the same LoRA weights."""
    sys.path.insert(0, str(REPO / "bench"))
    import apt_efficacy
    from library.lora.kohya_file import read_lora

    overrides = [("log_with", "none"), ("sample_prompts", "none"), ("sample_every_n_steps", "none"),
                 ("cpu_threads", "1"), ("seed", "3"), ("apt", "true")]
    preset = REPO / "presets" / "demo_heart.toml"
    trainer, long_files, csv, _ = apt_efficacy.train(preset, overrides, [2, 4], tmp_path / "long")
    _, short_files, _, _ = apt_efficacy.train(preset, overrides, [2], tmp_path / "short")
    a, b, four = (read_lora(f)[0] for f in (long_files[2], short_files[2], long_files[4]))
    assert a.keys() == b.keys() and all(a[k].dtype == torch.float32 and torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], four[k]) for k in a)
    # Loading a save puts exactly its weights back into the trained network.
    apt_efficacy.use_checkpoint(trainer, long_files[2])
    now = trainer.parts.network.kohya_state_dict()
    assert all(torch.equal(now[k], a[k]) for k in a)
    assert apt_efficacy.indicator_until(csv, 2).strip().splitlines()[-1].startswith("2,")


def test_efficacy_intervals():
    sys.path.insert(0, str(REPO / "bench"))
    import apt_efficacy

    mean, half = apt_efficacy.interval([1.0, 2.0, 3.0])
    assert mean == 2.0 and half == pytest.approx(4.303 * 1.0 / 3 ** 0.5)
    rows = [{"seed": 0, "x": 1.5}, {"seed": 1, "x": 2.5}, {"seed": 5, "x": 9.0}]
    base = [{"seed": 0, "x": 1.0}, {"seed": 1, "x": 2.0}]
    assert apt_efficacy.paired(rows, base, "x") == (0.5, 0.0)  # seed 5 has no pair


def test_efficacy_loss_weights_read_the_indicator_csv():
    sys.path.insert(0, str(REPO / "bench"))
    import apt_efficacy

    csv = "step,t0-499,t500-999\n1,0.0,0.0\n2,0.4,0.2\n3,0.6,0.0\n4,0.9,0.5\n"
    # mean weights per step: 1.0, 0.7, 0.7, 0.3; "early" = steps 1-3
    assert apt_efficacy.loss_weights(csv, early=3) == pytest.approx((0.7, 0.3))


def test_efficacy_report_pairs_apt_with_prior_preservation_too(tmp_path):
    sys.path.insert(0, str(REPO / "bench"))
    from types import SimpleNamespace

    import apt_efficacy

    def run(seed, fidelity):
        return {**{k: 0.5 for k, _, _ in apt_efficacy.METRICS}, "fidelity": fidelity, "seed": seed, "train_seconds": 1.0}

    results = {apt_efficacy.WORLD: [run(0, 0.9), run(1, 0.9)], apt_efficacy.BASE: [run(0, 0.8), run(1, 0.8)], "LoRA": [run(0, 0.90), run(1, 0.92)],
               "LoRA + prior preservation": [run(0, 0.88), run(1, 0.88)], "APT": [run(0, 0.91), run(1, 0.91)],
               "APT (reference every 4)": [run(0, 0.90), run(1, 0.92)],
               "APT (reference every 4, reflect fill)": [run(0, 0.91), run(1, 0.93)],
               "+ATA": [run(0, 0.93), run(1, 0.92)], "+ATA+RS": [run(0, 0.92), run(1, 0.92)]}
    args = SimpleNamespace(regime="demo", seeds=[0, 1], images_per_prompt=1, sample_steps=1, cfg=1.0, out=tmp_path, tag=None)
    apt_efficacy.write_report(results, args, "crescent", 7, 60.0)
    table = (tmp_path / "apt_efficacy_crescent_demo_7.md").read_text()
    # a tagged run writes its own table beside the committed one, never over it
    # (a later elapsed time makes the tagged table differ, so an overwrite would show)
    apt_efficacy.write_report(results, SimpleNamespace(**{**vars(args), "tag": "dev"}), "crescent", 7, 600.0)
    tagged = (tmp_path / "apt_efficacy_crescent_demo_7_dev.md").read_text()
    assert "10 minutes so far" in tagged and tagged.replace("10 minutes so far", "1 minutes so far") == table
    assert (tmp_path / "apt_efficacy_crescent_demo_7.md").read_text() == table
    assert "class prompts" not in table  # the crescent has no class prompts
    to_lora, to_pp = table.split("Paired difference to plain LoRA")[1].split("Paired difference to LoRA + prior")
    to_pp, to_apt = to_pp.split("Paired difference to APT (relative indicator, reference pass on every step)")
    to_apt, to_shipped = to_apt.split("Paired difference to APT as shipped (reference pass every 4th step)")
    assert ("| metric | LoRA + prior preservation | APT | APT (reference every 4) "
            "| APT (reference every 4, reflect fill) | +ATA | +ATA+RS |") in to_lora
    assert ("| concept fidelity: classifier-feature similarity to the training images | -0.030 +- 0.127 | +0.000 +- 0.127 "
            "| +0.000 +- 0.000 | +0.010 +- 0.000 |") in to_lora
    assert "| metric | APT | APT (reference every 4) | APT (reference every 4, reflect fill) |" in to_pp  # only APT variants against prior preservation
    assert "| concept fidelity: classifier-feature similarity to the training images | +0.030 +- 0.000 | +0.030 +- 0.127 |" in to_pp
    # only the cheaper schedules and the components against every step
    assert "| metric | APT (reference every 4) | +ATA | +ATA+RS |" in to_apt
    assert ("| concept fidelity: classifier-feature similarity to the training images | +0.000 +- 0.127 | +0.015 +- 0.064 "
            "| +0.010 +- 0.000 |") in to_apt
    # the ladder: without AA = +ATA+RS - APT (0.01, 0.01); without RS = +ATA - +ATA+RS (0.01, 0.00)
    ladder = table.split("What each part adds")[1].split("Relative")[0]
    assert "| metric | without AA (+ATA+RS - APT) | without RS (+ATA - +ATA+RS) |" in ladder
    assert "| concept fidelity: classifier-feature similarity to the training images | +0.010 +- 0.000 | +0.005 +- 0.064 |" in ladder
    # a candidate for a new default is compared with APT as shipped, and only there
    assert "| metric | APT (reference every 4, reflect fill) |" in to_shipped
    assert ("| concept fidelity: classifier-feature similarity to the training images | +0.010 +- 0.000 |"
            in to_shipped.split("Relative")[0])
    ratios = table.split("Relative to plain LoRA")[1]
    # LoRA + PP: 0.88/0.90 - 1 and 0.88/0.92 - 1; APT: 0.91/0.90 - 1 and 0.91/0.92 - 1
    pp = [0.88 / 0.90 - 1, 0.88 / 0.92 - 1]
    assert f"| {100 * sum(pp) / 2:+.1f}% +- " in ratios.splitlines()[4]
    assert "| prior prompts: classifier-feature drift from the base model (same seed) | +0.0% +- 0.0% | +0.0% +- 0.0% |" in ratios


def test_efficacy_variants_are_valid_configs_and_the_candidates_change_one_setting_of_apt_as_shipped():
    sys.path.insert(0, str(REPO / "bench"))
    import apt_efficacy
    from library.config import build_config

    preset = str(REPO / "presets" / "demo_heart.toml")
    configs = {name: build_config(preset, overrides)
               for name, overrides in {**apt_efficacy.VARIANTS, **apt_efficacy.ABLATIONS}.items()}
    shipped = configs[apt_efficacy.SHIPPED_NAME]
    assert shipped.training.apt and shipped.apt.reference_every == 4 and shipped.apt.aa and shipped.apt.rs
    assert not configs["LoRA"].training.apt and configs["APT"].apt.reference_every == 1
    no_aa = configs["APT (reference every 4, no AA)"]
    assert not no_aa.apt.aa and no_aa.apt.rs and no_aa.apt.reference_every == 4
    assert dataclasses.replace(no_aa.apt, aa=True) == shipped.apt
    assert configs["APT (reference every 4, weight floor 0.5)"].apt.min_weight == 0.5
    translate = configs["APT (reference every 4, translate 0.1)"]
    assert translate.apt.translate_max == 0.1
    assert dataclasses.replace(translate.apt, translate_max=shipped.apt.translate_max) == shipped.apt
    by_gamma = configs["APT (reference every 4, regularisers by gamma)"]
    assert by_gamma.apt.regularisers_scale == "gamma"
    assert dataclasses.replace(by_gamma.apt, regularisers_scale="constant") == shipped.apt
