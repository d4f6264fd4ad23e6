"""The benchmark scripts run (their figures are read by people, not asserted here)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

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
