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

import torch
from safetensors.torch import load_file, save

from library.config.network_kinds import file_suffixes
from library.errors import UserError
from library.utils.atomic import atomic_write_bytes

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


def write_lora(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """Write atomically; returns the sshs_model_hash."""
    blob = serialize(tensors, metadata)
    atomic_write_bytes(path, blob)
    return hashlib.sha256(data_section(blob)).hexdigest()


def read_lora(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a LoRA file (kohya layout)."""
    from library.models.single_file import read_safetensors_header

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such LoRA file")
    if path.suffix.lower() != ".safetensors":
        raise UserError(f"{path}: LoRA files must be .safetensors")
    header = read_safetensors_header(path)
    try:
        tensors = load_file(str(path))
    except Exception as exc:  # safetensors' own error type
        raise UserError(f"{path}: corrupt or truncated safetensors file ({exc})") from None
    return tensors, dict(header.get("__metadata__") or {})
