"""Wrong files, paths and architectures: one-line errors, no traceback, good outputs untouched;
resume past damaged states; one run per output folder; kills during saves leave nothing half-written."""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from library.config import build_config
from library.errors import UserError
from library.lora.kohya_file import write_lora
from library.lora.network import NetworkSpec
from library.train import checkpoint, resume
from library.utils.runlock import LOCK_NAME
from library.utils.toolmain import run_tool
from tests.helpers import make_images, random_lora, run_main, tiny_config

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

import convert_lora  # noqa: E402
import extract_lora  # noqa: E402
import inspect_lora  # noqa: E402
import merge_lora  # noqa: E402
import resize_images  # noqa: E402
import resize_lora  # noqa: E402
import sample_lora  # noqa: E402

ROOT = os.geteuid() == 0 if hasattr(os, "geteuid") else False


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tiny_lora(model: Path, path: Path, spec: NetworkSpec, seed: int = 0) -> Path:
    """A LoRA written by the project's own writer from a tiny model, random non-zero weights."""
    bundle, network = random_lora(model, spec, seed, 0.1)
    write_lora(path, network.kohya_state_dict(torch.float32), {"ss_base_model_version": bundle.base_model_version})
    return path


@pytest.fixture(scope="module")
def corpus(tiny_models, tmp_path_factory) -> dict[str, Path]:
    """Good LoRAs of both architectures and a file of every bad kind."""
    root = tmp_path_factory.mktemp("corpus")
    unet_only = NetworkSpec(dim=4, alpha=2.0)
    files = {"sd15": tiny_lora(tiny_models["sd15"], root / "good_sd15.safetensors", unet_only),
             "sdxl": tiny_lora(tiny_models["sdxl"], root / "other_arch_sdxl.safetensors", unet_only)}
    blob = files["sd15"].read_bytes()
    bad = {
        "truncated": blob[: len(blob) // 2],
        "random": random.Random(3).randbytes(4096),
        "empty": b"",
        "header_only": blob[:8],
    }
    for name, data in bad.items():
        (root / f"{name}.safetensors").write_bytes(data)
        files[name] = root / f"{name}.safetensors"
    files["not_lora"] = root / "not_lora.safetensors"
    save_file({"model.diffusion_model.conv_in.weight": torch.zeros(4, 4, 3, 3), "foo": torch.zeros(3)},
              str(files["not_lora"]))
    state = load_file(str(files["sd15"]))
    files["partial"] = root / "partial_sd15.safetensors"  # a third of its modules renamed to nowhere
    renamed = {}
    for i, (key, value) in enumerate(sorted(state.items())):
        name, _, suffix = key.partition(".")
        renamed[(f"lora_unet_nowhere_{i // 3}" if (i // 3) % 3 == 0 else name) + "." + suffix] = value
    save_file(renamed, str(files["partial"]))
    files["bad_shape"] = root / "bad_shape_sd15.safetensors"  # one module's input size does not fit its layer
    reshaped = dict(state)
    key = next(k for k in sorted(state) if k.endswith("attn2_to_k.lora_down.weight"))
    reshaped[key] = torch.zeros(state[key].shape[0], state[key].shape[1] + 8)
    save_file(reshaped, str(files["bad_shape"]))
    return files


BAD_LORAS = ["truncated", "random", "empty", "header_only", "not_lora", "sdxl", "partial", "bad_shape"]


def assert_one_line_error(code: int, err: str, culprit: str) -> str:
    assert code == 2, err
    assert "Traceback" not in err, err
    lines = [line for line in err.strip().splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and culprit in lines[0], err
    return lines[0]


def tool_argvs(tiny_models, lora: Path, out_dir: Path) -> dict[str, tuple[list[str], Path]]:
    """Each LoRA tool with `lora` as its input, and the output it would write (a good file is put there)."""
    single, folder = tiny_models["sd15_single"], tiny_models["sd15"]
    return {
        "convert": ([str(lora), str(out_dir / "convert.safetensors"), "--to", "diffusers"],
                    out_dir / "convert.safetensors"),
        "resize": ([str(lora), str(out_dir / "resize.safetensors"), "--rank", "2", "--quiet"],
                   out_dir / "resize.safetensors"),
        "inspect": ([str(lora), "--no_diffusers_check"], None),
        "merge_loras": (["--lora", str(lora), "--rank", "2", "--out", str(out_dir / "merged_lora.safetensors")],
                        out_dir / "merged_lora.safetensors"),
        "merge_single": (["--model", str(single), "--lora", str(lora), "--out", str(out_dir / "merged.safetensors")],
                         out_dir / "merged.safetensors"),
        "merge_folder": (["--model", str(folder), "--lora", str(lora), "--out", str(out_dir / "merged_dir")],
                         out_dir / "merged_dir" / "model_index.json"),
        "sample": (["--model", str(folder), "--lora", str(lora), "--prompts", "a cat --s 1", "--out",
                    str(out_dir / "samples"), "--name", "s"], out_dir / "samples" / "s_00_0.png"),
    }


TOOLS = {"convert": convert_lora, "resize": resize_lora, "inspect": inspect_lora, "merge_loras": merge_lora,
         "merge_single": merge_lora, "merge_folder": merge_lora, "sample": sample_lora}


@pytest.mark.parametrize("kind", BAD_LORAS)
def test_every_lora_tool_refuses_a_bad_file_with_one_line(corpus, tiny_models, tmp_path, capsys, kind):
    lora = corpus[kind]
    for tool, (argv, output) in tool_argvs(tiny_models, lora, tmp_path).items():
        if output is not None:
            output.parent.mkdir(parents=True, exist_ok=True)
            output.write_bytes(b"a good earlier output")
        before = digest(output) if output is not None else None
        if kind == "sdxl" and tool in ("convert", "resize", "inspect", "merge_loras"):
            continue  # an SDXL LoRA is a good file for a tool without a model
        if kind in ("partial", "bad_shape") and tool == "inspect":
            assert run_tool(TOOLS[tool].main, argv) == 0  # the diagnostic tool reports what does not fit
            out = capsys.readouterr().out
            assert "DOES NOT LOAD" in out and " modules fit " in out, out
            continue
        code = run_tool(TOOLS[tool].main, argv)
        err = capsys.readouterr().err
        assert_one_line_error(code, err, lora.name)
        if output is not None:
            assert digest(output) == before, (tool, kind)
        if kind == "sdxl":
            assert "SDXL" in err and "SD1.x" in err and re.search(r"\d+ of \d+ modules fit", err), err
        if kind in ("partial", "bad_shape"):
            assert "--allow_partial" in err and " modules fit " in err, err


def test_partial_lora_is_used_only_when_allowed(corpus, tiny_models, tmp_path, capsys):
    out = tmp_path / "part.safetensors"
    assert run_tool(convert_lora.main, [str(corpus["partial"]), str(out), "--to", "kohya", "--allow_partial"]) == 0
    kept = {k.split(".")[0] for k in load_file(str(out))}
    assert kept and not any("nowhere" in k for k in kept)
    assert len(kept) < len({k.split(".")[0] for k in load_file(str(corpus["sd15"]))})
    merged = tmp_path / "merged.safetensors"
    assert run_tool(merge_lora.main, ["--model", str(tiny_models["sd15_single"]), "--lora", str(corpus["partial"]),
                                      "--out", str(merged), "--allow_partial"]) == 0
    assert merged.is_file()
    capsys.readouterr()
    assert run_tool(inspect_lora.main, [str(corpus["partial"]), "--json", "--no_diffusers_check"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["fits"].startswith(f"{report['modules']} of ") and report["unknown_tensors"]


@pytest.mark.parametrize("kind", ["truncated", "random", "not_lora", "sd15", "sdxl_model"])
def test_extract_refuses_bad_models(corpus, tiny_models, tmp_path, capsys, kind):
    # "sd15": a LoRA file given as a model; "sdxl_model": a model of the other architecture
    bad = tiny_models["sdxl_single"] if kind == "sdxl_model" else corpus[kind]
    out = tmp_path / "x.safetensors"
    out.write_bytes(b"good")
    for argv in (["--base", str(bad), "--tuned", str(tiny_models["sd15_single"])],
                 ["--base", str(tiny_models["sd15_single"]), "--tuned", str(bad)]):
        code = run_tool(extract_lora.main, argv + ["--rank", "2", "--out", str(out)])
        assert_one_line_error(code, capsys.readouterr().err, bad.name)
        assert out.read_bytes() == b"good"


def test_tools_refuse_unwritable_outputs_before_loading(corpus, tiny_models, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("in the way")
    lora = str(corpus["sd15"])
    cases = [
        (convert_lora, [lora, str(blocker / "out.safetensors"), "--to", "kohya"], "a_file"),
        (resize_lora, [lora, str(tmp_path), "--rank", "2"], "is a folder"),
        (merge_lora, ["--lora", lora, "--rank", "2", "--out", str(blocker / "sub" / "m.safetensors")], "a_file"),
        (merge_lora, ["--model", str(tiny_models["sd15"]), "--lora", lora, "--out", str(blocker)], "a_file"),
        (extract_lora, ["--base", str(tiny_models["sd15_single"]), "--tuned", str(tiny_models["sd15_single"]),
                        "--rank", "2", "--out", str(blocker / "x.safetensors")], "a_file"),
        (sample_lora, ["--model", str(tiny_models["sd15"]), "--lora", lora, "--prompts", "a cat", "--out",
                       str(blocker)], "a_file"),
        (resize_images, [str(tmp_path), str(blocker / "resized")], "a_file"),
    ]
    for tool, argv, culprit in cases:
        start = time.time()
        code = run_tool(tool.main, argv)
        assert_one_line_error(code, capsys.readouterr().err, culprit)
        assert time.time() - start < 5  # refused before any model or LoRA is read
    assert blocker.read_text() == "in the way"


# --- the trainer --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def run_dir(tiny_models, tmp_path_factory) -> Path:
    """A finished 2-step run with a state after each step: out/lora-step00000001-state, out/lora-state."""
    root = tmp_path_factory.mktemp("run")
    images = make_images(root / "images", 2)
    cfg = tiny_config(root, tiny_models["sd15"], images, max_train_steps=2)
    code, _, err = run_main(["--config", str(cfg), "--save_every_n_steps", "1", "--save_state", "true",
                             "--save_precision", "float", "--mixed_precision", "no", "--log_with", "none"])
    assert code == 0, err
    return root


def fresh_copy(run_dir: Path, tmp_path: Path) -> Path:
    """A copy of the finished run (config paths rewritten to the copy)."""
    shutil.copytree(run_dir, tmp_path / "run")
    cfg = tmp_path / "run" / "config.toml"
    cfg.write_text(cfg.read_text().replace(str(run_dir), str(tmp_path / "run")))
    return tmp_path / "run"


TRAIN = ["--save_precision", "float", "--mixed_precision", "no", "--log_with", "none"]


@pytest.mark.parametrize("kind", ["truncated", "random", "not_lora", "sdxl", "partial", "bad_shape"])
def test_trainer_refuses_bad_network_weights(corpus, run_dir, tmp_path, kind):
    run = fresh_copy(run_dir, tmp_path)
    good = run / "out" / "lora.safetensors"
    before = digest(good)
    code, _, err = run_main(["--config", str(run / "config.toml"), "--network_weights", str(corpus[kind]),
                             "--max_train_steps", "3", *TRAIN])
    assert_one_line_error(code, err, corpus[kind].name)
    assert digest(good) == before
    if kind == "partial":
        assert "network_weights_partial = true" in err


def test_network_weights_partial_starts_the_layers_it_fits(corpus, run_dir, tmp_path):
    run = fresh_copy(run_dir, tmp_path)
    code, _, err = run_main(["--config", str(run / "config.toml"), "--network_weights", str(corpus["partial"]),
                             "--network_weights_partial", "true", "--max_train_steps", "1", "--network_dim", "4",
                             "--output_name", "p", *TRAIN])
    assert code == 0, err
    assert "WARNING" in err and "partial_sd15.safetensors" in err and "modules fit" in err


@pytest.mark.parametrize("option, where", [
    ("output_dir", "file"), ("output_dir", "under_file"), ("logging_dir", "file"), ("latent_cache_dir", "under_file"),
    ("output_dir", "sysfs"),
])
def test_trainer_refuses_unwritable_outputs_before_loading(run_dir, tmp_path, option, where):
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    path = blocker if where == "file" else blocker / "deeper" / "dir"
    if where == "sysfs":  # a parent where nobody, root included, may create a folder
        if not Path("/sys/kernel").is_dir():
            pytest.skip("no sysfs here")
        path = blocker = Path("/sys/kernel/apt-lora-test/out")
    extra = ["--log_with", "tensorboard"] if option == "logging_dir" else ["--log_with", "none"]
    if option == "latent_cache_dir":
        extra += ["--cache_latents_to_disk", "true"]
    start = time.time()
    code, _, err = run_main(["--config", str(run_dir / "config.toml"), f"--{option}", str(path), "--max_train_steps",
                             "3", *extra])
    assert_one_line_error(code, err, str(blocker))
    assert option in err and time.time() - start < 10  # no model was loaded
    assert where == "sysfs" or blocker.read_text() == "x"


@pytest.mark.skipif(ROOT, reason="root writes into read-only folders; the cases above are real for root too")
def test_trainer_refuses_a_read_only_output_dir(run_dir, tmp_path):
    locked = tmp_path / "ro"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        code, _, err = run_main(["--config", str(run_dir / "config.toml"), "--output_dir", str(locked / "out")])
        assert_one_line_error(code, err, str(locked))
    finally:
        locked.chmod(0o700)


def test_second_run_into_a_locked_output_dir_is_refused_and_a_stale_lock_taken_over(run_dir, tmp_path):
    run = fresh_copy(run_dir, tmp_path)
    lock = run / "out" / LOCK_NAME
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock.write_text(json.dumps({"pid": sleeper.pid}))
        code, _, err = run_main(["--config", str(run / "config.toml"), "--resume", "latest", "--max_train_steps",
                                 "3", *TRAIN])
        assert_one_line_error(code, err, f"another run (pid {sleeper.pid}) is writing there")
    finally:
        sleeper.kill()
        sleeper.wait()
    assert lock.is_file() and checkpoint.read_state(run / "out" / "lora-state").state.step == 2
    # the sleeper has gone: its lock is stale; and the newest state is damaged: the run falls back, as asked
    corrupt(run / "out" / "lora-state", "lora")
    code, _, err = run_main(["--config", str(run / "config.toml"), "--resume", "latest_intact", "--max_train_steps",
                             "3", "--save_state", "true", *TRAIN])
    assert code == 0 and "Traceback" not in err, err
    assert f"taking over the lock of pid {sleeper.pid}" in err
    assert "WARNING" in err and "lora-state/lora.safetensors" in err and "at step 1" in err
    assert "resumed from" in err and "lora-step00000001-state at step 1" in err
    assert not lock.exists()  # released at exit
    assert checkpoint.read_state(run / "out" / "lora-state").state.step == 3  # the damaged state replaced
    with safe_open(str(run / "out" / "lora.safetensors"), "pt") as fh:
        assert fh.metadata()["ss_steps"] == "3"


# --- resume ------------------------------------------------------------------------------------

def corrupt(folder: Path, kind: str) -> str:
    """Damage one file of a state folder; returns the name of the damaged file."""
    if kind == "state_json":
        (folder / "state.json").write_text('{"step": 2, "consu')
        return "state.json"
    if kind == "state_json_keys":
        (folder / "state.json").write_text(json.dumps({"version": 1, "step": "two"}))
        return "state.json"
    if kind == "lora":
        data = (folder / "lora.safetensors").read_bytes()
        (folder / "lora.safetensors").write_bytes(data[: len(data) // 3])
        return "lora.safetensors"
    if kind == "optimizer_bytes":
        (folder / "optimizer.pt").write_bytes(random.Random(1).randbytes(3000))
        return "optimizer.pt"
    if kind == "optimizer_groups":
        state = torch.load(folder / "optimizer.pt", weights_only=True)
        state["param_groups"][0]["params"] = state["param_groups"][0]["params"][:-2]
        torch.save(state, folder / "optimizer.pt")
        return "optimizer.pt"
    if kind == "optimizer_shapes":
        state = torch.load(folder / "optimizer.pt", weights_only=True)
        first = next(iter(state["state"].values()))
        first["exp_avg"] = torch.zeros(first["exp_avg"].shape[0] + 1, *first["exp_avg"].shape[1:])
        torch.save(state, folder / "optimizer.pt")
        return "optimizer.pt"
    if kind == "scheduler":
        data = (folder / "scheduler.pt").read_bytes()
        (folder / "scheduler.pt").write_bytes(data[:40])
        return "scheduler.pt"
    if kind == "rng":
        torch.save({"torch": torch.zeros(3)}, folder / "rng.pt")
        return "rng.pt"
    if kind == "missing":
        (folder / "rng.pt").unlink()
        return "rng.pt"
    raise AssertionError(kind)


STATE_DAMAGE = ["state_json", "state_json_keys", "lora", "optimizer_bytes", "optimizer_groups", "optimizer_shapes",
                "scheduler", "rng", "missing"]


@pytest.fixture(scope="module")
def trainer(run_dir):
    """A trainer of the same config (max 3 steps), to resume into without training."""
    from library.train.loop import Trainer

    return Trainer(build_config(str(run_dir / "config.toml"), [("max_train_steps", "3"), ("save_precision", "float"),
                                                               ("mixed_precision", "no"), ("log_with", "none")]))


def restore(trainer, out: Path, where: str = "latest"):
    # the torch optimizer itself: accelerate's wrapper does not outlive the test that made it
    return resume.restore(where, out, "lora", trainer.parts.network, trainer.parts.optimizer.optimizer, trainer.parts.scheduler, 3)


@pytest.mark.parametrize("kind", STATE_DAMAGE)
def test_resume_latest_stops_at_a_damaged_newest_state_naming_the_intact_older_one(run_dir, trainer, tmp_path,
                                                                                   kind):
    run = fresh_copy(run_dir, tmp_path)
    out = run / "out"
    name = corrupt(out / "lora-state", kind)
    before = {k: v.clone() for k, v in trainer.parts.network.kohya_state_dict().items()}
    with pytest.raises(UserError) as err:
        restore(trainer, out)
    message = str(err.value)
    assert "\n" not in message and str(out / "lora-state" / name) in message
    older = out / "lora-step00000001-state"
    assert f"The older state {older} (step 1) is intact" in message
    assert f'resume = "{older}"' in message and 'resume = "latest_intact"' in message
    mine = trainer.parts.network.kohya_state_dict()
    assert all(torch.equal(mine[k], before[k]) for k in before)  # nothing was loaded


@pytest.mark.parametrize("kind", STATE_DAMAGE)
def test_resume_latest_intact_skips_a_damaged_newest_state_with_a_warning(run_dir, trainer, tmp_path, caplog, kind):
    run = fresh_copy(run_dir, tmp_path)
    out = run / "out"
    name = corrupt(out / "lora-state", kind)
    with caplog.at_level("WARNING", logger="library.train.resume"):
        folder, state = restore(trainer, out, "latest_intact")
    assert folder == out / "lora-step00000001-state" and state.step == 1
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    assert str(out / "lora-state" / name) in warning and "resuming from" in warning and "at step 1" in warning
    # the weights of step 1 were loaded, whatever the damaged state had partly loaded before
    saved = load_file(str(out / "lora-step00000001-state" / "lora.safetensors"))
    mine = trainer.parts.network.kohya_state_dict()
    assert all(torch.equal(mine[k], saved[k]) for k in saved)
    # an explicitly named damaged state is an error, not a silent switch to another one
    with pytest.raises(UserError, match=f"{name}.*cannot be resumed from"):
        restore(trainer, out, str(out / "lora-state"))


def outputs_of(out: Path) -> tuple[dict[Path, str], str]:
    """The digest of every file but the event stream, and the event stream's text."""
    events = out / "events.jsonl"
    return {p: digest(p) for p in out.rglob("*") if p.is_file() and p != events}, events.read_text()


def assert_unchanged_but_told(out: Path, hashes: dict[Path, str], events: str, line: str) -> None:
    """No output changed; the event stream only grew, by the error and a failed end."""
    now, text = outputs_of(out)
    assert now == hashes and text.startswith(events)
    added = [json.loads(x) for x in text[len(events):].splitlines()]
    assert [(e["type"], e.get("message", e.get("status"))) for e in added] == [
        ("error", line.removeprefix("error: ")), ("end", "failed")]


def test_resume_latest_with_a_damaged_newest_state_exits_2_and_changes_nothing(run_dir, tmp_path):
    run = fresh_copy(run_dir, tmp_path)
    out = run / "out"
    corrupt(out / "lora-state", "state_json")
    hashes, events = outputs_of(out)
    code, _, err = run_main(["--config", str(run / "config.toml"), "--resume", "latest", "--max_train_steps", "3",
                             *TRAIN])
    line = assert_one_line_error(code, err, "lora-state/state.json")
    assert "lora-step00000001-state (step 1) is intact" in err and "INFO resumed from" not in err
    assert_unchanged_but_told(out, hashes, events, line)


def test_resume_refuses_a_state_of_another_optimizer_or_network(run_dir, trainer):
    sgd = torch.optim.SGD([{"params": g["params"], "lr": 0.1} for g in trainer.parts.optimizer.param_groups])
    with pytest.raises(UserError, match=r"saved by the optimizer torch\.optim\.adamw\.AdamW; this config uses "
                                        r"torch\.optim\.sgd\.SGD"):
        resume.restore("latest", run_dir / "out", "lora", trainer.parts.network, sgd, trainer.parts.scheduler, 3)
    with pytest.raises(UserError, match="already at step 2; raise max_train_steps"):
        resume.restore("latest", run_dir / "out", "lora", trainer.parts.network, trainer.parts.optimizer.optimizer,
                       trainer.parts.scheduler, 2)


@pytest.mark.parametrize("key, value, said", [
    ("dim", 8, "network_dim 8 in the state, 4 now"),
    ("type", "dora", "network_type dora in the state, lora now"),
    ("conv_dim", 2, "conv_dim 2 in the state, unset now"),
    ("text_encoders", True, "text encoders trained (network_train_unet_only = false) True in the state, False now"),
])
def test_resume_of_a_state_of_another_network_names_what_changed(run_dir, trainer, tmp_path, key, value, said):
    run = fresh_copy(run_dir, tmp_path)
    meta_path = run / "out" / "lora-state" / "state.json"
    meta = json.loads(meta_path.read_text())
    meta["network"][key] = value
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(UserError) as err:
        restore(trainer, run / "out")
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{run / 'out' / 'lora-state'}: the state was saved for "
                                                        "another network: ")
    assert said in message and message.count(" in the state, ") == 1, message


def test_resume_names_a_changed_dataset_or_batch_size(run_dir, trainer, tmp_path):
    from library.train.batches import StepPlan

    now = checkpoint.describe_data(trainer.parts.data, trainer.parts.plan)
    assert now == {"images": 2, "reg_images": 0, "held_out": 0, "batch_sizes": [2], "resolutions": ["64x64"],
                   "accumulation": 1, "processes": 1, "steps_per_epoch": 1}
    assert resume.data_changes(now, now) == [] and resume.data_changes({}, now) == []  # states written before
    grown = dict(now, images=5, batch_sizes=[4])
    assert resume.data_changes(grown, now) == ["training images 5 in the state, 2 now",
                                               "batch size 4 in the state, 2 now"]
    plan = StepPlan(trainer.parts.data, 2, 1, 0)
    assert resume.data_changes(now, checkpoint.describe_data(trainer.parts.data, plan)) == [
        "gradient_accumulation_steps 1 in the state, 2 now"]
    # the facts go through state.json and back
    state = checkpoint.TrainState(step=1, consumed=1, epoch=2, position=0, data=now)
    folder = tmp_path / "s-state"
    checkpoint.write_state(folder, trainer.parts.network.kohya_state_dict(), trainer.parts.optimizer.optimizer, trainer.parts.scheduler,
                           state)
    assert checkpoint.read_state(folder).state.data == now


def test_resume_with_no_intact_state_is_one_error_and_changes_nothing(run_dir, tmp_path):
    run = fresh_copy(run_dir, tmp_path)
    out = run / "out"
    corrupt(out / "lora-state", "optimizer_bytes")
    corrupt(out / "lora-step00000001-state", "state_json")
    hashes, events = outputs_of(out)
    code, _, err = run_main(["--config", str(run / "config.toml"), "--resume", "latest", "--max_train_steps", "3",
                             *TRAIN])
    line = assert_one_line_error(code, err, "no intact training state of lora")
    assert "lora-state/optimizer.pt" in err and "lora-step00000001-state/state.json" in err
    assert_unchanged_but_told(out, hashes, events, line)


def test_a_state_saved_on_a_gpu_loads_on_the_cpu(run_dir, trainer, tmp_path):
    """Simulated: the state's tensors are tagged with device cuda:0, as a GPU run writes them."""
    run = fresh_copy(run_dir, tmp_path)
    folder = run / "out" / "lora-state"
    state = torch.load(folder / "optimizer.pt", weights_only=True)
    tagger = (lambda obj: "cuda:0" if getattr(obj, "device", None) is not None and obj.device.type == "cpu" else None)
    torch.serialization.register_package(0, tagger, lambda obj, location: None)
    try:
        torch.save(state, folder / "optimizer.pt")
    finally:
        torch.serialization._package_registry[:] = [
            entry for entry in torch.serialization._package_registry if entry[1] is not tagger]
    if not torch.cuda.is_available():  # the file really names a GPU: a plain torch.load fails here
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(folder / "optimizer.pt", weights_only=True)
    folder_used, loaded = restore(trainer, run / "out")
    assert folder_used == folder and loaded.step == 2
    for value in trainer.parts.optimizer.state.values():
        assert all(t.device.type == "cpu" for t in value.values() if torch.is_tensor(t))


# --- kills --------------------------------------------------------------------------------------

def test_recovery_after_a_kill_between_the_renames_of_a_state(run_dir, tmp_path):
    run = fresh_copy(run_dir, tmp_path)
    out = run / "out"
    os.replace(out / "lora-state", out / ".lora-state.old4242")  # killed after moving the old state away
    (out / ".lora-step00000003-state.tmp4242").mkdir()  # and an unfinished new one
    (out / ".lora.safetensors.ab12cd34.tmp").write_bytes(b"half")  # and an unfinished atomic write
    checkpoint.recover_interrupted_saves(out)
    assert checkpoint.read_state(out / "lora-state").state.step == 2
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []


def saving(out: Path) -> bool:
    return any(p.name.startswith(".") and p.name != LOCK_NAME for p in out.iterdir())


def test_sigkill_during_saves_leaves_only_complete_files(tiny_models, tmp_path):
    """Killed at a random moment of a run that saves after every step: every file under a final name
    is complete, and the resume reaches the step count."""
    images = make_images(tmp_path / "images", 2)
    cfg = tiny_config(tmp_path, tiny_models["sd15"], images, max_train_steps=4)
    base = [sys.executable, "train_apt_lora.py", "--config", str(cfg), *TRAIN]
    out = tmp_path / "out"
    proc = subprocess.Popen(base + ["--save_every_n_steps", "1", "--save_state", "true"], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None and not (out / "lora-step00000001-state").exists():
            time.sleep(0.01)
        # the next save has begun when a temporary file or folder appears; kill at a random point in it
        while time.time() < deadline and proc.poll() is None and not saving(out):
            time.sleep(0.001)
        time.sleep(random.Random().uniform(0, 0.02))
        assert proc.poll() is None, "the run ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    for path in out.glob("*.safetensors"):
        load_file(str(path))  # complete, or it would not load
    for folder in out.glob("*-state"):
        checkpoint.read_state(folder)
    code, _, err = run_main(["--config", str(cfg), "--resume", "latest", *TRAIN])
    assert code == 0, err
    assert "taking over the lock" in err and "resumed from" in err
    with safe_open(str(out / "lora.safetensors"), "pt") as fh:
        assert fh.metadata()["ss_steps"] == "4"
    assert not [p for p in out.iterdir() if p.name.startswith(".") and p.name != LOCK_NAME]
