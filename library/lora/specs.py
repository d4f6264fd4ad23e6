"""`FILE[:MULTIPLIER]` LoRA arguments of the command-line tools, read through the common reader."""
from __future__ import annotations

from pathlib import Path

from library.errors import UserError


def parse_lora(spec: str) -> tuple[Path, float]:
    path, sep, mult = spec.rpartition(":")
    if sep and path:
        try:
            return Path(path), float(mult)
        except ValueError:
            pass  # a colon in the path itself (C:\...)
    if Path(spec).is_dir():
        raise UserError(f"--lora {spec}: is a folder; expected a LoRA .safetensors file (FILE or FILE:MULTIPLIER)")
    if not Path(spec).is_file():
        raise UserError(f"--lora {spec}: no such file (write FILE or FILE:MULTIPLIER)")
    return Path(spec), 1.0


def load_loras(specs: list[str], target=None, allow_partial: bool = False) -> list:
    """[(LoraWeights, multiplier)], each checked against `target` (library.lora.compat.Target); without
    one, against the architecture the first file fits, so that all of them fit the same model."""
    from library.lora.compat import read_checked

    loras = []
    for spec in specs:
        path, mult = parse_lora(spec)
        weights, target = read_checked(path, target, allow_partial)
        loras.append((weights, mult))
    return loras
