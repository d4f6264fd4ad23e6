"""Turning options into runtime objects: precision, accelerator, attention kernel, optimizer."""
from __future__ import annotations

import logging
import os
from datetime import timedelta

import torch

from library.config import Config
from library.errors import UserError

log = logging.getLogger(__name__)

DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def native_bf16() -> bool:
    """Whether the GPU computes in bf16 natively (Ampere and newer). Plain is_bf16_supported() also
    counts emulated bf16 (T4, V100, RTX 20xx), which runs several times slower than fp16 there."""
    return torch.cuda.is_bf16_supported(including_emulation=False)


def resolve_precision(requested: str, cpu: bool, option: str = "mixed_precision =", full: str = "no") -> str:
    """"auto" -> "bf16" on GPUs with native bf16, "fp16" (with loss scaling) on older GPUs, "no" on CPUs.
    `option` names the setting in errors (the config key, or a tool's flag), `full` its fp32 value."""
    gpu = not cpu and torch.cuda.is_available()
    if requested == "auto":
        if not gpu:
            return "no"
        return "bf16" if native_bf16() else "fp16"
    if requested == "fp16" and not gpu:
        raise UserError(f'{option} "fp16" needs a CUDA GPU (CPUs have no fp16 autocast); use "bf16" or "{full}"')
    if requested == "bf16" and gpu and not native_bf16():
        raise UserError(f'{option} "bf16" is not supported natively by this GPU (it would be emulated, several '
                        'times slower); use "fp16"')
    return requested


def vae_dtype(no_half_vae: bool | None, overflows_in_fp16: bool, precision: str) -> torch.dtype:
    """The VAE's dtype: fp32 when asked (no_half_vae) and, unless told otherwise, for a VAE that
    overflows to NaN in fp16 (the SDXL VAE: ModelFamily.vae_overflows_in_fp16); else the run's
    precision."""
    if no_half_vae is None:
        no_half_vae = overflows_in_fp16 and precision == "fp16"
    return torch.float32 if no_half_vae else DTYPES[precision]


def make_accelerator(cfg: Config, trackers: list[str], logging_dir: str):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs, ProjectConfiguration

    cpu = not torch.cuda.is_available()
    precision = resolve_precision(cfg.training.mixed_precision, cpu)
    # Only LoRA weights get gradients. In the UNet every one is used each step; in the text
    # encoders the layers after the one the conditioning is taken from (SDXL's penultimate layer,
    # clip_skip) get none, which DDP must be told about or it fails at the first backward.
    ddp = DistributedDataParallelKwargs(find_unused_parameters=not cfg.network.network_train_unet_only)
    # The other processes wait at a collective while the main process alone caches to disk, samples
    # or saves; accelerate's 10-minute default would kill long rounds of that as a hang.
    group = InitProcessGroupKwargs(timeout=timedelta(minutes=cfg.training.ddp_timeout))
    project = ProjectConfiguration(project_dir=cfg.saving.output_dir, logging_dir=logging_dir)
    accelerator = Accelerator(mixed_precision=precision, cpu=cpu, kwargs_handlers=[ddp, group],
                              log_with=trackers or None, project_config=project,
                              dynamo_plugin=dynamo_plugin(cfg.training.torch_compile, cfg.training.dynamo_backend))
    if cpu:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))
        set_cpu_threads(cfg.training.cpu_threads, local)
    use_tf32(accelerator.device, precision)
    return accelerator, precision


def dynamo_plugin(compile_models: bool, backend: str):
    """accelerate's torch.compile settings, from the config alone (as kohya: an `accelerate config`
    with a dynamo backend would otherwise compile models the config never asked to). With
    compiling on, a part that fails to compile (no C++ compiler, a kernel the GPU lacks) runs
    uncompiled: dynamo then logs the error and falls back to eager for that part."""
    from accelerate.utils import TorchDynamoPlugin

    if not compile_models or backend == "no":
        return TorchDynamoPlugin(backend="no")
    import torch._dynamo

    torch._dynamo.config.suppress_errors = True
    return TorchDynamoPlugin(backend=backend)


def usable_cores() -> int:
    """The cores this process may run on: its affinity mask (taskset, a container's cpuset), else all."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def use_tf32(device: torch.device, precision: str) -> bool:
    """fp32 runs on a GPU multiply in TF32 (about 8x the fp32 rate on Ampere and newer, with bf16's
    10-bit mantissa but fp32's range), as kohya's scripts and most trainers do. Mixed-precision runs
    keep full fp32 for the few matmuls that run in fp32 (APT's attention maps, the loss)."""
    if device.type != "cuda" or precision != "no":
        return False
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return True


def set_cpu_threads(requested: int, local_processes: int) -> int:
    """`accelerate launch` sets OMP_NUM_THREADS=1 when it is unset, which halves the speed of a CPU run
    on two cores; use the process's cores (shared among local processes) unless the user chose."""
    threads = requested or max(1, usable_cores() // max(local_processes, 1))
    torch.set_num_threads(threads)
    return threads
