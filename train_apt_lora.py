#!/usr/bin/env python
"""Train a Stable Diffusion (SD1.x, SD2.x, SDXL) LoRA, optionally with APT, from one TOML config.

    accelerate launch train_apt_lora.py --config presets/sdxl.toml [--option value ...]
    python train_apt_lora.py --config presets/sd15.toml --print_config
    python train_apt_lora.py --help
"""
from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from library.utils.runtime import offline_and_quiet

    offline_and_quiet()
    from library.config.cli import load_from_argv
    from library.errors import UserError

    try:
        cfg = load_from_argv(sys.argv[1:] if argv is None else argv)
        if cfg is None:
            return 0
        from library.utils.runtime import setup_logging

        setup_logging()
        from library.train.loop import train

        train(cfg)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
