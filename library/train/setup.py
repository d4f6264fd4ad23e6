"""Turning options into runtime objects: precision, accelerator, attention kernel, optimizer."""
from __future__ import annotations

import logging
import os

import torch

from library.config import Config
from library.errors import UserError

log = logging.getLogger(__name__)

DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_precision(requested: str, cpu: bool) -> str:
    if requested == "auto":
        if cpu or not torch.cuda.is_available():
            return "no"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if requested == "fp16" and (cpu or not torch.cuda.is_available()):
        raise UserError('mixed_precision = "fp16" needs a CUDA GPU (CPUs have no fp16 autocast); '
                        'use "bf16" or "no"')
    if requested == "bf16" and not cpu and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        raise UserError('mixed_precision = "bf16" is not supported by this GPU; use "fp16"')
    return requested


def make_accelerator(cfg: Config, trackers: list[str], logging_dir: str):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration

    cpu = not torch.cuda.is_available()
    precision = resolve_precision(cfg.training.mixed_precision, cpu)
    # Only LoRA weights get gradients. In the UNet every one is used each step; in the text
    # encoders the layers after the one the conditioning is taken from (SDXL's penultimate layer,
    # clip_skip) get none, which DDP must be told about or it fails at the first backward.
    ddp = DistributedDataParallelKwargs(find_unused_parameters=not cfg.network.network_train_unet_only)
    project = ProjectConfiguration(project_dir=cfg.saving.output_dir, logging_dir=logging_dir)
    accelerator = Accelerator(mixed_precision=precision, cpu=cpu, kwargs_handlers=[ddp], log_with=trackers or None,
                              project_config=project)
    if cpu:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))
        set_cpu_threads(cfg.training.cpu_threads, local)
    return accelerator, precision


def set_cpu_threads(requested: int, local_processes: int) -> int:
    """`accelerate launch` sets OMP_NUM_THREADS=1 when it is unset, which halves the speed of a CPU run
    on two cores; use the machine's cores (shared among local processes) unless the user chose."""
    threads = requested or max(1, (os.cpu_count() or 1) // max(local_processes, 1))
    torch.set_num_threads(threads)
    return threads


def set_attention(unet, backend: str, device: torch.device) -> None:
    from diffusers.models.attention_processor import AttnProcessor2_0

    if backend == "xformers":
        try:
            import xformers  # noqa: F401
        except ImportError:
            raise UserError('attention = "xformers" needs the xformers package (pip install xformers, CUDA only); '
                            'or use attention = "sdpa"') from None
        if device.type != "cuda":
            raise UserError('attention = "xformers" runs only on a CUDA GPU; use attention = "sdpa" here')
        unet.enable_xformers_memory_efficient_attention()
        return
    unet.set_attn_processor(AttnProcessor2_0())
