"""Reading a run's `events.jsonl` while the trainer appends to it (the schema: docs/training.md, "Events and commands").

Reading is library.train.events.read_events / read_located (complete lines only, the byte offset
after them is where the next read starts); this module folds events into what the pages show.
"""
from __future__ import annotations

# The trainer's own reader of the file (library.train.events); this module folds what it reads.
from library.train.events import read_events, read_located  # noqa: F401 (read_events: the UI's tests)


def summarise(events: list[dict]) -> dict:
    """What the Runs and Live pages show of a run, folded from its events in order."""
    out: dict = {"step": 0, "max_steps": None, "loss": None, "loss_avg": None, "lr": {}, "epoch": None,
                 "s_per_step": None, "eta_s": None, "peak_memory_bytes": None, "apt": None, "samples": [],
                 "saves": [], "warnings": [], "error": None, "end": None, "start": None, "validation": [],
                 "commands": [], "starts": 0}
    for ev in events:
        kind = ev.get("type")
        if kind == "start":
            out["start"] = ev
            out["starts"] += 1
            out["max_steps"] = ev.get("max_steps")
            out["end"] = None
            out["error"] = None
        elif kind == "step":
            for key in ("step", "loss", "loss_avg", "epoch", "s_per_step", "eta_s", "peak_memory_bytes"):
                if key in ev:
                    out[key] = ev[key]
            out["lr"] = ev.get("lr") or {}
            if ev.get("apt") is not None:
                out["apt"] = ev["apt"]
        elif kind == "validation":
            out["validation"].append({"step": ev.get("step"), "loss": ev.get("loss")})
        elif kind == "sample":
            out["samples"].append({"step": ev.get("step"), "images": ev.get("images") or []})
        elif kind == "save":
            out["saves"].append({"step": ev.get("step"), "path": ev.get("path"), "state": ev.get("state")})
        elif kind == "warning":
            out["warnings"].append(ev.get("message"))
        elif kind == "command":
            out["commands"].append({"command": ev.get("command"), "id": ev.get("id"), "step": ev.get("step")})
        elif kind == "error":
            out["error"] = ev.get("message")
        elif kind == "end":
            out["end"] = {"status": ev.get("status"), "step": ev.get("step"), "outputs": ev.get("outputs") or []}
            if ev.get("step") is not None:
                out["step"] = ev["step"]
    return out
