"""The web UI's API (tools/ui) through Starlette's TestClient.

The run tests start real processes: the end-to-end one the real trainer on a tiny model (started
through the API, its events read, stopped by command, resumed, saved and sampled by command,
finished), the queue / lock / restart / failure ones a stand-in that writes the same events in a
fraction of a second (tests/fake_trainer.py).
"""
from __future__ import annotations

import json
import sys
import time
import tomllib
from pathlib import Path

import pytest

pytest.importorskip("starlette", reason="the web UI extra is not installed (pip install -r requirements-ui.txt)")
pytest.importorskip("httpx", reason="starlette's TestClient needs httpx (requirements-ui.txt)")

from starlette.testclient import TestClient  # noqa: E402

from library.devkit import make_images  # noqa: E402
from tools.ui import forms  # noqa: E402
from tools.ui.app import create_app  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FAKE = [sys.executable, str(ROOT / "tests" / "fake_trainer.py")]


@pytest.fixture(scope="session")
def tiny_sd15(tmp_path_factory) -> Path:
    """Only the SD1.5 tiny model (conftest's tiny_models builds SDXL too, which these tests do not use)."""
    from library.models.tiny import build_tiny_pipeline, save_diffusers

    folder = tmp_path_factory.mktemp("ui-model") / "tiny-sd15"
    save_diffusers(build_tiny_pipeline("sd1", seed=0), folder)
    return folder


def tiny_run_values(tmp_path: Path, model: Path, *, steps: int, sample_every: int | None = None,
                    output: str = "out") -> tuple[dict, str]:
    """Form values and dataset TOML of a tiny run, as a user would enter them."""
    images = make_images(tmp_path / "images", 4)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a shape, colour 1, plain background --w 64 --h 64 --s 2 --d 5\n")
    values = {
        "pretrained_model_name_or_path": str(model),
        "network_dim": "4",
        "learning_rate": "0.001",
        "max_train_steps": str(steps),
        "train_batch_size": "2",
        "max_data_loader_n_workers": "0",
        "output_dir": str(tmp_path / output),
        "save_state": True,
        "log_with": "none",
        "sample_prompts": str(prompts),
    }
    if sample_every:
        values["sample_every_n_steps"] = str(sample_every)
    dataset = f'[[datasets]]\nresolution = 64\n\n[[datasets.subsets]]\nimage_dir = "{images}"\n'
    return values, dataset


def _wait(check, what: str, timeout: float = 90):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _events(client, run_id):
    return client.get(f"/api/runs/{run_id}/events").json()["events"]


def _status(client, run_id):
    return client.get(f"/api/runs/{run_id}").json()["status"]


def _ack(client, run_id, command_id):
    return client.get(f"/api/runs/{run_id}/command/{command_id}").json()["event"]


# --- the form ---------------------------------------------------------------------------------------

def test_form_has_every_option_with_its_declaration():
    from library.config.loader import all_options

    tables = forms.form_schema()
    by_key = {o["key"]: o for t in tables for o in t["options"]}
    assert set(by_key) == set(all_options())
    assert [t["table"] for t in tables] == ["model", "network", "optimizer", "training", "data", "saving", "sampling",
                                            "logging", "apt"]
    dim = by_key["network_dim"]
    assert (dim["kind"], dim["default"], dim["ge"], dim["help"]) == ("int", 16, 1, "LoRA rank of the linear layers")
    assert by_key["save_precision"]["kind"] == "choice" and by_key["save_precision"]["choices"] == ["float", "fp16",
                                                                                                     "bf16"]
    assert by_key["network_type"]["choices"][:1] == ["lora"]  # from the network-kind table
    assert (by_key["apt.bins"]["ge"], by_key["apt.bins"]["le"]) == (2, 100)
    assert by_key["pretrained_model_name_or_path"]["required"]
    assert by_key["no_half_vae"]["kind"] == "bool" and by_key["no_half_vae"]["optional"]
    assert by_key["validation_timesteps"]["kind"] == "toml"
    assert by_key["validation_timesteps"]["default"] == [100, 300, 500, 700, 900]


def test_each_mistake_beside_its_field_with_the_cli_message(tmp_path, tiny_sd15):
    client = TestClient(create_app(tmp_path / "ws", launcher=FAKE, scheduler=False))
    values, dataset = tiny_run_values(tmp_path, tiny_sd15, steps=3)
    values.update({"network_dim": "0", "learning_rate": "fast", "apt.bins": "1", "rs_layers": "[", "save_precision": "fp8"})
    result = client.post("/api/validate", json={"values": values, "dataset_toml": dataset}).json()
    assert not result["ok"] and result["resolved"] is None
    got = {e["field"]: e["message"].split(": ", 1)[1] for e in result["errors"]}
    assert got == {
        "rs_layers": 'unknown option',
        "network_dim": "[network] network_dim: expected an integer >= 1, got 0",
        "save_precision": "[saving] save_precision: expected one of 'float', 'fp16', 'bf16', got 'fp8'",
        "learning_rate": "[optimizer] learning_rate: expected a number > 0, got 'fast'",
        "apt.bins": "[apt] bins: expected an integer >= 2 and <= 100, got 1",
    }
    # the same file through the CLI gives the same line (the UI adds nothing of its own)
    from tests.helpers import run_main

    code, _, err = run_main(["--config", str(tmp_path / "ws" / "scratch" / "validate" / "config.toml"),
                             "--print_config"])
    assert code == 2 and err.strip().startswith("error: ") and "network_dim: expected an integer >= 1, got 0" in err

    # a mistake in the dataset TOML goes beside the dataset editor; a missing model beside its field
    bad = client.post("/api/validate", json={"values": {**tiny_run_values(tmp_path, tiny_sd15, steps=3)[0]},
                                             "dataset_toml": dataset + "num_repeat = 2\n"}).json()
    assert [e["field"] for e in bad["errors"]] == [forms.DATASET_FIELD]
    assert "num_repeat" in bad["errors"][0]["message"] and "did you mean num_repeats" in bad["errors"][0]["message"]
    missing = client.post("/api/validate", json={"values": {}, "dataset_toml": dataset}).json()
    assert missing["errors"][0]["field"] == "pretrained_model_name_or_path"
    assert "required option missing" in missing["errors"][0]["message"]


def test_valid_form_gives_the_toml_that_runs(tmp_path, tiny_sd15):
    client = TestClient(create_app(tmp_path / "ws", launcher=FAKE, scheduler=False))
    values, dataset = tiny_run_values(tmp_path, tiny_sd15, steps=3)
    values["validation_timesteps"] = "[100, 500]"
    result = client.post("/api/validate", json={"values": values, "dataset_toml": dataset}).json()
    assert result["ok"], result["errors"]
    doc = tomllib.loads(result["toml"])
    assert doc["network"]["network_dim"] == 4 and doc["training"]["validation_timesteps"] == [100, 500]
    assert doc["data"]["dataset_config"] == "dataset.toml" and doc["saving"]["save_state"] is True
    assert tomllib.loads(result["dataset_toml"])["datasets"][0]["resolution"] == 64
    assert "network_dim = 4" in result["resolved"] and "# vae = (unset)" in result["resolved"]


def test_presets_load_with_their_paths_and_validate(tmp_path):
    client = TestClient(create_app(tmp_path / "ws", launcher=FAKE, scheduler=False))
    names = [p["name"] for p in client.get("/api/presets").json()["presets"]]
    assert {"demo", "sd15", "sdxl"} <= set(names)
    demo = client.get("/api/presets/demo").json()
    assert demo["values"]["pretrained_model_name_or_path"] == str(ROOT / "demo" / "base_model")
    assert demo["values"]["apt.zoom_max"] == 1.0 and demo["values"]["apt"] is True
    assert f'image_dir = "{ROOT / "demo" / "concept"}"' in demo["dataset_toml"]
    result = client.post("/api/validate", json={"values": demo["values"], "dataset_toml": demo["dataset_toml"]}).json()
    assert result["ok"], result["errors"]
    assert client.get("/api/presets/..%2Fpyproject").status_code in (400, 404)


def test_toml_writer_round_trips():
    doc = {"model": {"pretrained_model_name_or_path": 'C:\\models\\a "b".safetensors', "vae": "x\ny"},
           "optimizer": {"optimizer_args": {"weight_decay": 0.01}, "learning_rate": 1e-4},
           "training": {"validation_timesteps": [100, 200], "apt": True},
           "datasets": [{"resolution": [512, 768], "subsets": [{"image_dir": "a"}, {"image_dir": "b", "is_reg": True}]}]}
    assert tomllib.loads(forms.dump_toml(doc)) == doc


# --- runs -------------------------------------------------------------------------------------------

def test_tiny_run_through_the_api_stop_resume_save_sample_finish(tmp_path, tiny_sd15):
    """The real trainer, started detached by the API: every command's effect is checked."""
    app = create_app(tmp_path / "ws", launcher="python", scheduler=False)
    client = TestClient(app)
    values, dataset = tiny_run_values(tmp_path, tiny_sd15, steps=12)  # room for commands after the resume
    created = client.post("/api/runs", json={"name": "tiny", "values": values, "dataset_toml": dataset})
    assert created.status_code == 201, created.json()
    run_id = created.json()["run"]["id"]
    out = tmp_path / "out"
    assert created.json()["run"]["output_dir"] == str(out)

    _wait(lambda: any(e["type"] == "step" for e in _events(client, run_id)), "the first step")
    start = next(e for e in _events(client, run_id) if e["type"] == "start")
    assert start["v"] == 1 and start["max_steps"] == 12 and start["dataset"]["images"] == 4
    assert _status(client, run_id) == "running"
    # a second run into the same folder is refused with the trainer's message
    second = client.post("/api/runs", json={"name": "again", "values": values, "dataset_toml": dataset})
    assert second.status_code == 409
    assert "another run (pid" in second.json()["error"] and "wait for it to finish or choose another output_dir" in \
        second.json()["error"]
    assert second.json()["errors"][0]["field"] == "output_dir"

    stop = client.post(f"/api/runs/{run_id}/command", json={"command": "stop"}).json()["id"]
    _wait(lambda: _status(client, run_id) == "stopped", "the stop")
    ack = _ack(client, run_id, stop)
    stopped_at = ack["step"]
    end = [e for e in _events(client, run_id) if e["type"] == "end"][-1]
    assert end["status"] == "stopped" and end["step"] == stopped_at < 12
    saves = [e for e in _events(client, run_id) if e["type"] == "save"]
    assert saves[-1]["state"] and Path(saves[-1]["state"]).is_dir()  # the resumable state of the stop
    assert client.post(f"/api/runs/{run_id}/command", json={"command": "save"}).status_code == 400  # not running

    resumed = client.post(f"/api/runs/{run_id}/resume", json={})
    assert resumed.status_code == 200, resumed.json()
    detail = client.get(f"/api/runs/{run_id}").json()
    assert detail["launches"] == 2 and detail["argv"][-2:] == ["--resume", "latest"]
    _wait(lambda: [e for e in _events(client, run_id) if e["type"] == "start"][1:], "the resumed start")
    restart = [e for e in _events(client, run_id) if e["type"] == "start"][-1]
    assert restart["resumed_from"]
    save = client.post(f"/api/runs/{run_id}/command", json={"command": "save"}).json()["id"]
    sample = client.post(f"/api/runs/{run_id}/command", json={"command": "sample"}).json()["id"]
    _wait(lambda: _status(client, run_id) == "finished", "the end of the run", 180)
    events = _events(client, run_id)
    first_resumed_step = next(e["step"] for e in events[events.index(restart):] if e["type"] == "step")
    assert first_resumed_step == stopped_at + 1  # resume continues where the stop left off
    save_ack, sample_ack = _ack(client, run_id, save), _ack(client, run_id, sample)
    assert save_ack and sample_ack
    # the trainer reports a command once acted on: its save / sample event comes just before
    saved = [e for e in events[:events.index(save_ack)] if e["type"] == "save" and e["step"] == save_ack["step"]]
    assert saved and Path(saved[-1]["path"]).is_file() and Path(saved[-1]["state"]).is_dir()
    samples = [e for e in events[:events.index(sample_ack)] if e["type"] == "sample" and e["step"] == sample_ack["step"]]
    assert samples and samples[0]["images"][0]["seed"] == 5  # the prompt file's --d
    image = client.get(f"/api/runs/{run_id}/file", params={"path": samples[0]["images"][0]["path"]})
    assert image.status_code == 200 and image.content[:8] == b"\x89PNG\r\n\x1a\n"
    assert client.get(f"/api/runs/{run_id}/file", params={"path": str(ROOT / "pyproject.toml")}).status_code == 404
    end = events[-1]
    assert end["type"] == "end" and end["status"] == "finished" and end["step"] == 12

    results = client.get(f"/api/runs/{run_id}/results").json()
    final = next(f for f in results["loras"] if f["name"] == "lora.safetensors")
    assert final["summary"]["architecture"] and final["summary"]["ranks"] == {"4": final["summary"]["modules"]}
    assert final["metadata"]["ss_network_dim"] == "4"
    # the stream of a finished run sends every event, then done
    with client.stream("GET", f"/api/runs/{run_id}/stream") as stream:
        lines = [line for line in stream.iter_lines() if line.startswith("event:")]
    assert lines.count("event: trainer") == len(events) and lines[-1] == "event: done"


def _fake_app(tmp_path, **kw):
    return create_app(tmp_path / "ws", launcher=FAKE, scheduler=False, **kw)


def _fake_values(tmp_path, tiny_sd15, steps=3, output="out"):
    values, dataset = tiny_run_values(tmp_path, tiny_sd15, steps=steps, output=output)
    return values, dataset


def test_queue_runs_one_after_another(tmp_path, tiny_sd15):
    app = _fake_app(tmp_path)
    client = TestClient(app)
    ids = []
    for name in ("a", "b"):
        values, dataset = _fake_values(tmp_path, tiny_sd15, steps=5, output=f"out-{name}")
        r = client.post("/api/runs", json={"name": name, "values": values, "dataset_toml": dataset, "queue": True})
        assert r.status_code == 201 and r.json()["run"]["status"] == "queued"
        ids.append(r.json()["run"]["id"])
    ws = app.state.workspace
    assert ws.tick() == ids[0] and ws.tick() is None  # the second waits while the first runs
    assert _status(client, ids[1]) == "queued"
    _wait(lambda: _status(client, ids[0]) == "finished", "the first run")
    assert ws.tick() == ids[1]
    _wait(lambda: _status(client, ids[1]) == "finished", "the second run")
    first_end = _events(client, ids[0])[-1]["time"]
    second_start = _events(client, ids[1])[0]["time"]
    assert second_start > first_end
    # a queued run can be taken off the queue; it never starts
    values, dataset = _fake_values(tmp_path, tiny_sd15, steps=5, output="out-c")
    third = client.post("/api/runs", json={"name": "c", "values": values, "dataset_toml": dataset, "queue": True})
    third_id = third.json()["run"]["id"]
    assert client.post(f"/api/runs/{third_id}/cancel", json={}).json()["run"]["status"] == "cancelled"
    assert ws.tick() is None and not (tmp_path / "out-c").exists()


def test_side_by_side_pairs_samples_by_prompt_and_seed(tmp_path, tiny_sd15):
    client = TestClient(_fake_app(tmp_path))
    ids = []
    for name, apt in (("lora", False), ("apt", True)):
        values, dataset = _fake_values(tmp_path, tiny_sd15, steps=4, output=f"out-{name}")
        values.update({"sample_every_n_steps": "2", "apt": apt})
        ids.append(client.post("/api/runs", json={"name": name, "values": values, "dataset_toml": dataset}).json()["run"]["id"])
    for run_id in ids:
        _wait(lambda: _status(client, run_id) == "finished", "the runs")
    data = client.get("/api/compare", params={"a": ids[0], "b": ids[1]}).json()
    assert [s["run"]["method"] for s in data["sides"]] == ["lora", "apt"]
    assert [s["samples"]["step"] for s in data["sides"]] == [4, 4]  # the latest samples of each
    assert len(data["pairs"]) == 1 and (data["pairs"][0]["prompt"], data["pairs"][0]["seed"]) == ("a shape", 1)
    a, b = data["pairs"][0]["images"]
    assert Path(a["path"]).parent.parent.name == "out-lora" and Path(b["path"]).parent.parent.name == "out-apt"


def test_runs_survive_a_ui_restart_and_reattach(tmp_path, tiny_sd15):
    values, dataset = _fake_values(tmp_path, tiny_sd15, steps=400)
    client = TestClient(_fake_app(tmp_path))
    run_id = client.post("/api/runs", json={"name": "long", "values": values, "dataset_toml": dataset}).json()["run"]["id"]
    _wait(lambda: _status(client, run_id) == "running", "the run")
    del client  # the UI goes away; the run is in its own session and goes on

    again = TestClient(_fake_app(tmp_path))
    runs = again.get("/api/runs").json()["runs"]
    assert [r["id"] for r in runs] == [run_id] and runs[0]["status"] == "running"
    before = again.get(f"/api/runs/{run_id}").json()["step"]
    _wait(lambda: again.get(f"/api/runs/{run_id}").json()["step"] > before, "steps after the restart")
    again.post(f"/api/runs/{run_id}/command", json={"command": "stop"})
    _wait(lambda: _status(again, run_id) == "stopped", "the stop")


def test_failed_run_shows_its_error_line_and_log(tmp_path, tiny_sd15):
    crash = [sys.executable, "-c", "import sys; print('loading...'); print('error: model.safetensors: truncated file', "
                                   "file=sys.stderr); sys.exit(2)"]
    client = TestClient(create_app(tmp_path / "ws", launcher=crash, scheduler=False))
    values, dataset = _fake_values(tmp_path, tiny_sd15)
    run_id = client.post("/api/runs", json={"name": "bad", "values": values, "dataset_toml": dataset}).json()["run"]["id"]
    _wait(lambda: _status(client, run_id) == "failed", "the failure", 30)
    detail = client.get(f"/api/runs/{run_id}").json()
    assert detail["error"] == "model.safetensors: truncated file"
    assert detail["log_tail"] == ["loading...", "error: model.safetensors: truncated file"]


def test_stop_while_loading_terminates_the_process_group(tmp_path, tiny_sd15):
    slow = [sys.executable, "-c", "import time; time.sleep(120)"]  # a trainer still loading a big model
    app = create_app(tmp_path / "ws", launcher=slow, scheduler=False)
    client = TestClient(app)
    values, dataset = _fake_values(tmp_path, tiny_sd15)
    run_id = client.post("/api/runs", json={"name": "slow", "values": values, "dataset_toml": dataset}).json()["run"]["id"]
    assert _status(client, run_id) == "starting"
    assert client.post(f"/api/runs/{run_id}/command", json={"command": "save"}).status_code == 400
    assert client.post(f"/api/runs/{run_id}/command", json={"command": "stop"}).json()["id"] == "SIGTERM"
    _wait(lambda: _status(client, run_id) == "stopped", "the process to end", 20)
    assert app.state.workspace._procs == {} or all(p.poll() is not None for p in app.state.workspace._procs.values())


def test_commands_are_only_for_running_runs_and_must_be_known(tmp_path, tiny_sd15):
    client = TestClient(_fake_app(tmp_path))
    values, dataset = _fake_values(tmp_path, tiny_sd15, steps=400)
    run_id = client.post("/api/runs", json={"name": "x", "values": values, "dataset_toml": dataset}).json()["run"]["id"]
    _wait(lambda: _status(client, run_id) == "running", "the run")
    bad = client.post(f"/api/runs/{run_id}/command", json={"command": "explode"})
    assert bad.status_code == 400 and "expected one of stop, save, sample" in bad.json()["error"]
    cid = client.post(f"/api/runs/{run_id}/command", json={"command": "stop"}).json()["id"]
    line = json.loads((tmp_path / "out" / "commands.jsonl").read_text().splitlines()[-1])
    assert line == {"command": "stop", "id": cid}
    _wait(lambda: _status(client, run_id) == "stopped", "the stop")
    assert client.post(f"/api/runs/{run_id}/command", json={"command": "stop"}).status_code == 400
    assert client.get("/api/runs/nope").status_code == 404


# --- dataset ----------------------------------------------------------------------------------------

def test_dataset_report_and_caption_edit_keeps_the_original(tmp_path):
    from PIL import Image

    folder = make_images(tmp_path / "data", 3, caption="sks, red, circle")
    (folder / "img01.txt").write_text("sks, blue")
    Image.new("RGB", (96, 64)).save(folder / "wide.png")  # no caption
    (folder / "broken.png").write_bytes(b"not an image")
    client = TestClient(_fake_app(tmp_path))
    rep = client.post("/api/dataset/scan", json={"folder": str(folder)}).json()
    assert rep["images"] == 4 and len(rep["images_list"]) == 4
    assert rep["tag_frequency"] == {"sks": 3, "red": 2, "circle": 2, "blue": 1}
    assert [Path(p).name for p in rep["missing_captions"]] == ["wide.png"]
    assert [Path(p.split(":")[0]).name for p in rep["bad_files"]] == ["broken.png"]
    assert sum(b["count"] for b in rep["buckets"]) == 4
    item = next(i for i in rep["images_list"] if i["path"].endswith("img00.png"))
    assert item["caption"] == "sks, red, circle" and not item["backup"]
    assert client.get("/api/dataset/image", params={"path": item["path"]}).content[:4] == b"\x89PNG"

    cap = Path(item["caption_file"])
    first = client.post("/api/dataset/caption", json={"caption_file": str(cap), "text": "sks, red, disc"}).json()
    client.post("/api/dataset/caption", json={"caption_file": str(cap), "text": "sks, crimson disc"})
    assert cap.read_text() == "sks, crimson disc\n"
    assert Path(first["backup"]).read_text() == "sks, red, circle"  # the original, kept once, never overwritten
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no temporary file left
    # a caption for the image that had none is created; files outside the scanned folders are refused
    wide = next(i for i in rep["images_list"] if i["path"].endswith("wide.png"))
    client.post("/api/dataset/caption", json={"caption_file": wide["caption_file"], "text": "sks, wide"})
    assert (folder / "wide.txt").read_text() == "sks, wide\n"
    outside = client.post("/api/dataset/caption", json={"caption_file": str(tmp_path / "x.txt"), "text": "x"})
    assert outside.status_code == 400 and not (tmp_path / "x.txt").exists()
    assert client.get("/api/dataset/image", params={"path": str(ROOT / "README.md")}).status_code == 400


def test_folder_tool_launched_from_the_ui(tmp_path):
    folder = make_images(tmp_path / "data", 2, caption="sks, red")
    client = TestClient(_fake_app(tmp_path))
    job = client.post("/api/tools", json={"tool": "edit_captions", "folder": str(folder), "args": "--add photo"})
    assert job.status_code == 202, job.json()
    state = _wait(lambda: (lambda s: s if not s["running"] else None)(client.get(f"/api/tools/{job.json()['job']}").json()),
                  "the tool", 60)
    assert state["exit_code"] == 0, state["log"]
    assert (folder / "img00.txt").read_text().strip() == "sks, red, photo"
    assert client.post("/api/tools", json={"tool": "rm", "folder": str(folder)}).status_code == 400


# --- access -----------------------------------------------------------------------------------------

def test_token_and_local_only_headers(tmp_path):
    client = TestClient(_fake_app(tmp_path, token="s3cret"))
    assert client.get("/api/options").status_code == 401
    assert client.get("/api/options", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.get("/api/options", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    page = client.get("/?token=s3cret")
    assert page.status_code == 200 and "apt_webui_token=s3cret" in page.headers["set-cookie"]
    assert client.get("/api/options").status_code == 200  # the cookie from now on
    csp = page.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "connect-src 'self'" in csp
    local = TestClient(_fake_app(tmp_path), base_url="http://evil.example")
    assert local.get("/").status_code == 400  # a page of another site reaching 127.0.0.1 by DNS is refused


def test_other_sites_cannot_start_anything(tmp_path, tiny_sd15):
    client = TestClient(_fake_app(tmp_path))
    values, dataset = _fake_values(tmp_path, tiny_sd15)
    body = json.dumps({"name": "x", "values": values, "dataset_toml": dataset})
    # a form or fetch of another page can send text/plain without asking first: refused
    plain = client.post("/api/runs", content=body, headers={"Content-Type": "text/plain"})
    assert plain.status_code == 403 and "JSON body" in plain.text
    foreign = client.post("/api/runs", content=body, headers={"Content-Type": "application/json",
                                                              "Origin": "http://evil.example"})
    assert foreign.status_code == 403 and "evil.example" in foreign.text
    assert client.get("/api/runs").json()["runs"] == []
    same = client.post("/api/validate", content=body, headers={"Content-Type": "application/json",
                                                               "Origin": "http://testserver"})
    assert same.status_code == 200


def test_bundled_assets_reference_nothing_outside(tmp_path):
    static = ROOT / "tools" / "ui" / "static"
    html = (static / "index.html").read_text()
    for attr in ("src=\"http", "href=\"http", "src=\"//", "href=\"//"):
        assert attr not in html
    assert "http" not in (static / "app.js").read_text()
    assert (static / "vendor" / "uplot" / "LICENSE").read_text().startswith("The MIT License")
    client = TestClient(_fake_app(tmp_path))
    assert client.get("/static/vendor/uplot/uPlot.iife.min.js").status_code == 200


def test_cli_refuses_listen_without_token(capsys, monkeypatch):
    from library.utils.toolmain import run_tool
    from tools.webui import main

    monkeypatch.delenv("APT_WEBUI_TOKEN", raising=False)
    assert run_tool(main, ["--listen"]) == 2
    assert "--listen: an access token is required" in capsys.readouterr().err


def test_events_are_read_as_the_trainer_appends(tmp_path):
    from tools.ui.events import read_events
    from tools.ui.runs import Workspace

    path = tmp_path / "out" / "events.jsonl"
    path.parent.mkdir()
    step = json.dumps({"v": 1, "type": "step", "step": 1}) + "\n"
    path.write_text(json.dumps({"v": 1, "type": "start"}) + "\n" + '{"v": 1, "type": "st\n' + step + '{"v": 1, "ty')
    events, offset = read_events(path)
    assert [e["type"] for e in events] == ["start", "step"]  # the torn line skipped, the half line left
    assert offset == path.stat().st_size - len('{"v": 1, "ty')
    with open(path, "a") as fh:
        fh.write('pe": "end", "status": "finished"}\n')
    more, end = read_events(path, offset)
    assert more == [{"v": 1, "type": "end", "status": "finished"}] and end == path.stat().st_size
    # the workspace's cached reader gives the same, from any line's offset
    ws = Workspace(tmp_path / "ws", launcher=FAKE)
    rec = {"output_dir": str(path.parent)}
    assert ws.events(rec)[0] == events + more
    assert ws.events(rec, offset)[0] == more and ws.events(rec, end) == ([], end)
