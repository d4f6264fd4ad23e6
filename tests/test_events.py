"""The trainer reports and listens: output_dir/events.jsonl (schema v1) and output_dir/commands.jsonl
(stop, save, sample), checked field by field on tiny runs."""
from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from library.config import build_config
from library.train import checkpoint
from library.train.control import COMMANDS_NAME, CommandFile, send_command
from library.train.events import EVENTS_NAME, EventLog, jsonable, read_events as tail
from library.train.loop import Trainer
from tests.helpers import make_images, run_main, tiny_config

TRAIN = ["--save_precision", "float", "--mixed_precision", "no", "--log_with", "none"]


def read_events(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / EVENTS_NAME).read_text().splitlines()]


def of_type(events: list[dict], kind: str) -> list[dict]:
    return [e for e in events if e["type"] == kind]


def send(out: Path, command: str, ident: str) -> None:
    send_command(out, command, ident)


def commanding(monkeypatch, at: dict[int, list[tuple[str, str]]]) -> None:
    """Every Trainer built from now on appends these commands to its command file after step k
    (1-based), as a UI would while the step runs."""
    real_init = Trainer.__init__

    def init(self, cfg):
        real_init(self, cfg)
        out = Path(cfg.saving.output_dir)

        def listener(report, values):
            for command, ident in at.get(report.step, []):
                send(out, command, ident)

        self.listeners.append(listener)

    monkeypatch.setattr(Trainer, "__init__", init)


def prompts_file(tmp_path: Path) -> str:
    path = tmp_path / "prompts.txt"
    path.write_text("a red circle --s 2 --d 11\na blue disc --s 2\n")
    return str(path)


# --- a finished run's events, field by field -----------------------------------------------------

@pytest.fixture(scope="module")
def apt_run(tiny_models, tmp_path_factory):
    """A 4-step APT run with validation, samples every 2 steps and saves every 2 steps (with state)."""
    root = tmp_path_factory.mktemp("events")
    images = make_images(root / "images", 4)
    cfg_path = tiny_config(root, tiny_models["sd15"], images, max_train_steps=4, apt=True,
                           validate_every_n_steps=2)
    cfg_path.write_text(cfg_path.read_text().replace("resolution = 64", "resolution = 64\nvalidation_split = 0.25"))
    cfg = build_config(str(cfg_path), [("log_with", "none"), ("sample_prompts", prompts_file(root)),
                                       ("sample_every_n_steps", "2"), ("save_every_n_steps", "2"),
                                       ("save_state", "true"), ("mixed_precision", "no")])
    trainer = Trainer(cfg)
    trainer.run()
    return root, trainer, read_events(root / "out")


def test_every_event_has_the_envelope_and_the_order_of_a_run(apt_run):
    root, trainer, events = apt_run
    assert {e["v"] for e in events} == {1}
    assert len({e["run"] for e in events}) == 1
    times = [e["time"] for e in events]
    assert times == sorted(times) and all(isinstance(t, float) for t in times)
    kinds = [e["type"] for e in events]
    assert kinds[0] == "start" and kinds[-1] == "end"
    # validation at the start (step 0), then per step: step, save, sample, validation as due
    assert kinds == ["start", "validation", "step", "step", "save", "sample", "validation", "step", "step",
                     "sample", "validation", "save", "end"]
    assert [e["step"] for e in events if e["type"] != "start"] == [0, 1, 2, 2, 2, 2, 3, 4, 4, 4, 4, 4]


def test_the_start_event(apt_run):
    root, trainer, events = apt_run
    start = events[0]
    assert start["max_steps"] == 4 and start["step"] == 0 and start["resumed_from"] is None
    assert start["pid"] == os.getpid() and start["output_dir"] == str(root / "out")
    assert start["method"] == "apt" and start["network_type"] == "lora"
    config = start["config"]
    assert config["training"]["max_train_steps"] == 4 and config["training"]["apt"] is True
    assert config["network"]["network_dim"] == 4 and config["saving"]["save_every_n_steps"] == 2
    assert config["optimizer"]["learning_rate"] == 1e-3
    dataset = start["dataset"]
    # 4 images, one held out for validation; one 64 px bucket
    assert dataset["images"] == 3 and dataset["validation_images"] == 1 and dataset["reg_images"] == 0
    assert dataset["subsets"] == [{"dir": str(root / "images"), "images": 3, "repeats": 1, "is_reg": False,
                                   "dataset": 0}]
    assert dataset["buckets"] == [[64, 64, 3]]


def test_step_events(apt_run):
    root, trainer, events = apt_run
    steps = of_type(events, "step")
    assert [e["step"] for e in steps] == [1, 2, 3, 4]
    assert [e["loss"] for e in steps] == trainer.losses
    # the moving average the progress bar shows (decay 0.95)
    avg = trainer.losses[0]
    for e, loss in zip(steps, trainer.losses):
        avg = loss if e["step"] == 1 else 0.95 * avg + 0.05 * loss
        assert e["loss_avg"] == pytest.approx(avg, rel=1e-12)
    assert all(e["lr"] == {"unet": 1e-3} for e in steps)  # constant schedule, U-Net only
    # 3 training images, batch 2: two batches per epoch
    assert [e["epoch"] for e in steps] == [1, 1, 2, 2]
    for e in steps:
        assert e["s_per_step"] > 0 and e["eta_s"] >= 0
        assert isinstance(e["peak_memory_bytes"], int) and e["peak_memory_bytes"] > 2 ** 20
        assert e["metrics"]["loss"] == e["loss"] and e["grad_norm"] == e["metrics"]["grad_norm"]
    assert steps[-1]["eta_s"] == 0
    # APT: gamma per bin as the indicator holds it after the last step, and the batch's mean loss weight
    apt = steps[-1]["apt"]
    indicator = trainer.parts.method.controller.indicator
    assert apt["gamma"] == [float(g) for g in indicator.gamma()] and len(apt["gamma"]) == 10
    assert apt["bins"] == [0, 100, 200, 300, 400, 500, 600, 700, 800, 900]
    assert apt["loss_weight"] == steps[-1]["metrics"]["apt/loss_weight"] and 0 < apt["loss_weight"] <= 1


def test_validation_sample_save_and_end_events(apt_run):
    root, trainer, events = apt_run
    out = root / "out"
    validation = of_type(events, "validation")
    assert [(e["step"], e["loss"]) for e in validation] == trainer.reporting.outputs.validation_history
    assert all(e["losses"]["val/loss"] == e["loss"] for e in validation)
    samples = of_type(events, "sample")
    assert [e["step"] for e in samples] == [2, 4]
    # the seed of a prompt without --d is the training seed (7) plus its index
    assert samples[0]["images"] == [
        {"path": str(out / "sample" / "lora_000002_00_11.png"), "prompt": "a red circle", "seed": 11},
        {"path": str(out / "sample" / "lora_000002_01_8.png"), "prompt": "a blue disc", "seed": 8}]
    assert samples[0]["grid"] == str(out / "sample" / "lora_000002_grid.png")
    assert all(Path(i["path"]).is_file() for e in samples for i in e["images"])
    saves = of_type(events, "save")
    assert saves[0] == {**saves[0], "step": 2, "path": str(out / "lora-step00000002.safetensors"),
                        "state": str(out / "lora-step00000002-state"), "kind": "step"}
    assert saves[1] == {**saves[1], "step": 4, "path": str(out / "lora.safetensors"),
                        "state": str(out / "lora-state"), "kind": "final"}
    assert checkpoint.read_state(Path(saves[0]["state"])).state.step == 2
    end = events[-1]
    assert end["status"] == "finished" and end["step"] == 4
    assert end["outputs"] == [str(out / "lora-step00000002.safetensors"), str(out / "lora.safetensors")]
    assert end["states"] == [str(out / "lora-step00000002-state"), str(out / "lora-state")]


# --- commands ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def uninterrupted(tiny_models, tmp_path_factory):
    """The LoRA of a 4-step run that nobody stopped."""
    root = tmp_path_factory.mktemp("whole")
    cfg = tiny_config(root, tiny_models["sd15"], make_images(root / "images", 2), max_train_steps=4)
    code, _, err = run_main(["--config", str(cfg), *TRAIN])
    assert code == 0, err
    return load_file(str(root / "out" / "lora.safetensors"))


def test_stop_command_saves_a_resumable_state_and_exits_0_and_the_resume_appends(tiny_models, tmp_path,
                                                                                monkeypatch, uninterrupted):
    cfg = tiny_config(tmp_path, tiny_models["sd15"], make_images(tmp_path / "images", 2), max_train_steps=4)
    out = tmp_path / "out"
    out.mkdir()
    send(out, "stop", "for an earlier run")  # already there when the run starts: not for this run
    commanding(monkeypatch, {2: [("stop", "ui-1")]})
    code, _, err = run_main(["--config", str(cfg), *TRAIN])  # save_state is off: the stop saves one anyway
    assert code == 0, err
    assert "stopped at step 2" in err
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        COMMANDS_NAME, EVENTS_NAME, "lora-step00000002-state", "lora-step00000002.safetensors"]
    first = read_events(out)
    assert [e["type"] for e in first] == ["start", "step", "step", "command", "save", "end"]
    assert first[3] == {**first[3], "command": "stop", "id": "ui-1", "step": 2, "source": "file"}
    assert first[4]["state"] == str(out / "lora-step00000002-state")
    assert first[-1] == {**first[-1], "status": "stopped", "step": 2,
                         "outputs": [str(out / "lora-step00000002.safetensors")]}
    assert checkpoint.read_state(out / "lora-step00000002-state").state.step == 2

    monkeypatch.undo()
    code, _, err = run_main(["--config", str(cfg), "--resume", "latest", *TRAIN])
    assert code == 0, err
    events = read_events(out)
    assert events[:len(first)] == first  # appended, nothing rewritten
    second = events[len(first):]
    assert [e["type"] for e in second] == ["start", "step", "step", "save", "end"]
    assert len({e["run"] for e in second}) == 1 and second[0]["run"] != first[0]["run"]
    assert second[0]["resumed_from"] == str(out / "lora-step00000002-state") and second[0]["step"] == 2
    assert [e["step"] for e in second[1:3]] == [3, 4] and second[-1]["status"] == "finished"
    # stopped and resumed is the same training as never stopped
    resumed = load_file(str(out / "lora.safetensors"))
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed)


def test_save_and_sample_commands_act_at_their_step(tiny_models, tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path, tiny_models["sd15"], make_images(tmp_path / "images", 2), max_train_steps=3)
    out = tmp_path / "out"
    import library.train.loop as loop

    real_build = loop.build_run

    def build_run(cfg):  # the save is sent while the model loads: it counts, after the first step
        run = real_build(cfg)
        send(out, "save", "s1")
        return run

    monkeypatch.setattr(loop, "build_run", build_run)
    commanding(monkeypatch, {2: [("sample", "p1")]})
    code, _, err = run_main(["--config", str(cfg), "--sample_prompts", prompts_file(tmp_path), *TRAIN])
    assert code == 0, err
    # the save: LoRA and state at step 1, though this config saves neither along the way
    assert checkpoint.read_state(out / "lora-step00000001-state").state.step == 1
    assert load_file(str(out / "lora-step00000001.safetensors"))
    # the sample round: step 2 only (no sample_every_n_steps)
    assert sorted(p.name for p in (out / "sample").iterdir()) == [
        "lora_000002_00_11.png", "lora_000002_01_8.png", "lora_000002_grid.png"]
    events = read_events(out)
    assert [e["type"] for e in events] == ["start", "step", "save", "command", "step", "sample", "command", "step",
                                           "save", "end"]
    acks = of_type(events, "command")
    assert [(e["command"], e["id"], e["step"]) for e in acks] == [("save", "s1", 1), ("sample", "p1", 2)]
    assert events[2] == {**events[2], "step": 1, "path": str(out / "lora-step00000001.safetensors"),
                         "state": str(out / "lora-step00000001-state")}
    assert events[-1]["status"] == "finished" and events[-1]["step"] == 3


def test_malformed_commands_are_warning_events_and_a_sample_without_prompts_is_said(tiny_models, tmp_path,
                                                                                   monkeypatch):
    cfg = tiny_config(tmp_path, tiny_models["sd15"], make_images(tmp_path / "images", 2), max_train_steps=2)
    out = tmp_path / "out"
    real_init = Trainer.__init__

    def init(self, cfg):
        real_init(self, cfg)

        def listener(report, values):
            if report.step == 1:
                with open(out / COMMANDS_NAME, "a") as fh:
                    fh.write('not json\n{"command": "explode", "id": "x"}\n{"command": "sample", "id": "p"}\n')

        self.listeners.append(listener)

    monkeypatch.setattr(Trainer, "__init__", init)
    code, _, err = run_main(["--config", str(cfg), *TRAIN])
    assert code == 0, err
    events = read_events(out)
    warnings = [e["message"] for e in of_type(events, "warning")]
    assert len(warnings) == 3, warnings
    assert warnings[0].startswith(f"{out / COMMANDS_NAME}: ignored the line 'not json'")
    assert "'{\"command\": \"explode\", \"id\": \"x\"}'" in warnings[1]
    assert warnings[2] == "sample command p: this run has no sample_prompts; nothing to render"
    assert [(e["command"], e["step"]) for e in of_type(events, "command")] == [("sample", 1)]
    assert events[-1]["status"] == "finished"


# --- the writer and the reader alone ---------------------------------------------------------------

def test_the_command_file_is_read_line_by_line_from_where_the_run_started(tmp_path):
    path = tmp_path / COMMANDS_NAME
    path.write_text('{"command": "stop", "id": "old"}\n')
    said = []
    reader = CommandFile(path, said.append)
    assert reader.read() == []  # the line before the run
    with open(path, "a") as fh:
        fh.write('{"command": "save", "id": 7}\n{"command": "sam')  # the second line is still being written
    got = reader.read()
    assert [(c.command, c.id) for c in got] == [("save", "7")]
    with open(path, "a") as fh:
        fh.write('ple"}\n\n[1, 2]\n')
    got = reader.read()
    assert [(c.command, c.id) for c in got] == [("sample", None)]
    assert said == [f"{path}: ignored the line '[1, 2]': a command is "
                    '{"command": "stop" | "save" | "sample", "id": "..."}']
    path.write_text('{"command": "stop", "id": "new"}\n')  # replaced by a shorter file: read from its start
    assert [(c.command, c.id) for c in reader.read()] == [("stop", "new")]
    path.unlink()
    assert reader.read() == []


def test_events_are_plain_json_lines_and_a_cut_line_is_ended(tmp_path):
    path = tmp_path / EVENTS_NAME
    path.write_text('{"v": 1, "type": "step", "st')  # a killed writer's last line
    log = EventLog(path, "r1")
    log.emit("step", step=1, loss=float("nan"), lr={"unet": float("inf")}, path=tmp_path, shape=(1, 2),
             value=torch.tensor(0.5))
    log.close()
    lines = path.read_text().splitlines()
    assert lines[0] == '{"v": 1, "type": "step", "st'
    event = json.loads(lines[1])
    assert event == {"v": 1, "type": "step", "time": event["time"], "run": "r1", "step": 1, "loss": None,
                     "lr": {"unet": None}, "path": str(tmp_path), "shape": [1, 2], "value": 0.5}
    assert jsonable({1: {2, }}) == {"1": [2]}
    # the reader skips the cut line and waits for a line's newline
    with open(path, "a") as fh:
        fh.write('{"v": 1, "type": "end", "st')
    events, offset = tail(path)
    assert events == [event] and offset == len(path.read_bytes()) - len('{"v": 1, "type": "end", "st')
    with open(path, "a") as fh:
        fh.write('atus": "finished"}\n')
    assert tail(path, offset) == ([{"v": 1, "type": "end", "status": "finished"}], len(path.read_bytes()))
    EventLog(None).emit("step", step=1)  # another process than the main one: nothing, nowhere


def test_an_unwritable_events_file_is_one_warning_and_never_an_exception(tmp_path, monkeypatch, caplog):
    log = EventLog(tmp_path / EVENTS_NAME, "r1")
    real_open = open

    def full(path, *args, **kwargs):
        if str(path).endswith(EVENTS_NAME):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", full)
    for step in range(3):
        log.emit("step", step=step)
    monkeypatch.undo()
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == [f"{tmp_path / EVENTS_NAME}: cannot write training events (No space left on device); "
                        "training goes on without them"]
    assert not log.enabled and not (tmp_path / EVENTS_NAME).exists()


def test_a_run_whose_events_file_cannot_be_written_trains_to_the_end(tiny_models, tmp_path):
    cfg = tiny_config(tmp_path, tiny_models["sd15"], make_images(tmp_path / "images", 2), max_train_steps=2)
    (tmp_path / "out" / EVENTS_NAME).mkdir(parents=True)  # a folder where the file belongs
    code, _, err = run_main(["--config", str(cfg), *TRAIN])
    assert code == 0, err
    assert err.count("cannot write training events") == 1 and "WARNING" in err
    assert load_file(str(tmp_path / "out" / "lora.safetensors"))
