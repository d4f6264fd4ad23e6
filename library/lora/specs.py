"""`FILE[:MULTIPLIER]` LoRA arguments of the command-line tools, read through the common reader."""
from __future__ import annotations

import sys
from pathlib import Path

from library.errors import UserError


def parse_lora(spec: str) -> tuple[Path, float]:
    path, sep, mult = spec.rpartition(":")
    if sep and path:
        try:
            return Path(path), float(mult)
        except ValueError:
            pass  # a colon in the path itself (C:\...)
    if not Path(spec).is_file():
        raise UserError(f"--lora {spec}: no such file (write FILE or FILE:MULTIPLIER)")
    return Path(spec), 1.0


def load_loras(specs: list[str], index=None) -> list:
    """[(LoraWeights, multiplier)]; tensors that match no layer are reported and skipped."""
    from library.lora.weights import load_weights

    loras = []
    for spec in specs:
        path, mult = parse_lora(spec)
        weights = load_weights(path, index)
        if weights.unknown:
            print(f"warning: {path}: {len(weights.unknown)} tensors match no layer of the model and are skipped "
                  f"(e.g. {weights.unknown[0]})", file=sys.stderr)
        loras.append((weights, mult))
    return loras
