#!/usr/bin/env python
"""Regenerate the option tables of docs/configuration.md from the config schema.

The tables sit between `<!-- generated:options -->` / `<!-- generated:datasets -->` /
`<!-- generated:kohya -->` markers and
their `<!-- end -->`; the prose around them is written by hand. tests/test_presets_docs.py fails
when the tables are out of date, so run this after adding or changing an option:

    python tools/update_config_docs.py
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "configuration.md"


def _row(name: str, info, required_text: str = "required") -> str:
    from library.config.schema import describe_type, format_value

    default = required_text if info.required else format_value(info.default)
    cells = [f"`{name}`", describe_type(info.type, info), default, info.help]
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


def option_tables() -> str:
    from library.config.options import FLAT_TABLES, NAMED_TABLES
    from library.config.schema import options_of

    out = []
    for table, cls in list(FLAT_TABLES.items()) + list(NAMED_TABLES.items()):
        prefix = f"{table}." if table in NAMED_TABLES else ""
        out += ["", f"### [{table}]", "", "| option | type | default | what it does |", "|---|---|---|---|"]
        out += [_row(prefix + name, info) for name, info in options_of(cls, table).items()]
    return "\n".join(out) + "\n"


def dataset_tables() -> str:
    from library.config.dataset import COMMON, DATASET_LEVEL, SUBSET_ONLY

    out = []
    for title, keys in (("Any level: [general], [[datasets]], [[datasets.subsets]]", COMMON),
                        ("[general] and [[datasets]] only", DATASET_LEVEL),
                        ("[[datasets.subsets]] only", SUBSET_ONLY)):
        out += ["", f"### {title}", "", "| key | type | default | what it does |", "|---|---|---|---|"]
        out += [_row(name, info) for name, info in keys.items()]
    return "\n".join(out) + "\n"


def kohya_table() -> str:
    """Every sd-scripts LoRA-training option with its answer here (library.config.kohya_options)."""
    from library.config.dataset import COMMON, DATASET_LEVEL
    from library.config.kohya_options import KEYS, describe, sd_scripts_options
    from library.config.loader import all_options

    options, dataset_keys = set(all_options()), set(COMMON) | set(DATASET_LEVEL)
    out = ["", "| kohya option | answer | what happens here |", "|---|---|---|"]
    for name in sd_scripts_options():
        found = describe(name, options, dataset_keys)
        answer, note = found if found else ("(none)", "not answered: tests/test_kohya_compat.py fails")
        out.append(f"| `{name}` | {answer} | {note.replace('|', chr(92) + '|')} |")
    out += ["", "Keys the kohya_ss GUI writes that sd-scripts itself does not read:", "",
            "| GUI key | answer | what happens here |", "|---|---|---|"]
    out += [f"| `{k.name}` | {k.answer} | {k.note} |" for k in KEYS if k.gui]
    return "\n".join(out) + "\n"


def render(text: str) -> str:
    for marker, body in (("options", option_tables()), ("datasets", dataset_tables()), ("kohya", kohya_table())):
        pattern = re.compile(rf"(<!-- generated:{marker} -->\n).*?(<!-- end -->)", re.S)
        if not pattern.search(text):
            raise SystemExit(f"error: {DOC}: marker <!-- generated:{marker} --> ... <!-- end --> not found")
        text = pattern.sub(lambda m: m.group(1) + body + m.group(2), text)
    return text


def main() -> int:
    text = DOC.read_text(encoding="utf-8")
    new = render(text)
    if new != text:
        DOC.write_text(new, encoding="utf-8")
        print(f"updated {DOC}")
    else:
        print(f"{DOC} is up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
