"""Write and read LoRA .safetensors files in kohya's layout.

The file holds only `<name>.lora_down.weight`, `<name>.lora_up.weight` and `<name>.alpha`
tensors (any other tensor makes diffusers' kohya converter fail), or for DoRA/LoHa/LoKr networks
LyCORIS's tensors (library.lora.lycoris); everything else goes into the string metadata. `sshs_model_hash` is the SHA-256 of the data section (the bytes after the
header), so it does not depend on the metadata that contains it.
"""
from __future__ import annotations

import hashlib
import struct
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save

from library.config.network_kinds import file_suffixes
from library.errors import UserError
from library.utils.atomic import atomic_path

SAVE_DTYPES = {"float": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def data_section(blob: bytes) -> bytes:
    (n,) = struct.unpack("<Q", blob[:8])
    return blob[8 + n:]


def serialize(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """The file's bytes, with `sshs_model_hash` (and the other values of `metadata`) in the header."""
    suffixes = file_suffixes()
    bad = [k for k in tensors if k.partition(".")[2] not in suffixes]
    if bad:
        raise ValueError(f"not a kohya LoRA tensor name: {bad[0]}")
    bare = save(tensors)
    digest = hashlib.sha256(data_section(bare)).hexdigest()
    meta = {k: str(v) for k, v in metadata.items()}
    meta["sshs_model_hash"] = digest
    return save(tensors, metadata=meta)


def write_lora(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str],
               before_rename: Callable[[], None] | None = None) -> str:
    """Write atomically; returns the sshs_model_hash. `before_rename` runs once the file is written
    under its temporary name: when it raises, the file is not renamed into place (the earlier file of
    that name stays)."""
    blob = serialize(tensors, metadata)
    with atomic_path(path) as tmp:
        tmp.write_bytes(blob)
        if before_rename is not None:
            before_rename()
    return hashlib.sha256(data_section(blob)).hexdigest()


def non_finite(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors that hold NaN or infinite values."""
    return [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]


def non_finite_error(path, bad: list[str], total: int) -> UserError:
    return UserError(f"{path}: {len(bad)} of its {total} tensors hold NaN or infinite values (e.g. {bad[0]}); every "
                     "image it touches would break, so it is not used: it comes from a run that diverged (train it "
                     "again, e.g. with a lower learning rate), or the file is damaged")


def read_lora(path: str | Path, allow_non_finite: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a LoRA file (kohya layout). A file with NaN or infinite values is refused
    unless `allow_non_finite` (for the inspector, which reports them)."""
    from library.models.single_file import read_safetensors_header

    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: is a folder; expected a LoRA .safetensors file")
    if not path.is_file():
        raise UserError(f"{path}: no such LoRA file")
    if path.suffix.lower() != ".safetensors":
        raise UserError(f"{path}: LoRA files must be .safetensors")
    header = read_safetensors_header(path)
    try:
        tensors = load_file(str(path))
    except Exception as exc:  # safetensors' own error type
        raise UserError(f"{path}: corrupt or truncated safetensors file ({exc})") from None
    bad = non_finite(tensors)
    if bad and not allow_non_finite:
        raise non_finite_error(path, bad, len(tensors))
    return tensors, dict(header.get("__metadata__") or {})
