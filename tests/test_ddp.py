"""Two-process DDP on the CPU through accelerate (gloo): data split across ranks, weights in sync."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from tests.helpers import make_images, tiny_config

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_processes(tmp_path, cfg, *worker_args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    # `--cpu --num_processes 2` silently starts one process; --multi_gpu with the CPU flag runs real DDP.
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), str(REPO / "tests" / "ddp_worker.py"), str(cfg),
           str(tmp_path / "ranks"), *worker_args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def assert_ranks_identical(tmp_path, steps: int) -> None:
    info = [json.loads((tmp_path / "ranks" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [i["world"] for i in info] == [2, 2] and [i["steps"] for i in info] == [steps, steps]
    positions = [{(e, p) for e, p, _ in i["seen"]} for i in info]
    assert not positions[0] & positions[1]  # each rank trained different batches
    w0 = load_file(str(tmp_path / "ranks" / "rank0.safetensors"))
    w1 = load_file(str(tmp_path / "ranks" / "rank1.safetensors"))
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    assert any(w0[k].abs().sum() > 0 for k in w0 if "lora_up" in k)
    assert (tmp_path / "out" / "lora.safetensors").is_file()  # saved once, by the main process


def test_two_process_ddp_keeps_ranks_identical(tmp_path, tiny_models):
    images = make_images(tmp_path / "images", 6)
    cfg = tiny_config(tmp_path, tiny_models["sd15"], images, max_train_steps=4)
    run_two_processes(tmp_path, cfg)
    assert_ranks_identical(tmp_path, 4)


def test_two_process_sdxl_with_text_encoders_apt_and_validation(tmp_path, tiny_models):
    """SDXL conditions on the penultimate text-encoder layers, so the last layers' LoRA gets no
    gradient; validation runs on the main process alone; APT gathers the indicator's losses; the
    base weights are stored in float8 (fp8_base), which DDP leaves alone (gloo cannot send float8)."""
    images = make_images(tmp_path / "images", 8)
    cfg = tiny_config(tmp_path, tiny_models["sdxl"], images, max_train_steps=2, apt=True, validate_every_n_steps=1,
                      fp8_base=True)
    text = cfg.read_text().replace("[network]", "[network]\nnetwork_train_unet_only = false")
    cfg.write_text(text.replace("resolution = 64", "resolution = 64\nvalidation_split = 0.25"))
    proc = run_two_processes(tmp_path, cfg)
    assert_ranks_identical(tmp_path, 2)
    assert any(k.startswith("lora_te2_") for k in load_file(str(tmp_path / "out" / "lora.safetensors")))
    # Each info line once, not once per process.
    assert proc.stderr.count("APT on:") == 1, proc.stderr[-3000:]
    assert proc.stderr.count("validation loss at step 2") == 1


def test_commands_and_signals_act_on_every_process_at_the_same_step(tmp_path, tiny_models):
    """The main process reads the command file, the second process alone is signalled: both save after
    step 1 and stop after step 2, with one event stream and a resumable state."""
    from library.train import checkpoint

    images = make_images(tmp_path / "images", 6)
    cfg = tiny_config(tmp_path, tiny_models["sd15"], images, max_train_steps=50)
    proc = run_two_processes(tmp_path, cfg, "commands")
    assert "SIGTERM received" in proc.stderr
    info = [json.loads((tmp_path / "ranks" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [i["steps"] for i in info] == [2, 2]
    w0, w1 = (load_file(str(tmp_path / "ranks" / f"rank{r}.safetensors")) for r in (0, 1))
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    out = tmp_path / "out"
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    assert [e["type"] for e in events].count("start") == 1 and events[0]["processes"] == 2
    acks = [(e["command"], e["id"], e["step"], e["source"]) for e in events if e["type"] == "command"]
    assert acks == [("save", "ui-save", 1, "file"), ("stop", "SIGTERM", 2, "SIGTERM")]
    assert events[-1]["status"] == "stopped" and events[-1]["step"] == 2
    assert checkpoint.read_state(out / "lora-step00000001-state").state.step == 1
    assert checkpoint.read_state(out / "lora-step00000002-state").state.step == 2
