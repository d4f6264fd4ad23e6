"""Model files, LoRA and dataset tools, and failing writes (issue 26): pickles never execute,
damaged headers and NaN weights are refused or reported, no tool overwrites its input, and a write
the disk refuses leaves the previous file or state intact."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import struct
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from library.config import build_config
from library.config.options import ModelOptions
from library.errors import UserError
from library.lora.kohya_file import read_lora, write_lora
from library.lora.network import NetworkSpec
from library.models.loader import plan_model
from library.train import checkpoint
from library.utils.atomic import atomic_write_bytes
from library.utils.toolmain import run_tool
from tests.helpers import make_images, random_lora, run_main, tiny_config

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

import check_dataset  # noqa: E402
import convert_lora  # noqa: E402
import edit_captions  # noqa: E402
import extract_lora  # noqa: E402
import inspect_lora  # noqa: E402
import merge_lora  # noqa: E402
import resize_images  # noqa: E402
import resize_lora  # noqa: E402
import sample_lora  # noqa: E402

TRAIN = ["--save_precision", "float", "--mixed_precision", "no", "--log_with", "none"]


def digest(path: Path) -> str:
    if path.is_dir():
        return hashlib.sha256(b"".join(p.name.encode() + digest(p).encode() for p in sorted(path.iterdir()))).hexdigest()
    return hashlib.sha256(path.read_bytes()).hexdigest()


def one_line_error(code: int, err: str, *culprits: str) -> str:
    assert code == 2, err
    assert "Traceback" not in err, err
    lines = [line for line in err.strip().splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    for culprit in culprits:
        assert culprit in lines[0], (culprit, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def loras(tiny_models, tmp_path_factory) -> dict[str, Path]:
    """A good SD1.5 LoRA, the same with one NaN and with one inf value."""
    root = tmp_path_factory.mktemp("loras")
    bundle, network = random_lora(tiny_models["sd15"], NetworkSpec(dim=4, alpha=2.0), 0, 0.1)
    tensors = network.kohya_state_dict(torch.float32)
    meta = {"ss_base_model_version": bundle.base_model_version}
    out = {"good": root / "good.safetensors"}
    write_lora(out["good"], tensors, meta)
    for kind, value in (("nan", float("nan")), ("inf", float("inf"))):
        bad = {k: v.clone() for k, v in tensors.items()}
        key = sorted(k for k in bad if k.endswith("lora_up.weight"))[3]
        bad[key][0, 0] = value
        out[kind] = root / f"{kind}.safetensors"
        write_lora(out[kind], bad, meta)
    return out


# --- pickles -------------------------------------------------------------------------------------

class Payload:
    """Unpickling this creates the marker file: proof that a pickle's code ran."""
    marker = ""

    def __reduce__(self):
        return (open, (self.marker, "w"))


def pickle_file(path: Path, marker: Path) -> Path:
    Payload.marker = str(marker)
    torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": Payload()}, path)
    return path


@pytest.mark.parametrize("option, name", [
    ("pretrained_model_name_or_path", "model.ckpt"), ("pretrained_model_name_or_path", "model.pkl"),
    ("pretrained_model_name_or_path", "model"), ("vae", "vae.pt"), ("vae", "vae.model"),
    ("network_weights", "lora.bin"),
])
def test_pickle_files_are_refused_whatever_they_are_called(tiny_models, images, tmp_path, option, name):
    marker = tmp_path / "ran"
    path = pickle_file(tmp_path / name, marker)
    cfg = tiny_config(tmp_path, tiny_models["sd15"], images)
    with pytest.raises(UserError) as err:
        build_config(str(cfg), [(option, str(path))])
    assert f"{name} is " in str(err.value) and "can run arbitrary code" in str(err.value)
    assert "allow_pickle = true" in str(err.value) and not marker.exists()


def test_a_pickle_renamed_to_safetensors_is_refused_even_with_allow_pickle(tiny_models, images, tmp_path):
    marker = tmp_path / "ran"
    path = pickle_file(tmp_path / "model.safetensors", marker)
    cfg = tiny_config(tmp_path, tiny_models["sd15"], images)
    for extra in ([], [("allow_pickle", "true")]):
        with pytest.raises(UserError, match="model.safetensors holds a pickle"):
            build_config(str(cfg), [("pretrained_model_name_or_path", str(path)), *extra])
    assert not marker.exists()


def test_an_allowed_pickle_is_loaded_with_weights_only_so_its_payload_never_runs(tiny_models, images, tmp_path):
    marker = tmp_path / "ran"
    path = pickle_file(tmp_path / "model.ckpt", marker)
    cfg = tiny_config(tmp_path, tiny_models["sd15"], images)
    code, _, err = run_main(["--config", str(cfg), "--pretrained_model_name_or_path", str(path), "--allow_pickle",
                             "true", "--model_arch", "sd1", "--model_config", str(tiny_models["sd15"]), *TRAIN])
    one_line_error(code, err, "model.ckpt")
    assert not marker.exists()


# --- safetensors headers -------------------------------------------------------------------------

def absurd_headers(folder: Path) -> dict[str, Path]:
    files = {"huge": struct.pack("<Q", 2 ** 62) + b"{}",                    # exabytes claimed
             "longer_than_file": struct.pack("<Q", 5000) + b'{"a": 1}' * 10,  # more than the file holds
             "not_a_table": struct.pack("<Q", 2) + b"[]",
             "short": b"\x01\x02"}
    out = {}
    for name, blob in files.items():
        out[name] = folder / f"{name}.safetensors"
        out[name].write_bytes(blob)
    return out


def test_safetensors_headers_that_claim_absurd_lengths_are_one_line_errors(tiny_models, loras, tmp_path, capsys):
    for name, path in absurd_headers(tmp_path).items():
        with pytest.raises(UserError, match=f"{path.name}: not a readable .safetensors file"):
            read_lora(path)
        with pytest.raises(UserError, match=f"{path.name}: not a readable .safetensors file"):
            plan_model(ModelOptions(pretrained_model_name_or_path=str(path)))
        code = run_tool(inspect_lora.main, [str(path), "--no_diffusers_check"])
        one_line_error(code, capsys.readouterr().err, path.name)
    huge = tmp_path / "huge.safetensors"
    assert "the header claims 4611686018427387904 bytes but the file has 10" in \
        one_line_error(run_tool(convert_lora.main, [str(huge), str(tmp_path / "o.safetensors"), "--to", "kohya"]),
                       capsys.readouterr().err)


# --- NaN and inf in LoRAs ------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["nan", "inf"])
def test_loras_with_nan_or_inf_are_refused_by_every_tool(tiny_models, loras, tmp_path, capsys, kind):
    bad = loras[kind]
    single = tmp_path / "model.safetensors"
    shutil.copy(tiny_models["sd15_single"], single)
    cases = {
        "convert": (convert_lora, [str(bad), str(tmp_path / "c.safetensors"), "--to", "diffusers"]),
        "resize": (resize_lora, [str(bad), str(tmp_path / "r.safetensors"), "--rank", "2", "--quiet"]),
        "merge_loras": (merge_lora, ["--lora", str(loras["good"]), str(bad), "--out", str(tmp_path / "m.safetensors")]),
        "merge_model": (merge_lora, ["--model", str(single), "--lora", str(bad), "--out", str(tmp_path / "mm.safetensors")]),
        "sample": (sample_lora, ["--model", str(tiny_models["sd15"]), "--lora", str(bad), "--prompts", "a cat --s 1",
                                 "--out", str(tmp_path / "samples")]),
    }
    for tool, (module, argv) in cases.items():
        line = one_line_error(run_tool(module.main, argv), capsys.readouterr().err, bad.name)
        assert "hold NaN or infinite values" in line, (tool, line)
    assert not [p for p in tmp_path.iterdir() if p.suffix == ".safetensors" and p != single]
    assert not any((tmp_path / "samples").glob("*.png"))
    # inspect reports it instead
    assert run_tool(inspect_lora.main, [str(bad), "--no_diffusers_check"]) == 0
    out = capsys.readouterr().out
    assert "NaN/inf:       1 tensors hold NaN or infinite values" in out and "DOES NOT LOAD" in out
    assert run_tool(inspect_lora.main, [str(bad), "--json", "--no_diffusers_check"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert len(report["non_finite_tensors"]) == 1 and not report["compatibility"]["a1111"]["loads"]
    assert run_tool(inspect_lora.main, [str(loras["good"]), "--json", "--no_diffusers_check"]) == 0
    assert json.loads(capsys.readouterr().out)["non_finite_tensors"] == []


def test_a_nan_lora_as_network_weights_is_refused(tiny_models, loras, tmp_path):
    images = make_images(tmp_path / "images", 2)
    cfg = tiny_config(tmp_path, tiny_models["sd15"], images, max_train_steps=1)
    code, _, err = run_main(["--config", str(cfg), "--network_weights", str(loras["nan"]), *TRAIN])
    one_line_error(code, err, "nan.safetensors", "NaN or infinite")
    assert not (tmp_path / "out" / "lora.safetensors").exists()


def tiny_state(folder: Path, lora: dict) -> None:
    param = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.SGD([param], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    checkpoint.write_state(folder, lora, optimizer, scheduler, checkpoint.TrainState(1, 1, 1, 0))
    return optimizer, scheduler


def test_a_state_whose_lora_holds_nan_is_damaged(tmp_path):
    tiny_state(tmp_path / "s-state", {"lora_unet_x.lora_down.weight": torch.tensor([[float("nan")]])})
    with pytest.raises(checkpoint.DamagedState, match=r"lora.safetensors: 1 tensors hold NaN or infinite values"):
        checkpoint.read_state(tmp_path / "s-state")


# --- tools and their inputs ----------------------------------------------------------------------

def test_no_tool_overwrites_its_input(tiny_models, loras, tmp_path, capsys):
    lora = tmp_path / "in.safetensors"
    shutil.copy(loras["good"], lora)
    (tmp_path / "hard.safetensors").hardlink_to(lora)
    single = tmp_path / "model.safetensors"
    shutil.copy(tiny_models["sd15_single"], single)
    folder = tmp_path / "model_dir"
    shutil.copytree(tiny_models["sd15"], folder)
    other = tmp_path / "my_stuff"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    images = make_images(tmp_path / "images", 1)
    before = {p: digest(p) for p in (lora, single, folder, other, images)}
    cases = [
        (convert_lora, [str(lora), str(lora), "--to", "kohya"], "is also an input"),
        (convert_lora, [str(lora), str(tmp_path / "hard.safetensors"), "--to", "kohya"], "is also an input"),
        (resize_lora, [str(lora), str(lora), "--rank", "2"], "is also an input"),
        (merge_lora, ["--lora", str(lora), "--out", str(lora)], "is also an input"),
        (merge_lora, ["--model", str(single), "--lora", str(lora), "--out", str(single)], "is also an input"),
        (merge_lora, ["--model", str(folder), "--lora", str(lora), "--out", str(folder)], "is also an input"),
        (merge_lora, ["--model", str(folder), "--lora", str(lora), "--out", str(folder / "merged")], "inside --model"),
        (merge_lora, ["--model", str(folder), "--lora", str(lora), "--out", str(tmp_path)], "inside --model"),
        (merge_lora, ["--model", str(folder), "--lora", str(lora), "--out", str(other)], "not a diffusers model"),
        (extract_lora, ["--base", str(single), "--tuned", str(tiny_models["sd15_single"]), "--rank", "2", "--out",
                        str(single)], "is also an input"),
        (resize_images, [str(images), str(images / ".." / "images")], "must differ from the source"),
    ]
    for tool, argv, said in cases:
        line = one_line_error(run_tool(tool.main, argv), capsys.readouterr().err)
        assert said in line, (argv, line)
    assert {p: digest(p) for p in before} == before


def test_tools_given_a_folder_instead_of_a_file_or_the_reverse(tiny_models, loras, tmp_path, capsys):
    folder = tmp_path / "a_folder.safetensors"
    folder.mkdir()
    a_file = tmp_path / "a_file.png"
    a_file.write_bytes(b"x")
    lora = str(loras["good"])
    cases = [
        (convert_lora, [str(folder), str(tmp_path / "o.safetensors"), "--to", "kohya"], "is a folder"),
        (convert_lora, [lora, str(folder), "--to", "kohya"], "is a folder"),
        (resize_lora, [str(folder), str(tmp_path / "o.safetensors"), "--rank", "2"], "is a folder"),
        (inspect_lora, [str(folder)], "is a folder"),
        (merge_lora, ["--lora", str(folder), "--out", str(tmp_path / "o.safetensors")], "is a folder"),
        (merge_lora, ["--lora", lora, "--out", str(folder)], "is a folder"),
        (extract_lora, ["--base", str(tiny_models["sd15_single"]), "--tuned", str(tiny_models["sd15_single"]),
                        "--rank", "2", "--out", str(folder)], "is a folder"),
        (sample_lora, ["--model", str(tiny_models["sd15"]), "--lora", lora, "--prompts", str(tmp_path), "--out",
                       str(tmp_path / "s")], "is a folder"),
        (sample_lora, ["--model", str(tiny_models["sd15"]), "--lora", str(folder), "--prompts", "a cat", "--out",
                       str(tmp_path / "s")], "is a folder"),
        (resize_images, [str(a_file), str(tmp_path / "dest")], "is a file"),
        (edit_captions, [str(a_file), "--dedupe"], "is a file"),
    ]
    for tool, argv, said in cases:
        line = one_line_error(run_tool(tool.main, argv), capsys.readouterr().err)
        assert said in line, (argv, line)
    assert check_dataset.main(["--dataset_config", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err
    from library.data.labelling import select_images
    with pytest.raises(UserError, match="is a file; expected a folder of images"):
        select_images(a_file, False, ".txt", False)


def test_tools_create_a_missing_output_folder(tiny_models, loras, tmp_path, capsys):
    lora = str(loras["good"])
    deep = tmp_path / "new" / "deeper"
    assert run_tool(convert_lora.main, [lora, str(deep / "c.safetensors"), "--to", "diffusers"]) == 0
    assert run_tool(resize_lora.main, [lora, str(deep / "r" / "r.safetensors"), "--rank", "2", "--quiet"]) == 0
    assert run_tool(merge_lora.main, ["--lora", lora, lora, "--out", str(deep / "m" / "m.safetensors")]) == 0
    images = make_images(tmp_path / "images", 1)
    assert run_tool(resize_images.main, [str(images), str(deep / "imgs"), "--max_resolution", "32x32"]) == 0
    for path in (deep / "c.safetensors", deep / "r" / "r.safetensors", deep / "m" / "m.safetensors"):
        load_file(str(path))
    assert (deep / "imgs" / "img00.png").is_file()


def test_merging_into_a_folder_again_replaces_only_the_earlier_merge(tiny_models, loras, tmp_path):
    out = tmp_path / "merged"
    argv = ["--model", str(tiny_models["sd15"]), "--lora", str(loras["good"]), "--out", str(out)]
    assert run_tool(merge_lora.main, argv) == 0
    first = digest(out)
    assert run_tool(merge_lora.main, argv) == 0  # an existing merged model is replaced, atomically
    assert digest(out) == first and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


# --- writes the machine refuses ------------------------------------------------------------------

def enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("where", ["write", "fsync", "replace"])
def test_a_failing_write_keeps_the_previous_file(tmp_path, monkeypatch, where):
    target = tmp_path / "lora.safetensors"
    target.write_bytes(b"the good earlier file")
    if where == "write":
        monkeypatch.setattr(Path, "write_bytes", enospc)
    elif where == "fsync":
        monkeypatch.setattr(os, "fsync", enospc)
    else:
        monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError(errno.EROFS, "Read-only file system")))
    with pytest.raises(UserError) as err:
        atomic_write_bytes(target, b"new")
    monkeypatch.undo()
    assert str(err.value).startswith(f"{target}: could not be written (")
    assert "the previous file is unchanged" in str(err.value)
    assert target.read_bytes() == b"the good earlier file" and sorted(tmp_path.iterdir()) == [target]


def test_a_failing_lora_save_keeps_the_previous_lora(loras, tmp_path, monkeypatch):
    target = tmp_path / "lora.safetensors"
    shutil.copy(loras["good"], target)
    before = digest(target)
    tensors = load_file(str(loras["good"]))
    monkeypatch.setattr(Path, "write_bytes", enospc)
    with pytest.raises(UserError, match="No space left on device"):
        write_lora(target, tensors, {})
    monkeypatch.undo()
    assert digest(target) == before and sorted(tmp_path.iterdir()) == [target]


@pytest.mark.parametrize("failure", [
    OSError(errno.ENOSPC, "No space left on device"),
    RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"),
    "replace",
])
def test_a_failing_state_save_keeps_the_previous_state(tmp_path, monkeypatch, failure):
    folder = tmp_path / "lora-state"
    lora = {"lora_unet_x.lora_down.weight": torch.ones(1, 1)}
    optimizer, scheduler = tiny_state(folder, lora)
    before = digest(folder)
    calls = []

    def fail(obj, path, *args, **kwargs):
        calls.append(path)
        if Path(path).name == "scheduler.pt":
            raise failure
        return real_save(obj, path, *args, **kwargs)

    real_save, real_replace = torch.save, os.replace
    if failure == "replace":  # killed between the renames' two halves: the old state must come back
        monkeypatch.setattr(os, "replace", lambda a, b: real_replace(a, b) if not str(a).endswith(
            f"tmp{os.getpid()}") else enospc())
    else:
        monkeypatch.setattr(checkpoint.torch, "save", fail)
    with pytest.raises(UserError) as err:
        checkpoint.write_state(folder, {k: v * 2 for k, v in lora.items()}, optimizer, scheduler,
                               checkpoint.TrainState(2, 2, 1, 0))
    monkeypatch.undo()
    assert str(err.value).startswith(f"{folder}: could not be written (") and "previous state is unchanged" in \
        str(err.value)
    assert digest(folder) == before and checkpoint.read_state(folder).state.step == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora-state"]


def test_a_bug_during_a_state_save_is_not_dressed_as_a_disk_problem(tmp_path, monkeypatch):
    folder = tmp_path / "lora-state"
    optimizer, scheduler = tiny_state(folder, {"lora_unet_x.lora_down.weight": torch.ones(1, 1)})
    monkeypatch.setattr(checkpoint, "rng_state", lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        checkpoint.write_state(folder, {}, optimizer, scheduler, checkpoint.TrainState(2, 2, 1, 0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora-state"]
