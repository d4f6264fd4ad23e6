"""Intermediate saves, training state for resume, and pruning of old saves.

Names follow kohya: `name-000003.safetensors` (epoch 3), `name-step00000500.safetensors`
(step 500), `name.safetensors` (final); a state folder is the LoRA name plus `-state`.

A state folder holds the LoRA weights in fp32, the optimizer and scheduler state, the RNG states,
and `state.json` with the cumulative step count and the data position of the next batch. It is
written to a temporary folder and renamed, so a run killed while saving leaves the previous state
intact (`recover_interrupted_saves` finishes or removes what such a run left). Loading uses
`torch.load(weights_only=True, map_location="cpu")`: a state folder cannot run code, and a state
saved on any GPU loads on any machine (the optimizer moves it to its parameters' device).
Every file is checked as it is read; a damaged one is a `DamagedState` naming it.
"""
from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from library.config.network_kinds import network_kind
from library.errors import UserError
from library.lora.kohya_file import non_finite
from library.utils.atomic import failed_write, is_leftover, write_failure

STATE_VERSION = 1
STATE_SUFFIX = "-state"
EMA_SUFFIX = "-ema"  # name-ema.safetensors beside name.safetensors: the EMA weights (ema = true)
STATE_FILES = ("state.json", "lora.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt")
_INTERRUPTED = re.compile(r"\.(.+)\.(old|tmp)(\d+)")  # write_state's temporary folder names
log = logging.getLogger(__name__)


def save_name(output_name: str, kind: str, number: int = 0) -> str:
    if kind == "step":
        return f"{output_name}-step{number:08d}"
    if kind == "epoch":
        return f"{output_name}-{number:06d}"
    return output_name


@dataclass
class TrainState:
    step: int                    # optimizer steps completed
    consumed: int                # micro-batches consumed by all processes together
    epoch: int                   # epoch of the next batch (from 1)
    position: int                # position of the next batch in that epoch's order
    network: dict = field(default_factory=dict)   # ranks/targets: resume refuses a different network
    extra: dict = field(default_factory=dict)     # e.g. the APT indicator
    data: dict = field(default_factory=dict)      # describe_data: resume names what changed since
    # Tensor groups besides the LoRA (the EMA weights): name -> tensors, one <name>.safetensors each.
    tensors: dict = field(default_factory=dict)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _python_rng_to_json(state: dict) -> dict:
    version, internal, gauss = state["python"]
    np_state = state["numpy"]
    out = {"python": [version, list(internal), gauss],
           "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])]}
    return out


def _python_rng_from_json(data: dict) -> dict:
    version, internal, gauss = data["python"]
    n = data["numpy"]
    return {"python": (version, tuple(internal), gauss),
            "numpy": (n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4])}


def write_state(folder: Path, lora: dict[str, torch.Tensor], optimizer, scheduler, state: TrainState) -> None:
    """Write the state folder through a temporary one. A write that fails (a full disk, a folder made
    read-only) removes the temporary folder and leaves the previous state as it was: a one-line
    UserError when the machine refused the write, else the original exception."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.tmp{os.getpid()}"
    old = folder.parent / f".{folder.name}.old{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        tmp.mkdir()
        save_file({k: v.detach().float().contiguous() for k, v in lora.items()}, str(tmp / "lora.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        rng = rng_state()
        torch.save({k: v for k, v in rng.items() if k in ("torch", "cuda")}, tmp / "rng.pt")
        for group, tensors in state.tensors.items():
            save_file({k: v.detach().float().cpu().contiguous() for k, v in tensors.items()},
                      str(tmp / f"{group}.safetensors"))
        fields_ = {k: v for k, v in asdict(state).items() if k != "tensors"}
        meta = {"version": STATE_VERSION, **fields_, "tensor_files": sorted(state.tensors),
                "rng": _python_rng_to_json(rng), "optimizer_class": optimizer_class(optimizer)}
        (tmp / "state.json").write_text(json.dumps(meta, indent=1))
        for path in tmp.iterdir():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
        if folder.exists():
            os.replace(folder, old)
        os.replace(tmp, folder)
    except BaseException as exc:
        if old.exists() and not folder.exists():
            os.replace(old, folder)  # the previous state goes back under its name
        shutil.rmtree(tmp, ignore_errors=True)
        reason = write_failure(exc) if isinstance(exc, Exception) else None
        if reason is None:
            raise
        raise failed_write(folder, reason, "state") from None
    if old.exists():
        shutil.rmtree(old)


@dataclass
class LoadedState:
    state: TrainState
    lora: dict[str, torch.Tensor]
    optimizer: dict
    scheduler: dict
    rng: dict
    optimizer_class: str | None = None  # None in states written before it was recorded


def optimizer_class(optimizer) -> str:
    inner = getattr(optimizer, "optimizer", optimizer)  # the torch optimizer inside accelerate's wrapper
    return f"{type(inner).__module__}.{type(inner).__name__}"


class DamagedState(UserError):
    """One file of a state folder cannot be used; `file` names it."""

    def __init__(self, file: Path, reason: str):
        super().__init__(f"{file}: {reason}")
        self.file = file
        self.reason = reason


def describe_error(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:200]


def _torch_file(path: Path, kind: type = dict):
    try:
        value = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise DamagedState(path, "missing") from None
    except Exception as exc:  # a damaged pickle raises any of a dozen types; all mean the same here
        raise DamagedState(path, f"unreadable ({describe_error(exc)})") from None
    if not isinstance(value, kind):
        raise DamagedState(path, f"holds a {type(value).__name__}, not a {kind.__name__}")
    return value


def _rng_from(meta: dict, meta_path: Path, rng_path: Path) -> dict:
    try:
        rng = _python_rng_from_json(meta["rng"])
        random.Random().setstate(rng["python"])  # applied to throwaway generators: proves they load
        np.random.RandomState().set_state(rng["numpy"])
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise DamagedState(meta_path, f"damaged random-generator state ({describe_error(exc)})") from None
    saved = _torch_file(rng_path)
    try:
        torch.Generator().set_state(saved["torch"])
    except (KeyError, TypeError, RuntimeError) as exc:
        raise DamagedState(rng_path, f"damaged random-generator state ({describe_error(exc)})") from None
    rng.update(saved)
    return rng


def _tensor_file(path: Path) -> dict[str, torch.Tensor]:
    try:
        tensors = load_file(str(path))
    except FileNotFoundError:
        raise DamagedState(path, "missing") from None
    except Exception as exc:  # safetensors' own error type
        raise DamagedState(path, f"unreadable ({describe_error(exc)})") from None
    bad = non_finite(tensors)
    if bad:
        raise DamagedState(path, f"{len(bad)} tensors hold NaN or infinite values (e.g. {bad[0]})")
    return tensors


def read_state(folder: Path) -> LoadedState:
    """Read and check every file of a state folder (nothing is applied here)."""
    meta_path = folder / "state.json"
    if not any((folder / name).exists() for name in STATE_FILES):
        raise UserError(f"{folder}: not a training state folder (no state.json); states are written with "
                        "save_state = true")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        state = TrainState(**{k: meta[k] for k in ("step", "consumed", "epoch", "position", "network", "extra")},
                           data=meta.get("data") or {})
    except FileNotFoundError:
        raise DamagedState(meta_path, "missing") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DamagedState(meta_path, f"unreadable ({describe_error(exc)})") from None
    if meta.get("version") != STATE_VERSION or not all(isinstance(v, int) and v >= 0 for v in
                                                        (state.step, state.consumed, state.epoch, state.position)):
        raise DamagedState(meta_path, f"not a state of version {STATE_VERSION} with whole step counts")
    rng = _rng_from(meta, meta_path, folder / "rng.pt")
    lora = _tensor_file(folder / "lora.safetensors")
    for group in meta.get("tensor_files") or []:
        state.tensors[group] = _tensor_file(folder / f"{group}.safetensors")
    optimizer = _torch_file(folder / "optimizer.pt")
    if not isinstance(optimizer.get("param_groups"), list) or not isinstance(optimizer.get("state"), dict):
        raise DamagedState(folder / "optimizer.pt", "not an optimizer state (no param_groups/state)")
    return LoadedState(state, lora, optimizer, _torch_file(folder / "scheduler.pt"), rng,
                       meta.get("optimizer_class"))


def _state_step(folder: Path) -> int | None:
    try:
        step = json.loads((folder / "state.json").read_text(encoding="utf-8"))["step"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return step if isinstance(step, int) else None


def state_folders(output_dir: Path, output_name: str) -> list[Path]:
    """The state folders of `output_name`, newest first: ordered by their step count; one whose
    state.json cannot be read is placed by its step-save number, or else by when it was written."""
    if not output_dir.is_dir():
        return []
    found = []
    for folder in output_dir.iterdir():
        name = folder.name
        if not (name.startswith(output_name) and name.endswith(STATE_SUFFIX) and folder.is_dir()):
            continue
        middle = name[len(output_name):-len(STATE_SUFFIX)]
        numbered = re.fullmatch(r"-step(\d{8})|-\d{6}|", middle)
        if numbered is None:
            continue  # another output_name that starts with this one
        step = _state_step(folder)
        if step is None and numbered[1]:
            step = int(numbered[1])
        found.append((folder, step, folder.stat().st_mtime))
    readable = [(mtime, step) for _, step, mtime in found if step is not None]

    def order(item) -> float:
        folder, step, mtime = item
        if step is not None:
            return step
        before = [s for m, s in readable if m <= mtime]
        return max(before) + 0.5 if before else -0.5

    return [folder for folder, _, _ in sorted(found, key=order, reverse=True)]


def recover_interrupted_saves(output_dir: Path) -> None:
    """Finish or remove what a run killed while saving left behind (call only while holding the
    output folder's lock): a state folder caught between its two renames is put back, temporary
    folders and files are deleted, so nothing half-written remains."""
    if not output_dir.is_dir():
        return
    for folder in (output_dir, output_dir / "sample"):
        for path in folder.iterdir() if folder.is_dir() else []:
            m = _INTERRUPTED.fullmatch(path.name)
            if m and path.is_dir():
                final = output_dir / m[1]
                if m[2] == "old" and not final.exists():
                    os.replace(path, final)
                    log.warning("%s: restored (a run was killed while replacing it)", final)
                else:
                    shutil.rmtree(path)
            elif is_leftover(path):
                path.unlink()


def prune(output_dir: Path, output_name: str, kind: str, keep: list[int]) -> list[Path]:
    """Delete the `kind` saves (and their states) whose number is not in `keep`."""
    removed = []
    width = 8 if kind == "step" else 6
    prefix = f"{output_name}-step" if kind == "step" else f"{output_name}-"
    for path in output_dir.glob(f"{prefix}*"):
        rest = path.name[len(prefix):]
        digits = rest[:width]
        tail = rest[width:]
        if not digits.isdigit() or tail not in (".safetensors", "-state", f"{EMA_SUFFIX}.safetensors"):
            continue
        if int(digits) in keep:
            continue
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
        removed.append(path)
    return removed


def existing_numbers(output_dir: Path, output_name: str, kind: str) -> list[int]:
    width = 8 if kind == "step" else 6
    prefix = f"{output_name}-step" if kind == "step" else f"{output_name}-"
    numbers = set()
    for path in output_dir.glob(f"{prefix}*.safetensors"):
        digits = path.name[len(prefix):len(prefix) + width]
        if digits.isdigit() and path.name[len(prefix) + width:] == ".safetensors":
            numbers.add(int(digits))
    return sorted(numbers)


def describe_data(data: Any, plan: Any) -> dict:
    """What a state records of the dataset and the step plan (library.data.dataset.TrainingData,
    library.train.batches.StepPlan), so that a resume can say what changed since."""
    train = data.train_indices()
    reg = sum(1 for i in train if data.records[i].subset.is_reg)
    return {"images": len(train) - reg, "reg_images": reg, "held_out": len(data.validation),
            "batch_sizes": list(data.batch_sizes), "resolutions": [f"{w}x{h}" for w, h in
                                                                   (t.resolution for t in data.tables)],
            "accumulation": plan.accumulation, "processes": plan.world, "steps_per_epoch": plan.steps_per_epoch}


def describe_network(network: Any) -> dict:
    """What identifies the network a state was saved for (library.train.resume compares it)."""
    spec = network.spec
    keys = network_kind(spec.network_type).state_keys
    kind = {} if keys is None else {"type": spec.network_type, **{k: getattr(spec, k) for k in keys}}
    # per-block ranks (kohya's block_dims...): recorded only when set, so older states still match
    blocks = {k: list(v) if isinstance(v, tuple) else v for k in ("block_dims", "block_alphas", "conv_block_dims",
                                                                  "conv_block_alphas")
              if (v := getattr(spec, k, None)) is not None}
    return {"dim": spec.dim, "alpha": spec.alpha, "conv_dim": spec.conv_dim, "conv_alpha": spec.conv_alpha,
            "text_encoders": spec.train_text_encoders, "modules": len(network.layers), **kind, **blocks}
