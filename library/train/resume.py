"""Resume: choose a training state, check all of it, and load it into the network, optimizer,
scheduler and random generators, or stop with a one-line error before any step is trained.

With resume = "latest" the newest state folder is used. When it is damaged (any file unreadable,
or not fitting the network and optimizer being trained) the run stops: silently training on from
an older step would throw away the steps after it without the user knowing. The error names the
damaged file and the newest older state that is intact, which the user can name in `resume`;
resume = "latest_intact" is the explicit opt-in to take that state, with a WARNING naming the
skipped file. A state folder named explicitly is never replaced by another one. A state saved for
another network, or already at the configured step count, is an error, not a reason to fall back:
an older state of the same run would not fix it.
"""
from __future__ import annotations

import copy
import logging
from pathlib import Path

from library.errors import UserError
from library.lora.compat import fit, network_target
from library.train import checkpoint
from library.train.checkpoint import DamagedState, LoadedState, TrainState

log = logging.getLogger(__name__)


LATEST = "latest"
LATEST_INTACT = "latest_intact"
# describe_network's keys as the options that set them, for "what changed" messages.
NETWORK_KEYS = {"type": "network_type", "dim": "network_dim", "alpha": "network_alpha", "conv_dim": "conv_dim",
                "conv_alpha": "conv_alpha", "lokr_factor": "lokr_factor",
                "text_encoders": "text encoders trained (network_train_unet_only = false)",
                "modules": "trained modules", "block_dims": "block_dims", "block_alphas": "block_alphas",
                "conv_block_dims": "conv_block_dims", "conv_block_alphas": "conv_block_alphas"}
NETWORK_DEFAULTS = {"type": "lora", "lokr_factor": -1}  # left out of describe_network for plain LoRA
# describe_data's keys, for the same messages.
DATA_KEYS = {"images": "training images", "reg_images": "regularisation images", "held_out": "validation images",
             "batch_sizes": "batch size", "resolutions": "resolution", "accumulation": "gradient_accumulation_steps",
             "processes": "processes", "steps_per_epoch": "steps per epoch"}


def _show(value) -> str:
    if value is None:
        return "unset"
    if isinstance(value, list):
        return "/".join(_show(v) for v in value)
    return str(value)


def _changes(saved: dict, now: dict, labels: dict, defaults: dict) -> list[str]:
    out = []
    for key, label in labels.items():
        old, new = saved.get(key, defaults.get(key)), now.get(key, defaults.get(key))
        if old != new:
            out.append(f"{label} {_show(old)} in the state, {_show(new)} now")
    return out


def network_changes(saved: dict, now: dict) -> list[str]:
    """What differs between two describe_network results, by option name."""
    found = _changes(saved, now, NETWORK_KEYS, NETWORK_DEFAULTS)
    if not found and saved != now:
        found = [f"{saved} in the state, {now} now"]
    return found


def data_changes(saved: dict, now: dict) -> list[str]:
    """What differs between two checkpoint.describe_data results (nothing for states that have none)."""
    if not saved:
        return []
    return _changes(saved, now, DATA_KEYS, {})


def _check_run(folder: Path, loaded: LoadedState, network, optimizer, total_steps: int) -> None:
    mine = checkpoint.describe_network(network)
    if loaded.state.network != mine:
        raise UserError(f"{folder}: the state was saved for another network: "
                        + "; ".join(network_changes(loaded.state.network, mine))
                        + "; resume with the settings it was saved with, or start a new run")
    ours = checkpoint.optimizer_class(optimizer)
    if loaded.optimizer_class not in (None, ours):
        raise UserError(f"{folder}: the state was saved by the optimizer {loaded.optimizer_class}; this config uses "
                        f"{ours}; resume with the same optimizer_type")
    if loaded.state.step >= total_steps:
        raise UserError(f"{folder}: already at step {loaded.state.step}; raise max_train_steps "
                        f"(now {total_steps}) to continue")


def _check_optimizer(path: Path, saved: dict, optimizer) -> None:
    """The saved groups must hold as many parameters as ours, and per-parameter state tensors of a
    parameter's rank must have its shape (torch's load_state_dict checks neither)."""
    groups = saved["param_groups"]
    ours = optimizer.param_groups
    sizes = [len(g.get("params", ())) if isinstance(g, dict) else -1 for g in groups]
    if sizes != [len(g["params"]) for g in ours]:
        raise DamagedState(path, f"parameter groups of sizes {sizes}; the optimizer being trained has "
                                 f"{[len(g['params']) for g in ours]}")
    params = [p for g in ours for p in g["params"]]
    ids = [i for g in groups for i in g["params"]]
    by_id = dict(zip(ids, params))
    for key, state in saved["state"].items():
        param = by_id.get(key)
        if param is None or not isinstance(state, dict):
            raise DamagedState(path, f"state for an unknown parameter {key!r}")
        for name, value in state.items():
            if hasattr(value, "shape") and value.ndim == param.ndim and tuple(value.shape) != tuple(param.shape):
                raise DamagedState(path, f"{name} of parameter {key} has shape {tuple(value.shape)}, the parameter "
                                         f"{tuple(param.shape)}")


def _load_into(obj, saved: dict, path: Path) -> None:
    """load_state_dict, undone when it fails half-way (the next candidate starts from a clean object)."""
    before = copy.deepcopy(obj.state_dict())
    try:
        obj.load_state_dict(saved)
    except Exception as exc:  # whatever a damaged state makes torch raise
        obj.load_state_dict(before)
        raise DamagedState(path, f"does not load ({checkpoint.describe_error(exc)})") from None


def _apply(folder: Path, loaded: LoadedState, network, optimizer, scheduler) -> None:
    lora_path = folder / "lora.safetensors"
    got = fit(loaded.lora, {}, str(lora_path), network_target(network, "the network being trained"))
    if not got.complete:
        raise DamagedState(lora_path, f"only {got.matched} of the {len(network.layers)} trained modules have "
                                      "weights of the right shape")
    _check_optimizer(folder / "optimizer.pt", loaded.optimizer, optimizer)
    network.load_modules(got.weights.modules, str(lora_path))
    _load_into(optimizer, loaded.optimizer, folder / "optimizer.pt")
    _load_into(scheduler, loaded.scheduler, folder / "scheduler.pt")
    checkpoint.set_rng_state(loaded.rng)


def _intact(folder: Path, network, optimizer, total_steps: int) -> LoadedState | None:
    """The state of `folder` if every file reads and fits (nothing is applied), else None."""
    try:
        loaded = checkpoint.read_state(folder)
        _check_run(folder, loaded, network, optimizer, total_steps)
        lora_path = folder / "lora.safetensors"
        got = fit(loaded.lora, {}, str(lora_path), network_target(network, "the network being trained"))
        if not got.complete:
            return None
        _check_optimizer(folder / "optimizer.pt", loaded.optimizer, optimizer)
    except UserError:
        return None
    return loaded


def restore(where: str, output_dir: Path, output_name: str, network, optimizer, scheduler,
            total_steps: int) -> tuple[Path, TrainState]:
    """Load the state chosen by `where` ("latest", "latest_intact" or a folder); returns the folder
    and its TrainState."""
    latest = where in (LATEST, LATEST_INTACT)
    candidates = checkpoint.state_folders(output_dir, output_name) if latest else [Path(where)]
    if not candidates:
        raise UserError(f'resume = "{where}": no state folder of {output_name} in {output_dir} '
                        "(states are written when save_state = true)")
    skipped: list[DamagedState] = []
    for n, folder in enumerate(candidates):
        try:
            loaded = checkpoint.read_state(folder)
            _check_run(folder, loaded, network, optimizer, total_steps)
            _apply(folder, loaded, network, optimizer, scheduler)
        except DamagedState as exc:
            if not latest:
                raise UserError(f"{exc}; this state cannot be resumed from (resume = \"{LATEST_INTACT}\" uses the "
                                "newest state that is intact)") from None
            if where == LATEST:
                _stop_at_damaged_newest(exc, folder, candidates[n + 1:], network, optimizer, total_steps)
            skipped.append(exc)
            continue
        for exc in skipped:
            log.warning("%s: %s; skipped that state, resuming from %s at step %d", exc.file, exc.reason, folder,
                        loaded.state.step)
        return folder, loaded.state
    raise UserError(f"no intact training state of {output_name} in {output_dir}: "
                    + "; ".join(str(exc) for exc in skipped))


def _stop_at_damaged_newest(exc: DamagedState, newest: Path, older: list[Path], network, optimizer,
                            total_steps: int) -> None:
    """resume = "latest" and the newest state is damaged: stop, naming the newest older state that is
    intact (if there is none, restore's own error lists every damaged file)."""
    for folder in older:
        loaded = _intact(folder, network, optimizer, total_steps)
        if loaded is not None:
            raise UserError(
                f"{exc}; the newest state {newest.name} cannot be resumed from. The older state {folder} (step "
                f"{loaded.state.step}) is intact: set resume = \"{folder}\" to continue from it, or resume = "
                f"\"{LATEST_INTACT}\" to take the newest intact state")
