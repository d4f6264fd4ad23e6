"""Sample prompts: kohya's text format, or TOML / JSON.

Text: one prompt per line, `#` starts a comment line, options after the prompt:
`--n` negative prompt, `--w`/`--h` size, `--s` steps, `--l` CFG scale, `--d` seed, `--ss` sampler.

    a photo of sks dog on a beach --n blurry, lowres --w 1024 --h 768 --s 30 --l 7 --d 42 --ss euler

TOML: `[[prompt]]` tables (or kohya's `[prompt]` defaults with `[[prompt.subset]]`); JSON: a list
of objects. Keys: prompt, negative_prompt, width, height, sample_steps (or steps), scale (or
guidance_scale), seed, sample_sampler (or sampler).
"""
from __future__ import annotations

import json
import math
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

from library.errors import UserError

SAMPLERS = ("euler_a", "euler", "ddim", "dpm++_2m", "dpm++_2m_karras")
_ALIASES = {"k_euler_a": "euler_a", "k_euler": "euler", "dpmsolver++": "dpm++_2m", "dpmpp_2m": "dpm++_2m",
            "dpmpp_2m_karras": "dpm++_2m_karras", "k_dpm++_2m": "dpm++_2m", "k_dpm++_2m_karras": "dpm++_2m_karras"}
DEFAULT_STEPS = 30
DEFAULT_SCALE = 7.5


@dataclass(frozen=True)
class SamplePrompt:
    prompt: str
    negative_prompt: str = ""
    width: int | None = None   # None: the training resolution
    height: int | None = None
    steps: int = DEFAULT_STEPS
    scale: float = DEFAULT_SCALE
    seed: int | None = None    # None: training seed + prompt index (the same every round)
    sampler: str | None = None  # None: sample_sampler


def normalise_sampler(name: str, where: str) -> str:
    key = re.sub(r"[\s-]+", "_", name.strip().lower())
    key = _ALIASES.get(key, key)
    if key not in SAMPLERS:
        raise UserError(f"{where}: unknown sampler {name!r}; valid: {', '.join(SAMPLERS)}")
    return key


def _size(value, where: str, key: str) -> int:
    try:
        size = int(value)
    except (TypeError, ValueError):
        raise UserError(f"{where}: {key}: expected a whole number of pixels, got {value!r}") from None
    if size < 64 or size % 8:
        raise UserError(f"{where}: {key}: expected at least 64 and a multiple of 8, got {size}")
    return size


def _number(value, where: str, key: str, kind=int):
    whole = "a whole number" if kind is int else "a number"
    if isinstance(value, bool) or (kind is int and isinstance(value, float)):
        raise UserError(f"{where}: {key}: expected {whole}, got {value!r}")
    try:
        out = kind(value)
    except (TypeError, ValueError, OverflowError):
        raise UserError(f"{where}: {key}: expected {whole}, got {value!r}") from None
    if not math.isfinite(out):
        raise UserError(f"{where}: {key}: expected a finite number, got {value!r}")
    if out <= 0 and key not in ("seed", "--d"):
        raise UserError(f"{where}: {key}: expected a positive number, got {value!r}")
    if key in ("seed", "--d") and not -2 ** 63 <= out < 2 ** 64:  # what a torch generator takes
        raise UserError(f"{where}: {key}: expected a seed that fits in 64 bits, got {value!r}")
    return out


def _text(value, where: str, key: str) -> str:
    if not isinstance(value, str):
        raise UserError(f"{where}: {key}: expected text, got {value!r}")
    return value


def parse_line(line: str, where: str) -> SamplePrompt:
    # kohya matches the option letters case-insensitively: "--W 512" is a width, not prompt text
    parts = re.split(r"\s--(?=[a-zA-Z]+(?:\s|$))", " " + line.strip())
    prompt = parts[0].strip()
    fields: dict = {}
    for part in parts[1:]:
        flag, _, value = part.partition(" ")
        flag, value = flag.lower(), value.strip()
        if not value and flag != "n":
            raise UserError(f"{where}: --{flag}: missing value")
        if flag == "n":
            fields["negative_prompt"] = value
        elif flag == "w":
            fields["width"] = _size(value, where, "--w")
        elif flag == "h":
            fields["height"] = _size(value, where, "--h")
        elif flag == "s":
            fields["steps"] = _number(value, where, "--s")
        elif flag == "l":
            fields["scale"] = _number(value, where, "--l", float)
        elif flag == "d":
            fields["seed"] = _number(value, where, "--d")
        elif flag == "ss":
            fields["sampler"] = normalise_sampler(value, where)
        else:
            raise UserError(f"{where}: unknown option --{flag}; valid: --n --w --h --s --l --d --ss")
    if not prompt:
        raise UserError(f"{where}: the line has options but no prompt")
    return SamplePrompt(prompt=prompt, **fields)


_KEYS = {"prompt": "prompt", "negative_prompt": "negative_prompt", "width": "width", "height": "height",
         "sample_steps": "steps", "steps": "steps", "scale": "scale", "guidance_scale": "scale", "seed": "seed",
         "sample_sampler": "sampler", "sampler": "sampler"}


def _from_mapping(entry: dict, defaults: dict, where: str) -> SamplePrompt:
    merged = {**defaults, **entry}
    fields: dict = {}
    for key, value in merged.items():
        if key not in _KEYS:
            raise UserError(f"{where}: unknown key {key!r}; valid: {', '.join(sorted(_KEYS))}")
        name = _KEYS[key]
        if name in ("width", "height"):
            value = _size(value, where, key)
        elif name in ("steps", "seed"):
            value = _number(value, where, key)
        elif name == "scale":
            value = _number(value, where, key, float)
        elif name == "sampler":
            value = normalise_sampler(_text(value, where, key), where)
        else:
            value = _text(value, where, key)
        fields[name] = value
    if not fields.get("prompt"):
        raise UserError(f"{where}: prompt: required")
    return SamplePrompt(**fields)


def load_prompts(path: str | Path) -> list[SamplePrompt]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read the sample prompts ({exc})") from None
    suffix = path.suffix.lower()
    if suffix == ".toml":
        try:
            doc = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise UserError(f"{path}: invalid TOML: {exc}") from None
        block = doc.get("prompt")
        if isinstance(block, dict):  # kohya: [prompt] defaults + [[prompt.subset]]
            defaults = {k: v for k, v in block.items() if k != "subset"}
            entries = block.get("subset", [])
        else:
            defaults, entries = {}, block or []
        prompts = [_from_mapping(e, defaults, f"{path}: prompt #{i + 1}") for i, e in enumerate(entries)]
    elif suffix == ".json":
        try:
            entries = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}: invalid JSON: {exc}") from None
        if not isinstance(entries, list):
            raise UserError(f"{path}: expected a JSON list of prompt objects")
        prompts = [_from_mapping(e, {}, f"{path}: prompt #{i + 1}") for i, e in enumerate(entries)]
    else:
        prompts = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip() and not line.lstrip().startswith("#"):
                prompts.append(parse_line(line, f"{path}:{n}"))
    if not prompts:
        raise UserError(f"{path}: no prompts found")
    return prompts
