"""Process-wide settings every entry point applies first: offline mode and quiet libraries."""
from __future__ import annotations

import logging
import os
import sys


def offline_and_quiet() -> None:
    """No code path may reach a model hub; third-party chatter stays out of the user's console."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ["DIFFUSERS_OFFLINE"] = "1"
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # bitsandbytes (imported by peft) logs a warning about optional CPU kernels on import.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time (tests and tools redirect it)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


class MainProcessOnly(logging.Filter):
    """Under `accelerate launch` with N processes, every process runs the same code: each info and
    warning line would appear N times. Only the main process (global rank 0) prints them; errors
    are printed by every process, since they may differ. accelerate's own `get_logger` does this
    too, but refuses to log before an accelerate state exists, and the library's modules also serve
    the tools, which have none; the launcher's RANK variable is what accelerate itself reads."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or os.environ.get("RANK", "0") == "0"


def setup_logging(main_process: bool = True) -> None:
    root = logging.getLogger()
    if not any(isinstance(h, _StderrHandler) for h in root.handlers):
        handler = _StderrHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
        handler.addFilter(MainProcessOnly())
        root.addHandler(handler)
    logging.getLogger("library").setLevel(logging.INFO if main_process else logging.WARNING)
    for name in ("diffusers", "transformers", "accelerate", "peft", "bitsandbytes", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.ERROR)
    # Only libraries already imported are touched: importing diffusers costs seconds, and the
    # fast paths (--help, config errors) must not pay for it. Callers run this again later.
    if "diffusers" in sys.modules:
        from diffusers.utils import logging as dlog

        dlog.disable_progress_bar()
        dlog.set_verbosity_error()
    if "transformers" in sys.modules:
        from transformers.utils import logging as tlog

        tlog.disable_progress_bar()
        tlog.set_verbosity_error()
