#!/usr/bin/env python
"""Train a Stable Diffusion (SD1.x, SD2.x, SDXL) LoRA, optionally with APT, from one TOML config.

    accelerate launch train_apt_lora.py --config presets/sdxl.toml [--option value ...]
    python train_apt_lora.py --config presets/sd15.toml --print_config
    python train_apt_lora.py --help
"""
from __future__ import annotations

import os
import sys
from contextlib import nullcontext
from pathlib import Path


def train_main(argv: list[str] | None) -> int:
    from library.config.cli import load_from_argv
    from library.utils.runlock import RunLock

    cfg = load_from_argv(sys.argv[1:] if argv is None else argv)
    if cfg is None:
        return 0
    from library.config.paths import check_output_locations
    from library.utils.runtime import setup_logging

    setup_logging()
    if cfg.kohya_no_effect and os.environ.get("RANK", "0") == "0":
        import logging

        logging.getLogger("train_apt_lora").info("kohya options with no effect here: %s", "; ".join(cfg.kohya_no_effect))
    check_output_locations(cfg)  # a folder that cannot be written is found before any model loads
    # One process per run takes the output folder (accelerate/torchrun give every process a RANK).
    main_process = os.environ.get("RANK", "0") == "0"
    with RunLock(cfg.saving.output_dir) if main_process else nullcontext():
        from library.train import checkpoint
        from library.train.loop import train  # torch and diffusers load only once the config is valid

        if main_process:
            checkpoint.recover_interrupted_saves(Path(cfg.saving.output_dir))
        train(cfg)
    return 0


def main(argv: list[str] | None = None) -> int:
    # Every error a user can fix is one line and exit status 2, before any model loads.
    from library.utils.toolmain import run_tool

    return run_tool(train_main, argv)


if __name__ == "__main__":
    sys.exit(main())
