"""Option declarations and value coercion for the config (no torch imports: errors come fast).

Each config table is a frozen dataclass whose fields are declared with `option(...)`: the default,
a one-line help text and the constraints. From these declarations come the TOML validation, the
command-line overrides, `--help` and the docs check, so an option exists in exactly one place.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import MISSING, dataclass
from typing import Any, Callable, Literal, Union, get_args, get_origin

def option(default: Any = None, help: str = "", *, choices: tuple | Callable[[], tuple] | None = None,
           ge: float | None = None, gt: float | None = None, le: float | None = None, lt: float | None = None,
           required: bool = False, kohya: bool = True, positive_list: bool = False) -> Any:
    """Declare a config option. `kohya=False` marks names kohya sd-scripts does not have. `choices`
    may be a function, asked each time the options are read, for values that come from a table
    others can add to (network kinds)."""
    meta = {"help": help, "choices": choices, "ge": ge, "gt": gt, "le": le, "lt": lt, "required": required,
            "kohya": kohya}
    if isinstance(default, (list, dict)):
        raise TypeError("use tuples for sequence defaults: the config is read-only")
    return dataclasses.field(default=default, metadata=meta)


@dataclass(frozen=True)
class OptionInfo:
    name: str
    table: str
    type: Any
    default: Any
    help: str
    choices: tuple | None
    ge: float | None
    gt: float | None
    le: float | None
    lt: float | None
    required: bool

    def describe_allowed(self) -> str:
        return describe_type(self.type, self)


def options_of(cls: type, table: str) -> dict[str, OptionInfo]:
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        if not f.metadata or "help" not in f.metadata:
            continue
        m = f.metadata
        choices = m["choices"]() if callable(m["choices"]) else m["choices"]
        out[f.name] = OptionInfo(
            name=f.name, table=table, type=hints[f.name],
            default=None if f.default is MISSING else f.default, help=m["help"], choices=choices,
            ge=m["ge"], gt=m["gt"], le=m["le"], lt=m["lt"], required=m["required"],
        )
    return out


class CoercionError(ValueError):
    """Raised with a message describing what is allowed; the caller adds file/table/key."""


def _is_optional(tp: Any) -> tuple[bool, Any]:
    if get_origin(tp) in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) != len(get_args(tp)):
            return True, args[0] if len(args) == 1 else Union[tuple(args)]
    return False, tp


def describe_type(tp: Any, info: OptionInfo | None = None) -> str:
    optional, inner = _is_optional(tp)
    if info is not None and info.choices:
        return "one of " + ", ".join(repr(c) if isinstance(c, str) else str(c) for c in info.choices)
    origin = get_origin(inner)
    if origin is Literal:
        return "one of " + ", ".join(repr(c) for c in get_args(inner))
    if inner is bool:
        base = "true or false"
    elif inner is int:
        base = "an integer"
    elif inner is float:
        base = "a number"
    elif inner is str:
        base = "a string"
    elif origin in (Union, types.UnionType):
        base = " or ".join(describe_type(a) for a in get_args(inner))
    elif origin is tuple:
        base = f"a list of {describe_type(get_args(inner)[0]).removeprefix('a ').removeprefix('an ')}s"
    elif origin is dict or inner is dict:
        base = "a table"
    else:
        base = str(inner)
    if info is not None:
        bounds = []
        for op, key in ((">=", "ge"), (">", "gt"), ("<=", "le"), ("<", "lt")):
            val = getattr(info, key)
            if val is not None:
                bounds.append(f"{op} {val:g}")
        if bounds:
            base += " " + " and ".join(bounds)
    return base


_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def coerce(value: Any, tp: Any, *, from_cli: bool = False) -> Any:
    """Convert a TOML value (or a command-line string when `from_cli`) to `tp`, or raise CoercionError."""
    optional, inner = _is_optional(tp)
    if value is None or (from_cli and optional and isinstance(value, str) and value.lower() in ("none", "null")):
        if optional:
            return None
        raise CoercionError("a value is required")
    origin = get_origin(inner)
    if origin is Literal:
        allowed = get_args(inner)
        if value in allowed:
            return value
        if isinstance(value, str):
            for a in allowed:
                if isinstance(a, str) and a.lower() == value.lower():
                    return a
        raise CoercionError(f"got {value!r}")
    if inner is bool:
        if isinstance(value, bool):
            return value
        if from_cli and isinstance(value, str):
            if value.lower() in _TRUE:
                return True
            if value.lower() in _FALSE:
                return False
        raise CoercionError(f"got {value!r}")
    if inner is int:
        if isinstance(value, bool):
            raise CoercionError(f"got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer() and not from_cli:
            return int(value)
        if from_cli and isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
        raise CoercionError(f"got {value!r}")
    if inner is float:
        if isinstance(value, bool):
            raise CoercionError(f"got {value!r}")
        if isinstance(value, (int, float)):
            out = float(value)
        elif from_cli and isinstance(value, str):
            try:
                out = float(value)
            except ValueError:
                raise CoercionError(f"got {value!r}") from None
        else:
            raise CoercionError(f"got {value!r}")
        if not math.isfinite(out):
            raise CoercionError(f"got {value!r}")
        return out
    if inner is str:
        if isinstance(value, str):
            return value
        raise CoercionError(f"got {value!r} ({type(value).__name__})")
    if origin in (Union, types.UnionType):
        for alt in get_args(inner):
            try:
                return coerce(value, alt, from_cli=from_cli)
            except CoercionError:
                continue
        raise CoercionError(f"got {value!r}")
    if origin is tuple:
        (item_tp, *_rest) = get_args(inner)
        if from_cli and isinstance(value, str):
            value = parse_cli_list(value)
        if not isinstance(value, (list, tuple)):
            value = [value]
        return tuple(coerce(v, item_tp, from_cli=from_cli) for v in value)
    if origin is dict or inner is dict:
        if isinstance(value, dict):
            return types.MappingProxyType(dict(value))
        raise CoercionError(f"got {value!r}")
    raise TypeError(f"unsupported option type {tp!r}")


def parse_cli_list(text: str) -> list:
    """`[1, 2]` or `a,b` on the command line."""
    text = text.strip()
    if text.startswith("["):
        import tomllib

        try:
            return tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            raise CoercionError(f"got {text!r}, which is not a valid list") from None
    return [p.strip() for p in text.split(",") if p.strip()]


def with_choice_case(value: Any, info: OptionInfo) -> Any:
    """A string choice in the case it was declared in ("LoKr" -> "lokr"), as Literal options take them."""
    if info.choices and isinstance(value, str) and value not in info.choices:
        for choice in info.choices:
            if isinstance(choice, str) and choice.lower() == value.lower():
                return choice
    return value


def check_bounds(value: Any, info: OptionInfo) -> None:
    if info.choices and value not in info.choices and value is not None:
        raise CoercionError(f"got {value!r}")
    values = value if isinstance(value, tuple) else (value,)
    for v in values:
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            continue
        if (info.ge is not None and v < info.ge) or (info.gt is not None and v <= info.gt) or \
           (info.le is not None and v > info.le) or (info.lt is not None and v >= info.lt):
            raise CoercionError(f"got {v!r}")


def closest(name: str, candidates: typing.Iterable[str]) -> str | None:
    found = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return found[0] if found else None


def format_value(value: Any) -> str:
    """TOML-style rendering of a value for --help and --print_config."""
    if value is None:
        return "(unset)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(format_value(v) for v in value) + "]"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, typing.Mapping):
        return "{ " + ", ".join(f"{k} = {format_value(v)}" for k, v in value.items()) + " }"
    return str(value)
