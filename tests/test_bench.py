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
