#!/usr/bin/env python
"""Write library/config/sd_scripts_options.txt from a checkout of kohya sd-scripts.

The list is every `--option` that train_network.py's and sdxl_train_network.py's setup_parser()
add, following the `add_*_arguments(parser)` calls they make into sd-scripts' own modules. The
sources are read as syntax trees, never imported (they need sd-scripts' whole environment), so a
branch of an `add_*` function is counted whatever its flags: the list is a superset, which is what
the compatibility test wants.

    python tools/list_sd_scripts_options.py /path/to/sd-scripts [--out library/config/sd_scripts_options.txt]
"""
from __future__ import annotations

import argparse
import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ("train_network", "sdxl_train_network")


def _trees(checkout: Path) -> dict[str, ast.Module]:
    files = {name: checkout / f"{name}.py" for name in SCRIPTS}
    files.update({p.stem: p for p in (checkout / "library").glob("*.py")})
    return {name: ast.parse(path.read_text(encoding="utf-8")) for name, path in files.items() if path.is_file()}


def collect(checkout: Path) -> dict[str, set[str]]:
    """option -> the scripts that accept it."""
    trees = _trees(checkout)
    functions = {mod: {n.name: n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
                 for mod, tree in trees.items()}
    found: dict[str, set[str]] = {}

    def visit(mod: str, name: str, script: str, seen: set) -> None:
        fn = functions.get(mod, {}).get(name)
        if fn is None or (mod, name) in seen:
            return
        seen.add((mod, name))
        for node in ast.walk(fn):
            if not isinstance(node, ast.Call):
                continue
            f = node.func
            if isinstance(f, ast.Attribute) and f.attr == "add_argument":
                for arg in node.args:
                    if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and arg.value.startswith("--"):
                        found.setdefault(arg.value[2:], set()).add(script)
            elif isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and f.value.id in trees:
                if f.attr.startswith("add_") or f.attr == "setup_parser":
                    visit(f.value.id, f.attr, script, seen)
            elif isinstance(f, ast.Name) and f.id.startswith("add_"):  # imported by name
                owner = next((m for m in functions if m not in SCRIPTS and f.id in functions[m]), None)
                if owner:
                    visit(owner, f.id, script, seen)

    for script in SCRIPTS:
        visit(script, "setup_parser", script, set())
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkout", type=Path, help="a checkout of kohya-ss/sd-scripts")
    parser.add_argument("--out", type=Path, default=ROOT / "library" / "config" / "sd_scripts_options.txt")
    args = parser.parse_args(argv)
    found = collect(args.checkout)
    if not found:
        print(f"error: {args.checkout}: no train_network.py setup_parser found", file=sys.stderr)
        return 2
    try:
        commit = subprocess.run(["git", "-C", str(args.checkout), "rev-parse", "HEAD"], capture_output=True,
                                text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "(unknown: not a git checkout)"
    header = [
        "# Every --option of kohya sd-scripts' LoRA training: the argparse options that train_network.py's and",
        "# sdxl_train_network.py's setup_parser() add, following their add_*_arguments calls into sd-scripts'",
        f"# library modules; extracted by tools/list_sd_scripts_options.py at sd-scripts commit {commit}.",
        "# One name a line, then the scripts that accept it. tests/test_kohya_compat.py fails for a name",
        "# library/config/kohya_options.py does not answer.",
    ]
    lines = [f"{name} {','.join(sorted(scripts))}" for name, scripts in sorted(found.items())]
    args.out.write_text("\n".join(header + lines) + "\n", encoding="utf-8")
    print(f"wrote {len(lines)} options to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
