"""Run by tests/test_ddp.py under `accelerate launch`: trains, then every rank writes its own LoRA
weights, world size and the batches it trained, so the test can compare the ranks."""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    from library.utils.runtime import offline_and_quiet, setup_logging

    offline_and_quiet()
    setup_logging()
    from safetensors.torch import save_file

    from library.config import build_config
    from library.train.loop import Trainer

    config, out = sys.argv[1], Path(sys.argv[2])
    trainer = Trainer(build_config(config, []))
    seen = []
    plan = trainer.parts.plan.step_batches

    def spy(step):
        epoch, micro = plan(step)
        seen.extend([epoch, position, list(ref.items)] for position, ref in micro)
        return epoch, micro

    trainer.parts.plan.step_batches = spy
    if len(sys.argv) > 3 and sys.argv[3] == "commands":
        trainer.listeners.append(commands(trainer))
    trainer.run()
    rank = trainer.parts.accelerator.process_index
    out.mkdir(parents=True, exist_ok=True)
    save_file(trainer.parts.network.kohya_state_dict(), str(out / f"rank{rank}.safetensors"))
    (out / f"rank{rank}.json").write_text(json.dumps({"world": trainer.parts.accelerator.num_processes, "seen": seen,
                                                      "steps": trainer.step}))


def commands(trainer):
    """The main process's UI asks for a save after step 1; the second process alone gets SIGTERM
    during step 2 (as when a scheduler signals one of them): every process must act alike."""
    import os
    import signal

    rank = trainer.parts.accelerator.process_index
    path = Path(trainer.cfg.saving.output_dir) / "commands.jsonl"

    def listener(report, values):
        if report.step == 1 and rank == 0:
            with open(path, "a") as fh:
                fh.write(json.dumps({"command": "save", "id": "ui-save"}) + "\n")
        if report.step == 2 and rank == 1:
            os.kill(os.getpid(), signal.SIGTERM)

    return listener


if __name__ == "__main__":
    main()
