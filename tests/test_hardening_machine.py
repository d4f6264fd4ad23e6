"""The machine: SIGTERM and SIGINT stop cleanly with a resumable state; a read-only output folder is
refused before any model loads; a disk that fills up during a save leaves the previous LoRA and state
as they were, with one line."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from library.train import checkpoint
from library.train.events import EVENTS_NAME
from library.train.loop import Trainer
from tests.helpers import make_images, run_main, tiny_config

REPO = Path(__file__).resolve().parents[1]
TRAIN = ["--save_precision", "float", "--mixed_precision", "no", "--log_with", "none"]


def read_events(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / EVENTS_NAME).read_text().splitlines()]


def digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_one_line_error(code: int, err: str, *culprits: str) -> str:
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    for culprit in culprits:
        assert culprit in lines[0], lines[0]
    return lines[0]


# --- signals -------------------------------------------------------------------------------------

def test_sigterm_stops_after_the_step_with_a_resumable_state_and_exit_0(tiny_models, tmp_path):
    images = make_images(tmp_path / "images", 2)
    cfg = tiny_config(tmp_path, tiny_models["sd15"], images, max_train_steps=500)
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "train_apt_lora.py", "--config", str(cfg), *TRAIN], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            if (out / EVENTS_NAME).is_file() and '"type": "step"' in (out / EVENTS_NAME).read_text():
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err[-3000:]
    assert "SIGTERM received: stopping after this step" in err and "Traceback" not in err
    events = read_events(out)
    end = events[-1]
    stopped = end["step"]
    assert end["status"] == "stopped" and 1 <= stopped < 500
    assert [e["type"] for e in events[-3:]] == ["command", "save", "end"]
    assert events[-3] == {**events[-3], "command": "stop", "id": "SIGTERM", "source": "SIGTERM", "step": stopped}
    state = out / f"lora-step{stopped:08d}-state"
    assert checkpoint.read_state(state).state.step == stopped
    assert load_file(str(out / f"lora-step{stopped:08d}.safetensors"))
    assert not (out / "lora.safetensors").exists() and not (out / ".train.lock").exists()
    # resumable: one more step from there, appended to the same events file
    code, _, err = run_main(["--config", str(cfg), "--resume", "latest", "--max_train_steps", str(stopped + 1),
                             *TRAIN])
    assert code == 0, err
    more = read_events(out)[len(events):]
    assert more[0]["type"] == "start" and more[0]["resumed_from"] == str(state)
    assert [e["step"] for e in more if e["type"] == "step"] == [stopped + 1] and more[-1]["status"] == "finished"


def signalling(monkeypatch, at_step: int, times: int) -> None:
    """Every Trainer built from now on sends itself SIGINT `times` times after step `at_step`."""
    real_init = Trainer.__init__

    def init(self, cfg):
        real_init(self, cfg)

        def listener(report, values):
            if report.step == at_step:
                for _ in range(times):
                    # To this thread, and the next one only once the handler has run: two SIGINTs pending
                    # at once are merged into one by the kernel, and a signal sent to the process may be
                    # delivered to a thread that a loaded machine does not schedule for a while.
                    handler = signal.getsignal(signal.SIGINT)
                    signal.pthread_kill(threading.get_ident(), signal.SIGINT)
                    deadline = time.time() + 30
                    while signal.getsignal(signal.SIGINT) is handler and time.time() < deadline:
                        time.sleep(0.01)  # the Python handler runs between bytecodes of the main thread

        self.listeners.append(listener)

    monkeypatch.setattr(Trainer, "__init__", init)


def test_sigint_stops_like_sigterm_and_the_handlers_are_put_back(tiny_models, tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path, tiny_models["sd15"], make_images(tmp_path / "images", 2), max_train_steps=4)
    out = tmp_path / "out"
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    signalling(monkeypatch, 2, 1)
    code, _, err = run_main(["--config", str(cfg), *TRAIN])
    assert code == 0, err
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
    events = read_events(out)
    assert events[-1]["status"] == "stopped" and events[-1]["step"] == 2
    assert checkpoint.read_state(out / "lora-step00000002-state").state.step == 2


def test_a_second_sigint_ends_the_run_at_once_without_a_new_save(tiny_models, tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path, tiny_models["sd15"], make_images(tmp_path / "images", 2), max_train_steps=4)
    out = tmp_path / "out"
    signalling(monkeypatch, 2, 2)
    code, _, err = run_main(["--config", str(cfg), *TRAIN])
    assert code == 130 and err.rstrip().endswith("interrupted"), err
    events = read_events(out)
    assert [e["type"] for e in events[-2:]] == ["error", "end"]
    assert events[-2]["message"] == "interrupted" and events[-1]["status"] == "failed"
    assert not list(out.glob("*.safetensors")) and not (out / ".train.lock").exists()


# --- a read-only output folder ----------------------------------------------------------------------

@pytest.fixture
def finished(tiny_models, tmp_path) -> Path:
    """A finished 2-step run with a state (out/lora.safetensors, out/lora-state)."""
    cfg = tiny_config(tmp_path, tiny_models["sd15"], make_images(tmp_path / "images", 2), max_train_steps=2)
    code, _, err = run_main(["--config", str(cfg), "--save_state", "true", *TRAIN])
    assert code == 0, err
    return cfg


def no_model_loads(monkeypatch) -> None:
    import library.train.builder as builder

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(builder, "load_models", refuse)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into folders without write permission")
def test_a_read_only_output_dir_is_refused_before_the_model_loads(finished, tmp_path, monkeypatch):
    out = tmp_path / "out"
    before = digests(out)
    out.chmod(0o500)
    no_model_loads(monkeypatch)
    try:
        code, _, err = run_main(["--config", str(finished), "--resume", "latest", "--max_train_steps", "3", *TRAIN])
    finally:
        out.chmod(0o700)
    line = assert_one_line_error(code, err, f"output_dir {out}", "cannot write files in this folder")
    assert "Permission denied" in line
    assert digests(out) == before


def test_an_output_dir_on_a_read_only_file_system_is_refused_before_the_model_loads(finished, tmp_path,
                                                                                      monkeypatch):
    """As a read-only mount (or a full disk) answers: the probe file cannot be created (for root too)."""
    out = tmp_path / "out"
    before = digests(out)
    real = tempfile.mkstemp

    def read_only(*args, dir=None, **kwargs):
        if dir is not None and Path(dir) == out:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(dir))
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    no_model_loads(monkeypatch)
    code, _, err = run_main(["--config", str(finished), "--resume", "latest", "--max_train_steps", "3", *TRAIN])
    line = assert_one_line_error(code, err, f"output_dir {out}", "Read-only file system")
    assert line == (f"error: output_dir {out}: cannot write files in this folder (Read-only file system); choose "
                    "another output_dir or fix its permissions")
    assert digests(out) == before  # not even an events line: the run never started


# --- a full disk during a save ----------------------------------------------------------------------

def enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("fails", ["state", "lora"])
def test_a_full_disk_during_the_save_keeps_the_previous_lora_and_state(finished, tmp_path, monkeypatch, fails):
    """The resumed run's final save would replace out/lora.safetensors and out/lora-state."""
    out = tmp_path / "out"
    before = digests(out)
    if fails == "state":
        real_save = torch.save

        def save(obj, path, *args, **kwargs):
            if Path(path).name == "optimizer.pt":
                enospc()
            return real_save(obj, path, *args, **kwargs)

        monkeypatch.setattr(checkpoint.torch, "save", save)
    else:
        real_write = Path.write_bytes

        def write_bytes(self, data):
            if self.name.startswith(".lora.safetensors."):
                enospc()
            return real_write(self, data)

        monkeypatch.setattr(Path, "write_bytes", write_bytes)
    code, _, err = run_main(["--config", str(finished), "--resume", "latest", "--max_train_steps", "3",
                             "--save_state", "true", *TRAIN])
    monkeypatch.undo()
    target = out / ("lora-state" if fails == "state" else "lora.safetensors")
    what = "state" if fails == "state" else "file"
    line = assert_one_line_error(code, err, f"{target}: could not be written (No space left on device)",
                                 f"the previous {what} is unchanged")
    after = digests(out)
    # everything as it was; the events file only grew, by this run's lines
    old_events = before.pop(EVENTS_NAME)
    assert after.pop(EVENTS_NAME) != old_events and after == before
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary file or folder left
    assert checkpoint.read_state(out / "lora-state").state.step == 2
    events = read_events(out)
    assert [e["type"] for e in events[-3:]] == ["step", "error", "end"]
    assert "error: " + events[-2]["message"] == line
    assert events[-1]["status"] == "failed" and events[-1]["step"] == 3 and events[-1]["outputs"] == []


def test_a_full_disk_during_a_step_save_keeps_the_earlier_saves(tiny_models, tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path, tiny_models["sd15"], make_images(tmp_path / "images", 2), max_train_steps=3)
    out = tmp_path / "out"
    real_save = torch.save
    first: dict[str, str] = {}

    def save(obj, path, *args, **kwargs):
        if ".lora-step00000002-state" in str(path):
            first.update(digests(out))  # what step 1 left, as the failing save begins
            enospc()
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "save", save)
    code, _, err = run_main(["--config", str(cfg), "--save_every_n_steps", "1", "--save_state", "true",
                             "--save_last_n_steps", "1", *TRAIN])
    monkeypatch.undo()
    assert_one_line_error(code, err, f"{out / 'lora-step00000002-state'}: could not be written")
    after = digests(out)
    first.pop(EVENTS_NAME)
    after.pop(EVENTS_NAME)
    # step 1's LoRA and state untouched (not pruned: the save that would replace them failed), nothing of step 2
    assert after == {k: v for k, v in first.items() if not k.startswith(".")}  # the lock, the unfinished save
    assert any(k.startswith("lora-step00000001-state/") for k in after) and "lora-step00000001.safetensors" in after
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    events = read_events(out)
    assert events[-1]["status"] == "failed" and events[-1]["outputs"] == [str(out / "lora-step00000001.safetensors")]
