#!/usr/bin/env python
"""Train a Stable Diffusion (SD1.x, SD2.x, SDXL) LoRA, optionally with APT, from one TOML config.

    accelerate launch train_apt_lora.py --config presets/sdxl.toml [--option value ...]
    python train_apt_lora.py --config presets/sd15.toml --print_config
    python train_apt_lora.py --help
"""
from __future__ import annotations

import sys


def train_main(argv: list[str] | None) -> int:
    from library.config.cli import load_from_argv

    cfg = load_from_argv(sys.argv[1:] if argv is None else argv)
    if cfg is None:
        return 0
    from library.train.loop import train  # torch and diffusers load only once the config is valid
    from library.utils.runtime import setup_logging

    setup_logging()
    train(cfg)
    return 0


def main(argv: list[str] | None = None) -> int:
    # Every error a user can fix is one line and exit status 2, before any model loads.
    from library.utils.toolmain import run_tool

    return run_tool(train_main, argv)


if __name__ == "__main__":
    sys.exit(main())
