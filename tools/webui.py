#!/usr/bin/env python
"""The local web UI: set up, check the dataset, launch, watch, steer and compare training runs.

    pip install -r requirements-ui.txt        # or: pip install -e ".[ui]"
    python tools/webui.py                     # http://127.0.0.1:7870
    python tools/webui.py --listen --token "$(openssl rand -hex 16)"   # reachable from other machines

It listens on 127.0.0.1 unless --listen is given, and --listen needs an access token. Runs are
started detached, so they go on when the UI stops; started again on the same --workspace, the UI
finds them where they are (docs/ui.md).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from library.errors import UserError
from library.utils.toolmain import command

DEFAULT_PORT = 7870


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workspace", type=Path, default=Path("webui_workspace"),
                    help="folder of the UI's runs and scratch files (default ./webui_workspace)")
    ap.add_argument("--port", type=int, default=DEFAULT_PORT)
    ap.add_argument("--host", default=None, help="address to listen on with --listen (default 0.0.0.0)")
    ap.add_argument("--listen", action="store_true", help="accept connections from other machines (needs --token)")
    ap.add_argument("--token", default=os.environ.get("APT_WEBUI_TOKEN"),
                    help="access token every request must carry (or set APT_WEBUI_TOKEN)")
    ap.add_argument("--launcher", choices=["accelerate", "python"], default="accelerate",
                    help="start runs with `accelerate launch` (default) or this Python directly")
    args = ap.parse_args(argv)
    if args.listen and not args.token:
        raise UserError("--listen: an access token is required (--token or APT_WEBUI_TOKEN), since anyone who can "
                        "reach the port could start processes on this machine")
    if args.host and not args.listen:
        raise UserError("--host: only with --listen (without it the UI listens on 127.0.0.1)")
    try:
        import uvicorn

        from tools.ui.app import create_app
    except ImportError as exc:
        raise UserError(f"the web UI needs its extra packages ({exc.name} is missing): "
                        "pip install -r requirements-ui.txt") from None
    host = (args.host or "0.0.0.0") if args.listen else "127.0.0.1"
    app = create_app(args.workspace, token=args.token, launcher=args.launcher,
                     allowed_hosts=["*"] if args.listen else None)
    shown = "127.0.0.1" if host in ("127.0.0.1", "0.0.0.0") else host
    address = f"http://{shown}:{args.port}/" + (f"?token={args.token}" if args.token else "")
    print(f"web UI on {address} (workspace {args.workspace.resolve()}); Ctrl+C stops the UI, not the runs",
          flush=True)
    uvicorn.run(app, host=host, port=args.port, log_level="warning")
    return 0


cli = command(main)  # the console command (pyproject.toml)

if __name__ == "__main__":
    sys.exit(cli())
