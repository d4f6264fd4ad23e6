"""Command line: `--config FILE`, `--print_config`, `--help` and `--option value` overrides.

argparse is not used because the option set is the config schema itself (flat names and
`table.name` for named tables) and values must stay raw strings until the schema coerces them
with the same rules and messages as TOML values.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Iterable

from library.config.dataset import COMMON, DATASET_LEVEL, SUBSET_ONLY
from library.config.loader import Config, all_options, build_config, is_kohya_key, table_fields
from library.config.options import FLAT_TABLES, NAMED_TABLES
from library.config.schema import OptionInfo, describe_type, format_value
from library.errors import UserError


@dataclass
class CommandLine:
    config_file: str | None = None
    print_config: bool = False
    help: bool = False
    overrides: list[tuple[str, str]] = field(default_factory=list)


def _is_bool(info: OptionInfo) -> bool:
    return info.type is bool


def parse_argv(argv: Iterable[str]) -> CommandLine:
    args = list(argv)
    options = all_options()
    out = CommandLine()
    i = 0
    while i < len(args):
        token = args[i]
        i += 1
        if token in ("-h", "--help"):
            out.help = True
            continue
        if not token.startswith("--") or token == "--":
            raise UserError(f"command line: unexpected argument {token!r}; options look like --name value")
        name, eq, value = token[2:].partition("=")
        if name == "print_config":
            out.print_config = True
            continue
        if not eq:
            info = options.get(name) or options.get(name.split(".", 1)[-1])
            flag = (info is not None and _is_bool(info)) or (info is None and is_kohya_key(name))
            if flag and (i >= len(args) or args[i].startswith("--")):
                value = "true"  # a bare boolean flag, kohya style
            elif i < len(args):
                value = args[i]
                i += 1
            else:
                raise UserError(f"command line: --{name}: missing value")
        if name in ("config", "config_file"):  # config_file: kohya's name
            out.config_file = value
        else:
            out.overrides.append((name, value))
    return out


def help_text() -> str:
    lines = [
        "usage: accelerate launch train_apt_lora.py --config FILE.toml [--option value ...]",
        "       python train_apt_lora.py --config FILE.toml [--print_config] [--help]",
        "",
        "Every option can be set in its [table] of the TOML file (or at its top level) and overridden",
        "here as --name value; booleans take true/false. Options of named tables are --table.name.",
        "",
        "  --config FILE        the TOML config",
        "  --print_config       print the resolved config and exit",
        "  --help               this list",
    ]
    tables = [(t, c, "") for t, c in FLAT_TABLES.items()] + [(t, c, t + ".") for t, c in NAMED_TABLES.items()]
    from library.config.schema import options_of

    for table, cls, prefix in tables:
        lines += ["", f"[{table}]"]
        for name, info in options_of(cls, table).items():
            default = "required" if info.required else f"default {format_value(info.default)}"
            lines.append(f"  --{prefix}{name} ({describe_type(info.type, info)}; {default})")
            lines.append(f"      {info.help}")
    lines += ["", "Dataset tables (kohya schema; in a dataset_config file or inline):"]
    for title, keys in (("[general], [[datasets]] and [[datasets.subsets]]", COMMON),
                        ("[general] and [[datasets]] only", DATASET_LEVEL),
                        ("[[datasets.subsets]] only", SUBSET_ONLY)):
        lines.append(f"  {title}:")
        for name, info in keys.items():
            lines.append(f"    {name} ({describe_type(info.type, info)}; default {format_value(info.default)})")
            lines.append(f"        {info.help}")
    return "\n".join(lines) + "\n"


def render_config(cfg: Config) -> str:
    """The resolved config as TOML; unset options are shown commented out."""
    lines = [f"# resolved from {cfg.config_file or 'the command line'}"]
    for table, values in table_fields(cfg).items():
        lines += ["", f"[{table}]"]
        for name, value in values.items():
            lines.append(f"# {name} = (unset)" if value is None else f"{name} = {format_value(value)}")
    if cfg.dataset is not None:
        lines += ["", f"# datasets from {cfg.dataset.source}, with every level's values resolved"]
        for ds in cfg.dataset.datasets:
            lines += ["", "[[datasets]]"]
            for name in DATASET_LEVEL:
                value = getattr(ds, name)
                if value is not None:
                    lines.append(f"{name} = {format_value(list(value) if isinstance(value, tuple) else value)}")
            for sub in ds.subsets:
                lines += ["", "  [[datasets.subsets]]"]
                for name in list(SUBSET_ONLY) + list(COMMON):
                    value = getattr(sub, name)
                    if value is not None:
                        lines.append(f"  {name} = {format_value(value)}")
    return "\n".join(lines) + "\n"


def load_from_argv(argv: Iterable[str]) -> Config | None:
    """Parse the command line and build the Config; handles --help and --print_config (returns None)."""
    cmd = parse_argv(argv)
    if cmd.help:
        sys.stdout.write(help_text())
        return None
    cfg = build_config(cmd.config_file, cmd.overrides, need_dataset=not cmd.print_config)
    if cmd.print_config:
        sys.stdout.write(render_config(cfg))
        return None
    return cfg
