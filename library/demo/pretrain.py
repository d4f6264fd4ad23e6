"""Pieces the demo's pretraining tools share (tools/train_demo_base.py, tools/train_demo_classifier.py)."""
from __future__ import annotations

import json
from pathlib import Path


def optimizer_step(opt, sched, loss, clip_params=None) -> None:
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if clip_params is not None:
        import torch

        torch.nn.utils.clip_grad_norm_(clip_params, 1.0)
    opt.step()
    sched.step()


def load_vae(work: Path):
    from diffusers import AutoencoderKL
    from safetensors.torch import load_file

    from library.demo.models import VAE_CONFIG

    scaling = json.loads((work / "vae.json").read_text())["scaling_factor"]
    vae = AutoencoderKL(**VAE_CONFIG, scaling_factor=scaling)
    vae.load_state_dict(load_file(str(work / "vae.safetensors")))
    return vae.eval().requires_grad_(False)
