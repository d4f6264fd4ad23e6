"""Intermediate saves, training state for resume, and pruning of old saves.

Names follow kohya: `name-000003.safetensors` (epoch 3), `name-step00000500.safetensors`
(step 500), `name.safetensors` (final); a state folder is the LoRA name plus `-state`.

A state folder holds the LoRA weights in fp32, the optimizer and scheduler state, the RNG states,
and `state.json` with the cumulative step count and the data position of the next batch. It is
written to a temporary folder and renamed, so a run killed while saving leaves the previous state
intact. Loading uses `torch.load(weights_only=True)`: a state folder cannot run code.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from library.errors import UserError

STATE_VERSION = 1


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
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.tmp{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file({k: v.detach().float().contiguous() for k, v in lora.items()}, str(tmp / "lora.safetensors"))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    rng = rng_state()
    torch.save({k: v for k, v in rng.items() if k in ("torch", "cuda")}, tmp / "rng.pt")
    meta = {"version": STATE_VERSION, **asdict(state), "rng": _python_rng_to_json(rng)}
    (tmp / "state.json").write_text(json.dumps(meta, indent=1))
    for path in tmp.iterdir():
        with open(path, "rb") as fh:
            os.fsync(fh.fileno())
    old = folder.parent / f".{folder.name}.old{os.getpid()}"
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    if old.exists():
        shutil.rmtree(old)


@dataclass
class LoadedState:
    state: TrainState
    lora: dict[str, torch.Tensor]
    optimizer: dict
    scheduler: dict
    rng: dict


def read_state(folder: Path) -> LoadedState:
    meta_path = folder / "state.json"
    if not meta_path.is_file():
        raise UserError(f"{folder}: not a training state folder (no state.json); states are written with "
                        "save_state = true")
    try:
        meta = json.loads(meta_path.read_text())
        state = TrainState(**{k: meta[k] for k in ("step", "consumed", "epoch", "position", "network", "extra")})
        rng = _python_rng_from_json(meta["rng"])
        rng.update(torch.load(folder / "rng.pt", weights_only=True))
        return LoadedState(state, load_file(str(folder / "lora.safetensors")),
                           torch.load(folder / "optimizer.pt", weights_only=True),
                           torch.load(folder / "scheduler.pt", weights_only=True), rng)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise UserError(f"{folder}: damaged training state ({exc})") from None


def find_latest_state(output_dir: Path, output_name: str) -> Path | None:
    """The state folder of `output_name` with the highest step count."""
    best: tuple[int, Path] | None = None
    if not output_dir.is_dir():
        return None
    for folder in output_dir.glob(f"{output_name}*-state"):
        try:
            step = json.loads((folder / "state.json").read_text())["step"]
        except (OSError, ValueError, KeyError):
            continue
        if best is None or step > best[0]:
            best = (step, folder)
    return best[1] if best else None


def prune(output_dir: Path, output_name: str, kind: str, keep: list[int]) -> list[Path]:
    """Delete the `kind` saves (and their states) whose number is not in `keep`."""
    removed = []
    width = 8 if kind == "step" else 6
    prefix = f"{output_name}-step" if kind == "step" else f"{output_name}-"
    for path in output_dir.glob(f"{prefix}*"):
        rest = path.name[len(prefix):]
        digits = rest[:width]
        tail = rest[width:]
        if not digits.isdigit() or tail not in (".safetensors", "-state"):
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


def describe_network(network: Any) -> dict:
    spec = network.spec
    return {"dim": spec.dim, "alpha": spec.alpha, "conv_dim": spec.conv_dim, "conv_alpha": spec.conv_alpha,
            "text_encoders": spec.train_text_encoders, "modules": len(network.layers),
            **({"type": spec.network_type, "lokr_factor": spec.lokr_factor} if spec.network_type != "lora" else {})}
