"""bench/gpu_check.py: the budget plan, and the whole check on the CPU with tiny models (--tiny)."""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import gpu_check  # noqa: E402
from gpu_check import DROP_ORDER, MATRIX, plan, plan_cost  # noqa: E402


def without_orphans(runs):
    trained = {r.arch for r in runs if r.kind == "train"}
    return [r for r in runs if r.kind == "train" or r.arch in trained]


@pytest.mark.parametrize("tiny", [False, True])
def test_budget_drops_runs_in_the_documented_order(tiny):
    assert DROP_ORDER[:3] == ["sdxl-apt-bf16-xformers", "sdxl-plain-bf16-xformers", "reread-sdxl"]
    assert DROP_ORDER[-1] == "sdxl-plain-bf16"
    assert plan(MATRIX, plan_cost(MATRIX, tiny), tiny) == (MATRIX, [])
    for k in range(1, len(DROP_ORDER)):
        # A budget that covers exactly the runs left after the k least important are dropped...
        left = without_orphans([r for r in MATRIX if r.name not in DROP_ORDER[:k]])
        kept, dropped = plan(MATRIX, plan_cost(left, tiny), tiny)
        assert kept == left and dropped == [r for r in MATRIX if r not in left]
        # ...and a second less drops the next one too.
        nxt = without_orphans([r for r in left if r.name != DROP_ORDER[k]])
        assert plan(MATRIX, plan_cost(left, tiny) - 1, tiny)[0] == nxt
    # Without an SDXL training run there is no LoRA to sample from or re-read.
    sd15 = [r for r in MATRIX if r.arch == "sd15" or r.kind != "train"]
    assert [r.name for r in plan(sd15, 1e9, tiny)[1]] == ["sample-sdxl", "reread-sdxl"]
    assert plan(MATRIX, 1, tiny) == ([], MATRIX)


def test_error_line():
    assert gpu_check.error_line("loading\nerror: a.toml: [optimizer] learning_rate: bad\n") == \
        "error: a.toml: [optimizer] learning_rate: bad"
    assert gpu_check.error_line("Traceback (most recent call last):\n  File x\nRuntimeError: CUDA out of memory\n") \
        == "RuntimeError: CUDA out of memory"
    launched = ("Traceback (most recent call last):\n  File t\ntorch.OutOfMemoryError: CUDA out of memory. Tried 2 GiB\n"
                "Traceback (most recent call last):\n  File launch.py\nsubprocess.CalledProcessError: Command "
                "'['python', 'train_apt_lora.py']' returned non-zero exit status 1.\n")
    assert gpu_check.error_line(launched) == "torch.OutOfMemoryError: CUDA out of memory. Tried 2 GiB"
    assert gpu_check.error_line("caching latents: 10%\n", -9) == "killed by signal 9 (out of host memory?)"


def test_every_training_config_of_the_matrix_is_valid(tmp_path):
    """What each row trains, checked by the trainer's own config loader (GPU and tiny variants)."""
    from library.config import build_config

    model, images = tmp_path / "model", tmp_path / "images"
    model.mkdir()
    images.mkdir()
    for tiny in (False, True):
        for run in [r for r in MATRIX if r.kind == "train"]:
            folder = tmp_path / f"{run.name}-{tiny}"
            folder.mkdir()
            cfg = build_config(str(gpu_check.write_train_config(run, folder, model, images, tiny, 13)), [])
            t, sdxl = cfg.training, run.arch == "sdxl"
            assert (t.max_train_steps, t.apt, t.attention, t.gradient_checkpointing) == (13, run.apt, run.attention, sdxl)
            assert t.mixed_precision == ("no" if tiny else run.precision)
            assert t.train_batch_size == (1 if sdxl else 4) and cfg.network.network_dim == 16
            assert cfg.optimizer.optimizer_type == ("AdamW8bit" if sdxl else "AdamW")
            assert cfg.data.cache_latents and cfg.data.cache_text_encoder_outputs == sdxl
            assert cfg.dataset.datasets[0].resolution == ((64, 64) if tiny else ((1024, 1024) if sdxl else (512, 512)))
            assert cfg.logging.log_with == "tensorboard"


def test_comparisons_and_table():
    results = {r.name: gpu_check.Result(r.name, status="dropped", error="budget: 9 s left") for r in MATRIX}
    figures = {"sdxl-plain-bf16": (0.50, 10.0, 0.100), "sdxl-apt-bf16": (0.65, 12.5, 0.110),
               "sdxl-plain-bf16-xformers": (0.45, 9.5, 0.101)}
    for name, (seconds, peak, loss) in figures.items():
        results[name] = gpu_check.Result(name, "ok", seconds, peak, True, loss, 13, 60.0)
    assert gpu_check.comparisons(results) == [
        "sdxl bf16: APT/plain step time 1.30x, peak memory +2.50 GiB",
        "sdxl plain: xformers/SDPA mean loss +1.00%, step time 0.90x"]
    info = {"date": "2026-12-01 03:00 UTC", "device": "NVIDIA H200", "cuda": "13.0", "versions": {"torch": "2.11.0"},
            "mode": "gpu", "warmup_steps": 3, "measured_steps": 10, "elapsed_s": 400, "budget_s": 480}
    table = gpu_check.render(info, results, tiny=False)
    assert table.splitlines()[0].startswith("GPU check, 2026-12-01 03:00 UTC: NVIDIA H200, torch 2.11.0 (CUDA 13.0)")
    assert "| sdxl-apt-bf16 | ok | 0.650 | 12.50 | yes | 0.1100 | 60 |  |" in table
    assert "| sd15-apt-fp16 | dropped |  |  |  |  |  | budget: 9 s left |" in table


def test_tiny_check_runs_and_survives_a_failed_run(tmp_path, capsys, monkeypatch):
    """The check end to end on the CPU: SDXL with APT (8-bit AdamW, gradient checkpointing, cached
    text-encoder outputs), the sample image from its LoRA and the re-read; one run fails (a bad
    config, so it fails fast) and the check goes on. Each training run costs a process start (~10 s
    of imports), so the other rows, whose configs the tests above check, are left out here."""
    original = gpu_check.write_train_config

    def broken(run, folder, *args):
        path = original(run, folder, *args)
        if run.name == "sd15-apt-bf16":
            path.write_text(path.read_text().replace("learning_rate = 0.0001", "learning_rate = -1.0"))
        return path

    monkeypatch.setattr(gpu_check, "write_train_config", broken)
    # Imported long ago (as in a long test session): the budget counts from the call, not the import.
    monkeypatch.setattr(gpu_check, "IMPORTED", time.monotonic() - 10_000)
    out, work = tmp_path / "out", tmp_path / "work"
    chosen = ["sdxl-apt-bf16", "sd15-apt-bf16", "sample-sdxl", "reread-sdxl"]
    assert gpu_check.main(["--tiny", "--out", str(out), "--work", str(work), "--only", *chosen]) == 0
    printed = capsys.readouterr().out
    doc = json.loads((out / "gpu_check.json").read_text())
    rows = {r["name"]: r for r in doc["runs"]}
    assert list(rows) == [r.name for r in MATRIX]
    table = (out / "gpu_check.md").read_text()
    assert table.strip() in printed
    for run in MATRIX:
        row = rows[run.name]
        assert f"| {run.name} | {row['status']} |" in table
        if run.name not in chosen:
            assert (row["status"], row["error"]) == ("skipped", "not in --only")
        elif run.name == "sd15-apt-bf16":
            assert row["status"] == "failed" and row["steps"] == 0 and row["losses_finite"] is None
            assert row["error"].startswith("error: ") and "learning_rate" in row["error"]
        else:
            assert row["status"] == "ok", row
        if run.kind == "train" and row["status"] == "ok":
            assert row["losses_finite"] is True and row["steps"] == 2  # one warm-up and one measured step
            assert row["s_per_step"] > 0 and row["peak_gib"] > 0 and math.isfinite(row["mean_loss"])
            assert (work / "runs" / run.name / "output" / f"{run.name}.safetensors").is_file()
    reread = rows["reread-sdxl"]["extra"]
    assert reread["lora"] == "sdxl-apt-bf16"
    assert reread["project_modules"] == reread["diffusers_layers"] == reread["compared"] > 0
    assert reread["max_rel_diff"] < 1e-3
    from PIL import Image

    with Image.open(out / "gpu_check_sample.png") as img:
        assert img.size == (64, 64)


def test_tiny_rows_that_cannot_run_on_a_cpu_are_skipped(tmp_path):
    out = tmp_path / "out"
    only = ["sd15-plain-fp16", "sdxl-plain-bf16-xformers"]
    assert gpu_check.main(["--tiny", "--out", str(out), "--work", str(tmp_path / "w"), "--only", *only]) == 0
    rows = {r["name"]: r for r in json.loads((out / "gpu_check.json").read_text())["runs"]}
    assert rows["sd15-plain-fp16"]["error"] == "on the CPU fp16 runs as fp32: the same run as sd15-plain-bf16"
    assert rows["sdxl-plain-bf16-xformers"]["error"] == "xformers runs only on a CUDA GPU"
    assert {r["status"] for r in rows.values()} == {"skipped"}


def test_check_within_a_tiny_budget_drops_everything_and_still_reports(tmp_path):
    out = tmp_path / "out"
    assert gpu_check.main(["--tiny", "--out", str(out), "--work", str(tmp_path / "w"), "--budget_s", "6"]) == 0
    rows = json.loads((out / "gpu_check.json").read_text())["runs"]
    assert {r["status"] for r in rows} == {"dropped", "skipped"}
    assert all(r["error"].startswith("budget") for r in rows if r["status"] == "dropped")
    assert not (tmp_path / "w" / "models").exists()  # nothing was built for runs that never start


def test_step_time_counts_the_reference_pass_every_4th_step_at_its_share():
    # 12 timed steps after a 3-step warm-up, every 4th one dearer (reference_every = 4)
    times = [(step, 2.0 if step % 4 == 0 else 1.0) for step in range(1, 16)]
    metrics = gpu_check.train_metrics({"s_per_it": times, "loss": [(s, 0.1) for s in range(1, 16)]}, 3, 15)
    assert metrics["s_per_step"] == 1.25  # a plain median would say 1.0


def test_memory_notes_report_reserved_and_the_apt_target():
    results = {r.name: gpu_check.Result(r.name, status="dropped") for r in MATRIX}
    for name, peak, reserved in (("sdxl-plain-bf16", 7.0, 8.5), ("sdxl-apt-bf16", 7.6, 9.2),
                                 ("sdxl-plain-bf16-fp8", 3.4, 5.0), ("sdxl-apt-bf16-fp8", 3.5, 5.1)):
        results[name] = gpu_check.Result(name, "ok", 1.0, peak, True, 0.1, 13, 60.0,
                                         extra={"whole_run_reserved_gib": reserved})
    assert gpu_check.memory_notes(results) == [
        "sdxl bf16: reserved over the whole run (caching and sampling included): plain 8.50 GiB, APT 9.20 GiB",
        "target APT - plain <= 1 GiB (sdxl bf16): +0.60 GiB, met",
        "target APT - plain <= 1 GiB (sdxl bf16-fp8): +0.10 GiB, met",
        "target sdxl-plain-bf16 reserved <= 8.0 GiB: 8.50 GiB, NOT met",
        "target sdxl-apt-bf16 reserved <= 9.0 GiB: 9.20 GiB, NOT met",
        "target sdxl-plain-bf16-fp8 reserved <= 6.5 GiB: 5.00 GiB, met",
        "target sdxl-apt-bf16-fp8 reserved <= 6.5 GiB: 5.10 GiB, met"]
    metrics = gpu_check.train_metrics({"loss": [(1, 0.1)], "peak_reserved_whole_run_gib": [(1, 3.0), (2, 4.0)]}, 0, 1)
    assert metrics["extra"] == {"whole_run_reserved_gib": 4.0}


def test_xformers_is_probed_with_one_real_call(monkeypatch):
    import sys
    import types

    import torch

    real_randn = torch.randn
    monkeypatch.setattr(torch, "randn", lambda *shape, device=None, dtype=None: real_randn(*shape, dtype=dtype))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    calls = []

    def failing(q, k, v):
        calls.append(q.shape)
        raise NotImplementedError("No operator found for `memory_efficient_attention_forward`")

    ops = types.SimpleNamespace(memory_efficient_attention=failing)
    package = types.ModuleType("xformers")
    package.ops = ops
    monkeypatch.setitem(sys.modules, "xformers", package)
    monkeypatch.setitem(sys.modules, "xformers.ops", ops)
    assert gpu_check.xformers_probe().startswith("xformers does not run here (NotImplementedError: No operator found")
    assert calls  # the import alone succeeded: only the call tells
    ops.memory_efficient_attention = lambda q, k, v: q
    assert gpu_check.xformers_probe() == ""
