"""GPU-only paths checked on the CPU: precision choice, per-step peak memory, VAE decode outside
autocast, sample_lora's device and dtype handling, NCCL timeout, kohya's paged optimizer names."""
from __future__ import annotations

from datetime import timedelta

import numpy as np
import pytest
import torch

from library.config import build_config
from library.config.options import OPTIMIZER_NAMES
from library.errors import UserError
from library.train.optimizers import OPTIMIZERS, build_optimizer
from library.train.setup import resolve_precision, vae_dtype
from library.train.tracking import PeakMemory
from tests.helpers import random_lora_file, tiny_config


def fake_gpu(monkeypatch, native_bf16: bool) -> None:
    """A CUDA GPU as torch reports it: T4/V100/RTX 20xx emulate bf16, Ampere and newer have it."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: native_bf16 or including_emulation)


def test_auto_precision_is_fp16_on_gpus_that_only_emulate_bf16(monkeypatch):
    fake_gpu(monkeypatch, native_bf16=False)
    assert resolve_precision("auto", cpu=False) == "fp16"
    with pytest.raises(UserError, match='mixed_precision = "bf16" is not supported natively by this GPU'):
        resolve_precision("bf16", cpu=False)
    assert resolve_precision("fp16", cpu=False) == "fp16"
    fake_gpu(monkeypatch, native_bf16=True)
    assert resolve_precision("auto", cpu=False) == "bf16"
    assert resolve_precision("auto", cpu=True) == "no"  # accelerate's cpu=True wins over any GPU


def test_vae_dtype_rule():
    assert vae_dtype(None, overflows_in_fp16=True, precision="fp16") == torch.float32  # the SDXL VAE overflows in fp16
    assert vae_dtype(None, overflows_in_fp16=False, precision="fp16") == torch.float16
    assert vae_dtype(None, overflows_in_fp16=True, precision="bf16") == torch.bfloat16
    assert vae_dtype(True, overflows_in_fp16=False, precision="bf16") == torch.float32
    assert vae_dtype(False, overflows_in_fp16=True, precision="fp16") == torch.float16


def test_peak_memory_is_per_step_with_a_run_maximum(monkeypatch):
    """A fake allocator: caching and a sample round between steps peak higher than training."""
    gib = 2 ** 30
    alloc = {"now": 2 * gib, "peak": 2 * gib}

    def use(n):
        alloc["peak"] = max(alloc["peak"], alloc["now"] + n * gib)

    def reset(device=None):
        alloc["peak"] = alloc["now"]

    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", reset)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: alloc["peak"])
    meter = PeakMemory(torch.device("cuda", 0))
    use(8)  # latent caching before training
    meter.start_step()
    use(3)
    assert meter.scalars() == {"peak_memory_gib": 5.0, "peak_memory_run_gib": 5.0}
    use(10)  # a sample round after the step
    meter.start_step()
    use(1)
    assert meter.scalars() == {"peak_memory_gib": 3.0, "peak_memory_run_gib": 5.0}


def test_paged_optimizer_names_are_accepted():
    assert set(OPTIMIZER_NAMES) == set(OPTIMIZERS)  # one list, config and builder
    for name in ("PagedAdamW8bit", "PagedAdamW", "PagedAdamW32bit", "PagedLion8bit"):
        p = torch.nn.Parameter(torch.randn(64, 64))
        opt = build_optimizer(name, [], [{"params": [p]}], 1e-3)
        assert type(opt).__name__ == name and type(opt).__module__.startswith("bitsandbytes")
        before = p.detach().clone()
        p.grad = torch.randn_like(p)
        with pytest.warns(UserWarning, match="Paged optimizers are not supported on CPU"):
            opt.step()
        assert not torch.equal(before, p.detach())


def test_ddp_timeout_reaches_accelerate(tmp_path, tiny_models, images):
    from library.train.setup import make_accelerator

    cfg = build_config(str(tiny_config(tmp_path, tiny_models["sd15"], images)), [("ddp_timeout", "240")])
    accelerator, _ = make_accelerator(cfg, [], str(tmp_path / "logs"))
    assert accelerator.init_handler.timeout == timedelta(minutes=240)
    default = build_config(str(tiny_config(tmp_path, tiny_models["sd15"], images)), [])
    assert default.training.ddp_timeout == 180


def test_vae_batch_size_sets_the_latent_cache_batch(tmp_path, tiny_models, images):
    from library.train.loop import Trainer

    calls = []
    path = tiny_config(tmp_path, tiny_models["sd15"], images, max_train_steps=1)
    trainer = Trainer(build_config(str(path), [("cache_latents", "true"), ("vae_batch_size", "3"),
                                               ("log_with", "none")]))
    assert trainer.parts.batches.cache.batch_size == 3
    encoder = trainer.parts.batches.cache.encode
    trainer.parts.batches.cache.encode = lambda pixels: calls.append(len(pixels)) or encoder(pixels)
    trainer.parts.batches.cache.entries.clear()
    trainer.parts.batches.cache.fill()
    assert calls == [3, 1]  # four images of one bucket


def sampler_for(prompt: str = "a red circle --d 3 --s 2 --w 64 --h 64"):
    from library.train.prompts import parse_line
    from library.train.sampling import Sampler

    return lambda folder, bundle: Sampler([parse_line(prompt, "test")], folder, "s", (64, 64), "ddim", 0, False,
                                          False, text=bundle.family.caption_encoder(bundle.tokenizers,
                                                                                    bundle.text_encoders))


def test_fp32_vae_decodes_in_fp32_outside_bf16_autocast(tmp_path, tiny_models):
    """no_half_vae under autocast: the UNet runs in bf16 autocast, the VAE decode in fp32 without it."""
    from library.config.options import ModelOptions
    from library.models.loader import load_models

    bundle = load_models(ModelOptions(pretrained_model_name_or_path=str(tiny_models["sd15"])))
    seen = {}

    def record(name):
        def hook(module, args):
            seen.setdefault(name, []).append((torch.is_autocast_enabled("cpu"), args[0].dtype))
        return hook

    bundle.unet.register_forward_pre_hook(record("unet"))
    bundle.vae.decoder.register_forward_pre_hook(record("decoder"))
    conv = bundle.vae.decoder.conv_out
    conv.register_forward_hook(lambda m, a, out: seen.setdefault("decoded", []).append(out.dtype))
    images = sampler_for()(tmp_path, bundle).run(bundle, bundle.unet, torch.device("cpu"), None,
                                         lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    assert all(on for on, _ in seen["unet"])
    assert seen["decoder"] == [(False, torch.float32)]
    assert seen["decoded"] == [torch.float32]
    assert images[0][1].size == (64, 64)


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_decode_matches_the_pipeline_in_fp32(arch):
    from library.models.tiny import build_tiny_pipeline
    from library.train.sampling import decode

    pipe = build_tiny_pipeline(arch, seed=1)
    pipe.set_progress_bar_config(disable=True)
    kw = dict(prompt="a red circle", width=64, height=64, num_inference_steps=2)
    theirs = pipe(generator=torch.Generator().manual_seed(4), output_type="np", **kw).images[0]
    latents = pipe(generator=torch.Generator().manual_seed(4), output_type="latent", **kw).images
    ours = np.asarray(decode(pipe, latents)[0], dtype=np.float32) / 255
    assert np.abs(ours - theirs).max() <= 1 / 255 + 1e-6  # only the rounding to 8 bits differs


def test_sample_lora_moves_each_model_once_in_its_dtype(tmp_path, tiny_models, monkeypatch):
    """Merged on the CPU in fp32, then UNet and text encoders moved once in bf16 and the VAE in fp32;
    a bf16 UNet beside an fp32 VAE (no autocast) must decode."""
    from library.lora.network import NetworkSpec
    from tools import sample_lora

    bundle, lora = random_lora_file(tiny_models["sdxl"], tmp_path / "l.safetensors", NetworkSpec(dim=2, alpha=2.0))

    moves = []
    original = torch.nn.Module.to

    def to(self, *args, **kwargs):
        dtype = kwargs.get("dtype") or next((a for a in args if isinstance(a, torch.dtype)), None)
        if dtype is not None:
            moves.append((type(self).__name__, dtype))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "to", to)
    out = tmp_path / "out"
    assert sample_lora.main(["--model", str(tiny_models["sdxl"]), "--lora", str(lora), "--prompts",
                             "a red circle --d 5 --s 2", "--size", "64", "--out", str(out), "--name", "x",
                             "--sampler", "ddim", "--precision", "bf16", "--no_half_vae"]) == 0
    assert sorted(moves, key=str) == sorted([("UNet2DConditionModel", torch.bfloat16),
                                             ("CLIPTextModel", torch.bfloat16),
                                             ("CLIPTextModelWithProjection", torch.bfloat16),
                                             ("AutoencoderKL", torch.float32)], key=str)
    assert (out / "x_00_5.png").is_file()
