"""The New-run form: the typed options as a form description, presets, TOML out, validation.

The form is generated from library/config/options.py (every table, default, help text, range and
choice), so an option added there appears in the UI without touching it. Validation writes the
TOML a run would get and builds it with the CLI's own `build_config`; its one-line message is
placed beside the field it names, and further mistakes are found by leaving the named field out
and building again.
"""
from __future__ import annotations

import math
import re
import shutil
import threading
import tomllib
import types
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

from library.config.loader import INPUT_PATHS, all_options, build_config
from library.config.options import FLAT_TABLES, NAMED_TABLES
from library.config.schema import OptionInfo
from library.errors import UserError

ROOT = Path(__file__).resolve().parents[2]
PRESETS = ROOT / "presets"
CONFIG_NAME = "config.toml"
DATASET_NAME = "dataset.toml"
DATASET_FIELD = "__dataset__"  # the dataset TOML editor, as a field name for messages
MAX_ERRORS = 25
_CWD_LOCK = threading.Lock()


def _kind(info: OptionInfo) -> tuple[str, bool]:
    """(widget kind, optional): bool, choice, int, float, number, str, or toml for lists and tables."""
    tp = info.type
    optional = False
    if get_origin(tp) in (Union, types.UnionType) and type(None) in get_args(tp):
        optional = True
        args = [a for a in get_args(tp) if a is not type(None)]
        tp = args[0] if len(args) == 1 else Union[tuple(args)]
    if info.choices or get_origin(tp) is Literal:
        return "choice", optional
    if tp is bool:
        return "bool", optional
    if tp is int:
        return "int", optional
    if tp is float:
        return "float", optional
    if tp is str:
        return "str", optional
    if get_origin(tp) in (Union, types.UnionType) and set(get_args(tp)) <= {int, float}:
        return "number", optional
    return "toml", optional


def _json_value(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_json_value(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def form_schema() -> list[dict]:
    """The tables of the form, in the config's order, each with its options."""
    tables: dict[str, dict] = {}
    docs = {**FLAT_TABLES, **NAMED_TABLES}
    for key, info in all_options().items():
        table = tables.setdefault(info.table, {
            "table": info.table, "named": info.table in NAMED_TABLES,
            "doc": _table_doc(docs[info.table]),
            "options": []})
        kind, optional = _kind(info)
        choices = list(info.choices) if info.choices else (
            list(get_args(_strip_optional(info.type))) if kind == "choice" else None)
        table["options"].append({
            "name": info.name, "key": key, "kind": kind, "optional": optional, "required": info.required,
            "default": _json_value(info.default), "help": info.help, "choices": choices,
            "allowed": info.describe_allowed(), "ge": info.ge, "gt": info.gt, "le": info.le, "lt": info.lt,
        })
    return list(tables.values())


def _table_doc(cls: type) -> str:
    """The first line of a table's docstring; dataclasses without one get a generated signature, not shown."""
    doc = (cls.__doc__ or "").strip()
    return "" if not doc or doc.startswith(f"{cls.__name__}(") else doc.splitlines()[0]


def _strip_optional(tp: Any) -> Any:
    if get_origin(tp) in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


# --- TOML out -------------------------------------------------------------------------------------

def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else ("nan" if value != value else ("inf" if value > 0 else "-inf"))
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{_key(k)} = {toml_value(v)}" for k, v in value.items()) + " }"
    text = str(value)
    out = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")
    return '"' + "".join(c if ord(c) >= 32 or c in "\\" else f"\\u{ord(c):04x}" for c in out) + '"'


def _key(name: str) -> str:
    return name if re.fullmatch(r"[A-Za-z0-9_-]+", name) else toml_value(name)


def dump_toml(doc: dict) -> str:
    """A TOML document of scalars, tables and arrays of tables (nested once, as kohya datasets are)."""
    lines: list[str] = []
    scalars = {k: v for k, v in doc.items() if not isinstance(v, dict) and not _is_table_array(v)}
    lines += [f"{_key(k)} = {toml_value(v)}" for k, v in scalars.items()]

    def emit(prefix: str, table: dict, header: str) -> None:
        if lines:
            lines.append("")
        lines.append(header)
        for k, v in table.items():
            if not isinstance(v, dict) and not _is_table_array(v):
                lines.append(f"{_key(k)} = {toml_value(v)}")
        for k, v in table.items():
            if isinstance(v, dict):
                emit(f"{prefix}.{_key(k)}", v, f"[{prefix}.{_key(k)}]")
            elif _is_table_array(v):
                for item in v:
                    emit(f"{prefix}.{_key(k)}", item, f"[[{prefix}.{_key(k)}]]")

    for k, v in doc.items():
        if isinstance(v, dict):
            emit(_key(k), v, f"[{_key(k)}]")
        elif _is_table_array(v):
            for item in v:
                emit(_key(k), item, f"[[{_key(k)}]]")
    return "\n".join(lines) + "\n"


def _is_table_array(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


# --- form values <-> TOML ---------------------------------------------------------------------------

def parse_field(key: str, raw: Any, info: OptionInfo) -> tuple[Any, str | None]:
    """A form value as the TOML value it stands for; (None, message) when a list/table field is not TOML.

    Text that reads as a number goes in as a number and anything else as a string, so a wrong type
    reaches the config builder and gets its message."""
    kind, _ = _kind(info)
    if isinstance(raw, str) and kind == "toml":
        try:
            return tomllib.loads(f"v = {raw}")["v"], None
        except tomllib.TOMLDecodeError as exc:
            return None, f"[{info.table}] {info.name}: not a TOML value ({exc}); write e.g. [\"a\", \"b\"] or [1, 2]"
    if isinstance(raw, str) and kind in ("int", "float", "number"):
        text = raw.strip().replace("_", "")
        try:
            return int(text), None
        except ValueError:
            try:
                return float(text), None
            except ValueError:
                return raw, None
    return raw, None


def config_doc(values: dict[str, Any], dataset_toml: str | None) -> tuple[dict, dict[str, str]]:
    """The config TOML document of the form's `values` (option key -> value), and field messages for
    values that could not be read at all."""
    options = all_options()
    doc: dict[str, dict] = {}
    problems: dict[str, str] = {}
    for key, raw in values.items():
        info = options.get(key)
        if info is None:
            problems[key] = f"{key}: unknown option"
            continue
        if raw is None or raw == "":
            continue
        value, problem = parse_field(key, raw, info)
        if problem:
            problems[key] = problem
            continue
        doc.setdefault(info.table, {})[info.name] = value
    if dataset_toml and dataset_toml.strip():
        doc.setdefault("data", {})["dataset_config"] = DATASET_NAME
    return {t: doc[t] for t in [*FLAT_TABLES, *NAMED_TABLES] if t in doc}, problems


def write_run_files(folder: Path, values: dict[str, Any], dataset_toml: str | None) -> tuple[Path, dict[str, str]]:
    folder.mkdir(parents=True, exist_ok=True)
    doc, problems = config_doc(values, dataset_toml)
    (folder / CONFIG_NAME).write_text(dump_toml(doc), encoding="utf-8")
    dataset = folder / DATASET_NAME
    if dataset_toml and dataset_toml.strip():
        dataset.write_text(dataset_toml if dataset_toml.endswith("\n") else dataset_toml + "\n", encoding="utf-8")
    elif dataset.exists():
        dataset.unlink()
    return folder / CONFIG_NAME, problems


_WHERE = re.compile(r"\[(\w+)\] (\w+)")


def field_of(message: str, config_path: Path, options: dict[str, OptionInfo]) -> str | None:
    """The form field a config-builder message names: `[table] name`, or the dataset file."""
    head = message.split(": ", 1)[0]
    if head.endswith(DATASET_NAME) or f"{DATASET_NAME}:" in message.split(" ", 1)[0]:
        return DATASET_FIELD
    match = _WHERE.search(message)
    if match:
        table, name = match.groups()
        key = f"{table}.{name}" if table in NAMED_TABLES else name
        if key in options:
            return key
    for key in options:  # "output_dir /x: ..." style messages name the option first
        if message.startswith(f"{key} ") or message.startswith(f"{key}:"):
            return key
    if "[[datasets" in message or "no dataset" in message:
        return DATASET_FIELD
    return None


def validate(folder: Path, values: dict[str, Any], dataset_toml: str | None, *, cwd: Path | None = None,
             fresh: bool = False) -> dict:
    """Every mistake the config builder finds, each as {field, message}; `toml` is what would run.

    The files are written to `folder` (a run's own folder, or a scratch one), because the builder
    reads files and resolves paths next to them as it does for the CLI."""
    with _CWD_LOCK:  # one validation at a time: it changes the process's current folder
        if fresh and folder.exists():
            shutil.rmtree(folder)  # a scratch folder: no file of an earlier form is left to be found
        return _validate(folder, values, dataset_toml, cwd)


def _validate(folder: Path, values: dict[str, Any], dataset_toml: str | None, cwd: Path | None) -> dict:
    import os

    options = all_options()
    original = dict(values)
    values = dict(values)
    errors: list[dict] = []
    config_path, problems = write_run_files(folder, values, dataset_toml)
    for key, message in problems.items():
        errors.append({"field": key, "message": message})
        values.pop(key, None)
    old_cwd = Path.cwd()
    if cwd is not None:
        os.chdir(cwd)  # relative paths resolve against the folder the trainer will run in
    try:
        resolved = _build_all(folder, values, dataset_toml, options, errors)
    finally:
        os.chdir(old_cwd)
        write_run_files(folder, original, dataset_toml)
    dataset_text = (folder / DATASET_NAME).read_text() if (folder / DATASET_NAME).exists() else ""
    return {"ok": not errors, "errors": errors, "toml": (folder / CONFIG_NAME).read_text(),
            "dataset_toml": dataset_text,
            "resolved": resolved}


def _build_all(folder: Path, values: dict, dataset_toml: str | None, options: dict, errors: list[dict]) -> str | None:
    for _ in range(MAX_ERRORS):
        config_path, _ = write_run_files(folder, values, dataset_toml)
        try:
            cfg = build_config(str(config_path), [])
        except UserError as exc:
            message = str(exc)
            field = field_of(message, config_path, options)
            errors.append({"field": field, "message": message})
            if field is None or field == DATASET_FIELD or field not in values or options[field].required:
                return None
            values.pop(field)  # look for the next mistake without this one
            continue
        from library.config.cli import render_config

        return render_config(cfg) if not errors else None
    return None


# --- presets ----------------------------------------------------------------------------------------

def list_presets() -> list[dict]:
    out = []
    for path in sorted(PRESETS.glob("*.toml")):
        text = path.read_text(encoding="utf-8")
        first = next((line.lstrip("# ").strip() for line in text.splitlines() if line.startswith("#")), "")
        out.append({"name": path.stem, "description": first})
    return out


def _absolute(value: str, base: Path) -> str:
    path = Path(value).expanduser()
    if path.is_absolute():
        return value
    beside = (base / path).resolve()
    return str(beside) if beside.exists() else value


def load_preset(name: str) -> dict:
    """A preset as form values and dataset TOML; input paths made absolute (the run's config lives
    elsewhere), output paths left as written (they land in the workspace)."""
    path = PRESETS / f"{name}.toml"
    if not re.fullmatch(r"[\w.-]+", name) or not path.is_file():
        raise UserError(f"preset {name!r}: no such preset in {PRESETS}")
    doc = tomllib.loads(path.read_text(encoding="utf-8"))
    options = all_options()
    inputs = {opt for _, opt, _ in INPUT_PATHS}
    values: dict[str, Any] = {}
    for key, value in doc.items():
        if key in FLAT_TABLES and isinstance(value, dict):
            values.update(value)
        elif key in NAMED_TABLES and isinstance(value, dict):
            values.update({f"{key}.{k}": v for k, v in value.items()})
        elif key in options and not isinstance(value, dict):
            values[key] = value
    for key in list(values):
        if key in inputs and isinstance(values[key], str):
            values[key] = _absolute(values[key], PRESETS)
    dataset = {k: doc[k] for k in ("general", "datasets") if k in doc}
    if "dataset_config" in values:
        ds_path = Path(values.pop("dataset_config"))
        if ds_path.is_file():
            dataset = tomllib.loads(ds_path.read_text(encoding="utf-8"))
            _absolute_subsets(dataset, ds_path.parent)
    else:
        _absolute_subsets(dataset, PRESETS)
    return {"values": {k: _json_value(v) for k, v in values.items()},
            "dataset_toml": dump_toml(dataset) if dataset else ""}


def _absolute_subsets(dataset: dict, base: Path) -> None:
    for ds in dataset.get("datasets", []):
        for sub in ds.get("subsets", []):
            for key in ("image_dir", "metadata_file"):
                if isinstance(sub.get(key), str):
                    sub[key] = _absolute(sub[key], base)
