"""Reading a run's `events.jsonl` while the trainer appends to it (the schema: docs/training.md, "Events and commands").

The trainer flushes one JSON object per line; a reader can meet the last line half written, so
only complete lines are taken and the byte offset after them is where the next read starts.
"""
from __future__ import annotations

import json
from pathlib import Path

EVENTS_NAME = "events.jsonl"
COMMANDS_NAME = "commands.jsonl"
SCHEMA_VERSION = 1


def read_events(path: Path, offset: int = 0) -> tuple[list[dict], int]:
    """The complete events after byte `offset`, and the offset after the last complete line."""
    located, end = read_located(path, offset)
    return [event for _, event in located], end


def read_located(path: Path, offset: int = 0) -> tuple[list[tuple[int, dict]], int]:
    """Like read_events, with the byte offset where each event's line starts."""
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            data = fh.read()
    except FileNotFoundError:
        return [], offset
    end = data.rfind(b"\n")
    if end < 0:
        return [], offset
    located = []
    pos = offset
    for line in data[:end].split(b"\n"):
        start, pos = pos, pos + len(line) + 1
        line = line.strip()
        if not line:
            continue
        try:
            event = json.loads(line)
        except ValueError:
            continue  # a line cut short by a killed process; the trainer ends it before appending
        if isinstance(event, dict) and "type" in event:
            located.append((start, event))
    return located, offset + end + 1


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
