"""The common frame of the command-line tools: offline, quiet, one-line errors with exit code 2."""
from __future__ import annotations

import sys
from functools import partial
from typing import Callable


def run_tool(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    from library.utils.runtime import offline_and_quiet, setup_logging

    offline_and_quiet()
    setup_logging()
    from library.errors import UserError

    try:
        return main(argv)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def command(main: Callable[[list[str] | None], int]) -> Callable[[], int]:
    """A tool's console command (pyproject.toml's [project.scripts]) and `__main__`: `main` run by run_tool."""
    return partial(run_tool, main)
