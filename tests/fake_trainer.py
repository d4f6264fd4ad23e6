"""A stand-in trainer for the UI tests of the run workspace: reads the same config and command line,
takes the same output-folder lock, writes events.jsonl in the trainer's schema (docs/training.md, "Events and commands")
and obeys commands.jsonl, in a fraction of a second per run and without torch."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from library.config.cli import parse_argv  # noqa: E402
from library.config.loader import build_config  # noqa: E402
from library.utils.runlock import RunLock  # noqa: E402


def main() -> int:
    cmd = parse_argv(sys.argv[1:])
    try:
        cfg = build_config(cmd.config_file, cmd.overrides)
    except Exception as exc:  # the trainer's one-line error
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = Path(cfg.saving.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    try:
        lock = RunLock(out)
        lock.acquire()
    except Exception as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    events = open(out / "events.jsonl", "a", encoding="utf-8")
    commands = out / "commands.jsonl"
    seen = commands.stat().st_size if commands.exists() else 0
    step = 0
    if cfg.saving.resume:
        states = sorted(out.glob("*-state"))
        step = int(states[-1].name.split("-")[-2]) if states else 0

    def emit(kind, **fields):
        events.write(json.dumps({"v": 1, "type": kind, "time": time.time(), "run": out.name, **fields}) + "\n")
        events.flush()

    def save(state):
        path = out / f"{cfg.saving.output_name}-{step:06d}.safetensors"
        path.write_bytes(b"")
        state_dir = out / f"{cfg.saving.output_name}-{step:06d}-state" if state else None
        if state_dir:
            state_dir.mkdir(exist_ok=True)
        emit("save", step=step, path=str(path), state=str(state_dir) if state_dir else None)

    def sample():
        from PIL import Image

        (out / "sample").mkdir(exist_ok=True)
        path = out / "sample" / f"s{step:06d}.png"
        Image.new("RGB", (16, 16), (step * 20 % 255, 80, 160)).save(path)
        emit("sample", step=step, images=[{"path": str(path), "prompt": "a shape", "seed": 1}])

    emit("start", config={}, dataset={"images": 4, "subsets": [], "buckets": [[64, 64, 4]]},
         max_steps=cfg.training.max_train_steps, output_dir=str(out), pid=0,
         resumed_from=cfg.saving.resume, method="apt" if cfg.training.apt else "lora")
    status = "finished"
    while step < cfg.training.max_train_steps:
        step += 1
        time.sleep(0.1)
        emit("step", step=step, loss=1.0 / step, loss_avg=1.0 / step, lr={"unet": cfg.optimizer.learning_rate},
             epoch=1, s_per_step=0.1, eta_s=0.1 * (cfg.training.max_train_steps - step), peak_memory_bytes=1 << 20,
             **({"apt": {"gamma": [0.1] * cfg.apt.bins, "loss_weight": 0.9}} if cfg.training.apt else {}))
        if cfg.sampling.sample_every_n_steps and step % cfg.sampling.sample_every_n_steps == 0:
            sample()
        if commands.exists() and commands.stat().st_size > seen:
            with open(commands, "rb") as fh:
                fh.seek(seen)
                data = fh.read()
            seen += data.rfind(b"\n") + 1
            for line in data[:data.rfind(b"\n")].splitlines():
                c = json.loads(line)
                emit("command", command=c["command"], id=c["id"], step=step)
                if c["command"] == "save":
                    save(True)
                elif c["command"] == "sample":
                    sample()
                elif c["command"] == "stop":
                    status = "stopped"
        if status == "stopped":
            save(True)
            break
    if status == "finished":
        save(False)
    emit("end", status=status, step=step, outputs=[str(p) for p in out.glob("*.safetensors")])
    lock.release()
    return 0


if __name__ == "__main__":
    sys.exit(main())
