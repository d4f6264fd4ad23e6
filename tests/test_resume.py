"""Training state and resume: equivalence with uninterrupted runs, SIGKILL, errors."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from library.config import build_config
from library.errors import UserError
from library.train.loop import Trainer
from tests.helpers import make_images, tiny_config

REPO = Path(__file__).resolve().parents[1]
FP32 = [("save_precision", "float"), ("mixed_precision", "no")]


def run(path: Path, *overrides) -> Trainer:
    trainer = Trainer(build_config(str(path), [*FP32, *overrides]))
    trainer.run()
    return trainer


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def steps_in(path: Path) -> str:
    with safe_open(str(path), "pt") as f:
        return f.metadata()["ss_steps"]


@pytest.fixture
def four_images(tmp_path) -> Path:
    return make_images(tmp_path / "images", 4)  # batch 2: two batches per epoch, step 3 stops mid-epoch


def test_resume_continues_exactly_where_it_stopped(tmp_path, tiny_models, four_images):
    straight_dir, split_dir = tmp_path / "straight", tmp_path / "split"
    straight_dir.mkdir()
    split_dir.mkdir()
    straight = tiny_config(straight_dir, tiny_models["sd15"], four_images, max_train_steps=6)
    run(straight)
    split = tiny_config(split_dir, tiny_models["sd15"], four_images, max_train_steps=3)
    first = run(split, ("save_state", "true"))
    assert first.parts.plan.epoch_of(2) == 2 and not first.parts.plan.ends_epoch(2)  # stopped in the middle of epoch 2
    state = json.loads((split_dir / "out" / "lora-state" / "state.json").read_text())
    assert (state["step"], state["epoch"], state["position"]) == (3, 2, 1)
    resumed = run(split, ("resume", "latest"), ("max_train_steps", "6"))
    assert resumed.step == 6 and len(resumed.losses) == 3
    final = split_dir / "out" / "lora.safetensors"
    assert max_diff(weights(straight_dir / "out" / "lora.safetensors"), weights(final)) < 1e-6
    assert steps_in(final) == "6"


def test_cosine_schedule_resumed_ends_with_the_same_lr_and_weights(tmp_path, tiny_models, four_images):
    a_dir, b_dir = tmp_path / "a", tmp_path / "b"
    a_dir.mkdir()
    b_dir.mkdir()
    extra = [("lr_scheduler", "cosine"), ("lr_warmup_steps", "1")]
    a = run(tiny_config(a_dir, tiny_models["sdxl"], four_images, max_train_steps=6), *extra)
    b_cfg = tiny_config(b_dir, tiny_models["sdxl"], four_images, max_train_steps=6)
    run(b_cfg, *extra, ("save_every_n_steps", "3"), ("save_state", "true"))
    (b_dir / "out" / "lora.safetensors").unlink()
    b = run(b_cfg, *extra, ("resume", str(b_dir / "out" / "lora-step00000003-state")))
    assert b.step == 6
    assert b.parts.optimizer.param_groups[0]["lr"] == pytest.approx(a.parts.optimizer.param_groups[0]["lr"], abs=1e-15)
    assert max_diff(weights(a_dir / "out" / "lora.safetensors"), weights(b_dir / "out" / "lora.safetensors")) < 1e-6


def test_killed_run_resumes_to_the_right_step_count(tmp_path, tiny_models, four_images):
    cfg = tiny_config(tmp_path, tiny_models["sd15"], four_images, max_train_steps=40)
    base = [sys.executable, "train_apt_lora.py", "--config", str(cfg), "--save_precision", "float",
            "--log_with", "none"]
    proc = subprocess.Popen(base + ["--save_every_n_steps", "1", "--save_state", "true"], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    out = tmp_path / "out"
    deadline = time.time() + 300
    try:
        while time.time() < deadline and proc.poll() is None:
            if (out / "lora-step00000008-state" / "state.json").exists():
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the run ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)  # no chance to clean up: mid-step or mid-save
    finally:
        proc.wait(timeout=60)
    assert not (out / "lora.safetensors").exists()
    resumed = subprocess.run(base + ["--resume", "latest"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stderr
    assert steps_in(out / "lora.safetensors") == "40"
    straight_dir = tmp_path / "straight"
    straight_dir.mkdir()
    run(tiny_config(straight_dir, tiny_models["sd15"], four_images, max_train_steps=40))
    assert max_diff(weights(straight_dir / "out" / "lora.safetensors"), weights(out / "lora.safetensors")) < 1e-6


def test_resume_errors(tmp_path, tiny_models, four_images):
    cfg = tiny_config(tmp_path, tiny_models["sd15"], four_images, max_train_steps=2)
    with pytest.raises(UserError, match='resume = "latest": no state folder of lora in'):
        Trainer(build_config(str(cfg), [("resume", "latest")]))
    run(cfg, ("save_state", "true"))
    with pytest.raises(UserError, match="the state was saved for another network"):
        Trainer(build_config(str(cfg), [("resume", "latest"), ("network_dim", "8"), ("max_train_steps", "4")]))
    with pytest.raises(UserError, match="already at step 2; raise max_train_steps"):
        Trainer(build_config(str(cfg), [("resume", "latest")]))
    with pytest.raises(UserError, match="not a training state folder"):
        Trainer(build_config(str(cfg), [("resume", str(tmp_path)), ("max_train_steps", "4")]))


def test_resume_after_a_batch_change_names_what_changed(tmp_path, tiny_models, four_images, caplog):
    cfg = tiny_config(tmp_path, tiny_models["sd15"], four_images, max_train_steps=4)
    run(cfg, ("save_every_n_steps", "2"), ("save_state", "true"))
    state = tmp_path / "out" / "lora-step00000002-state"
    with caplog.at_level("WARNING"):
        resumed = run(cfg, ("resume", str(state)), ("train_batch_size", "1"), ("max_train_steps", "6"))
    assert resumed.step == 6
    assert "batch size 2 in the state, 1 now" in caplog.text and "steps per epoch 2 in the state, 4 now" in caplog.text
