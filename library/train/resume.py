"""Resume: choose a training state, check all of it, and load it into the network, optimizer,
scheduler and random generators, or stop with a one-line error before any step is trained.

With resume = "latest" the state folders are tried newest first; a damaged one (any file
unreadable, or not fitting the network and optimizer being trained) is skipped with a WARNING that
names the file and the step resumed from. A state folder named explicitly is never replaced by
another one. A state saved for another network, or already at the configured step count, is an
error, not a reason to fall back: an older state of the same run would not fix it.
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


def _check_run(folder: Path, loaded: LoadedState, network, optimizer, total_steps: int) -> None:
    mine = checkpoint.describe_network(network)
    if loaded.state.network != mine:
        raise UserError(f"{folder}: the state was saved for another network ({loaded.state.network}); "
                        f"this config trains {mine}")
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


def restore(where: str, output_dir: Path, output_name: str, network, optimizer, scheduler,
            total_steps: int) -> tuple[Path, TrainState]:
    """Load the state chosen by `where` ("latest" or a folder); returns the folder and its TrainState."""
    latest = where == "latest"
    candidates = checkpoint.state_folders(output_dir, output_name) if latest else [Path(where)]
    if not candidates:
        raise UserError(f'resume = "latest": no state folder of {output_name} in {output_dir} '
                        "(states are written when save_state = true)")
    skipped: list[DamagedState] = []
    for folder in candidates:
        try:
            loaded = checkpoint.read_state(folder)
            _check_run(folder, loaded, network, optimizer, total_steps)
            _apply(folder, loaded, network, optimizer, scheduler)
        except DamagedState as exc:
            if not latest:
                raise UserError(f"{exc}; this state cannot be resumed from (resume = \"latest\" uses the newest "
                                "state that is intact)") from None
            skipped.append(exc)
            continue
        for exc in skipped:
            log.warning("%s: %s; skipped that state, resuming from %s at step %d", exc.file, exc.reason, folder,
                        loaded.state.step)
        return folder, loaded.state
    raise UserError(f"no intact training state of {output_name} in {output_dir}: "
                    + "; ".join(str(exc) for exc in skipped))
