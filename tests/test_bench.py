"""The benchmark scripts run (their figures are read by people, not asserted here)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))


def test_apt_overhead_runs_and_reports_every_variant(tmp_path, capsys):
    import apt_overhead

    out = tmp_path / "r.json"
    assert apt_overhead.main(["--steps", "1", "--rounds", "1", "--json", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    assert set(results) == set(apt_overhead.VARIANTS)
    assert results["plain LoRA"]["time_ratio"] == 1.0
    assert all(r["s_per_step"] > 0 and r["peak_bytes"] > 0 for r in results.values())
    assert "APT: full" in capsys.readouterr().out


def test_apt_overhead_times_only_the_chosen_variants_beside_plain_lora(tmp_path):
    import apt_overhead

    out = tmp_path / "r.json"
    assert apt_overhead.main(["--steps", "1", "--rounds", "1", "--variants", "APT: full", "--json", str(out)]) == 0
    assert set(json.loads(out.read_text())["results"]) == {"plain LoRA", "APT: full"}


def test_the_memory_ladder_is_read_from_the_presets():
    import memory_estimate

    settings = {(preset, tuple(o)): memory_estimate.preset_settings(preset, tree, o)
                for preset, tree, _, _, o in memory_estimate.LADDER}
    eight = settings[("sdxl_8gb.toml", ())]
    assert eight["fp8_unet"] and eight["fp8_text"] and not eight["text_on_device"] and eight["checkpointing"]
    assert eight["optimizer"] == "AdamW8bit"
    assert not settings[("sdxl_lowvram.toml", ())]["fp8_unet"]
    assert settings[("sdxl.toml", (("gradient_checkpointing", "false"),))]["checkpointing"] is False
    assert settings[("sdxl.toml", ())]["rank"] == 32


def test_apt_bar_verdicts_at_the_edges():
    import apt_bar

    v = apt_bar.verdict
    assert v(0.10, 0.05, 0.0, "higher", True) == "met"
    assert v(0.0, 0.0, 0.0, "higher", True) == "met"  # "at or above": reaching the bar meets it
    assert v(0.0, 0.0, 0.0, "lower", False) == "not met"  # "below": it must pass it
    assert v(0.10, 0.20, 0.0, "higher", True) == "met in the mean"
    assert v(-0.10, 0.20, 0.0, "higher", True) == "not met in the mean"
    assert v(-0.10, 0.05, 0.0, "higher", True) == "not met"
    assert v(-0.40, 0.05, -0.30, "lower", True) == "met"
    assert v(-0.20, 0.05, -0.30, "lower", True) == "not met"
    assert v(-0.01, float("nan"), -0.02, "higher", True) == "met in the mean"
    assert v(float("nan"), 0.1, 0.0, "higher", True) == "n/a"


def test_apt_bar_reads_the_cache_pairs_by_seed_and_states_each_item(tmp_path, capsys):
    import apt_bar

    runs = tmp_path / "runs"
    runs.mkdir()

    def put(concept, regime, variant, seed, **metrics):
        name = f"{concept}_{regime}_{apt_bar.slug(variant)}_s{seed}_1200_n9.json"
        (runs / name).write_text(json.dumps({"seed": seed, **metrics}))

    lora = dict(fidelity=1.0, prior_drift=0.010, class_mark=0.3, coverage_train=0.5, copy=0.4, joint=0.2)
    shipped = [dict(fidelity=0.99, class_mark=0.4), dict(fidelity=0.985, class_mark=0.5),
               dict(fidelity=0.995, class_mark=0.3)]
    for seed, change in zip((300, 301, 302), shipped):
        put("heart", "rank32", "LoRA", seed, **lora)
        put("heart", "rank32", "APT (reference every 4)", seed,
            **{**lora, "prior_drift": 0.005, "coverage_train": 0.3, **change})
    put("heart", "rank32", "APT (reference every 4)", 303, **lora)  # no plain LoRA on 303: not used
    put("crescent", "demo", "LoRA", 300, **lora)  # no APT: no column
    assert apt_bar.main(["--out", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert text == (tmp_path / "apt_bar_1200.md").read_text()
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ")[1].rstrip(" |")
            for line in text.splitlines() if line.startswith("| ") and "item" not in line}
    assert "| item | heart, rank32 (seeds 300, 301, 302) |" in text and "crescent" not in text
    # fidelity ratios -1%, -1.5%, -0.5%: mean -1.0%, half 4.303 * 0.5% / sqrt(3) = 1.2%: reaches -2%
    assert rows["concept fidelity within 2% of plain LoRA"] == "met in the mean (-1.0% +- 1.2%)"
    assert rows["prior drift -30% or better"] == "met (-50.0% +- 0.0%)"
    # +0.1, +0.2, 0.0: mean +0.1 (wrong side), half 4.303 * 0.1 / sqrt(3) = 0.248
    assert rows["class-mark share below plain LoRA's"] == "not met in the mean (+0.100 +- 0.248)"
    assert rows["training-caption coverage at or above plain LoRA's"] == "not met (-0.200 +- 0.000)"
    assert rows["copy distance at or above plain LoRA's"] == "met (+0.000 +- 0.000)"
    assert rows["fidelity above prior preservation's"] == "no runs"
    assert apt_bar.main(["--out", str(tmp_path), "--steps", "400"]) == 0
    assert "no concept and regime" in capsys.readouterr().out
    # a table over other seeds gets its own name and leaves the quoted one alone
    quoted = (tmp_path / "apt_bar_1200.md").read_text()
    assert apt_bar.main(["--out", str(tmp_path), "--seeds", "301", "302", "303", "--tag", "later"]) == 0
    assert "(seeds 301, 302)" in (tmp_path / "apt_bar_1200_later.md").read_text()
    assert (tmp_path / "apt_bar_1200.md").read_text() == quoted
    with pytest.raises(SystemExit):
        apt_bar.main(["--out", str(tmp_path), "--tag", "../x"])
    assert "--tag '../x'" in capsys.readouterr().err
