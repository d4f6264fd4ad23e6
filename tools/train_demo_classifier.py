#!/usr/bin/env python
"""Train the toy-world classifier that scores the demo's generations (shape, colour, background,
pattern, size) and embeds images for fidelity and diversity measurements.

    python tools/train_demo_classifier.py                          # a few minutes on 2 cores
    python tools/train_demo_classifier.py --vae runs/demo_base     # + VAE round-trip augmentation

It trains on freshly rendered scenes of every attribute combination. Generated images are softer
than rendered ones, so half of each batch is passed through the demo's VAE (encode + decode) and
all of it gets mild blur, noise and colour jitter. Writes demo/classifier.safetensors and prints
the held-out accuracy per head on rendered and on VAE-reconstructed scenes.
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

from library.utils.toolmain import command


def batch_of(rng: random.Random, n: int):
    import torch

    from library.demo.models import HEADS, scene_labels, to_tensor
    from library.demo.world import random_scene, render

    scenes = [random_scene(rng) for _ in range(n)]
    x = to_tensor([render(s) for s in scenes])
    labels = [scene_labels(s) for s in scenes]
    y = {k: torch.tensor([lab[k] for lab in labels]) for k in HEADS}
    return x, y


def degrade(x, gen, vae=None):
    import torch
    import torch.nn.functional as F

    if vae is not None:
        half = x.shape[0] // 2
        with torch.no_grad():
            rec = vae.decode(vae.encode(x[:half]).latent_dist.mode()).sample.clamp(-1, 1)
        x = torch.cat([rec, x[half:]])
    k = torch.tensor([1.0, 2.0, 1.0])
    k = (k[:, None] * k[None, :] / 16).expand(3, 1, 3, 3)
    blur = torch.rand(x.shape[0], 1, 1, 1, generator=gen) < 0.5
    x = torch.where(blur, F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k, groups=3), x)
    jitter = 1 + (torch.rand(x.shape[0], 3, 1, 1, generator=gen) - 0.5) * 0.15
    x = x * jitter + torch.randn(x.shape, generator=gen) * 0.04
    return x.clamp(-1, 1)


def evaluate(model, seed: int, vae=None, n: int = 512) -> dict[str, float]:
    import torch

    from library.demo.models import HEADS

    rng = random.Random(seed)
    x, y = batch_of(rng, n)
    if vae is not None:
        with torch.no_grad():
            x = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
    with torch.no_grad():
        out = model(x)
    return {k: float((out[k].argmax(1) == y[k]).float().mean()) for k in HEADS}


def main(argv: list[str] | None = None) -> int:
    from library.demo.models import CLASSIFIER

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--vae", type=Path, help="work folder of tools/train_demo_base.py (for VAE augmentation)")
    ap.add_argument("--out", type=Path, default=CLASSIFIER)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = ap.parse_args(argv)

    from library.utils.runtime import offline_and_quiet

    offline_and_quiet()
    import torch
    from safetensors.torch import save

    from library.demo.models import HEADS, ToyClassifier
    from library.demo.pretrain import load_vae, optimizer_step
    from library.utils.atomic import atomic_write_bytes

    if args.threads:
        torch.set_num_threads(args.threads)

    vae = load_vae(args.vae) if args.vae is not None else None
    torch.manual_seed(args.seed)
    model = ToyClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=args.steps, pct_start=0.1)
    rng = random.Random(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    tick = time.time()
    for step in range(args.steps):
        x, y = batch_of(rng, args.batch)
        x = degrade(x, gen, vae)
        out = model(x)
        loss = sum(torch.nn.functional.cross_entropy(out[k], y[k]) for k in HEADS)
        optimizer_step(opt, sched, loss)
        if step % 100 == 0 or step == args.steps - 1:
            print(f"step {step}/{args.steps} loss {loss.item():.4f} ({time.time() - tick:.0f} s)", flush=True)
    model.eval()
    atomic_write_bytes(args.out, save({k: v.contiguous() for k, v in model.state_dict().items()}))
    clean = evaluate(model, 999)
    print("held-out accuracy, rendered:  " + ", ".join(f"{k} {v:.3f}" for k, v in clean.items()))
    if vae is not None:
        rec = evaluate(model, 999, vae)
        print("held-out accuracy, VAE round trip: " + ", ".join(f"{k} {v:.3f}" for k, v in rec.items()))
    print(f"wrote {args.out} ({args.out.stat().st_size / 1024:.0f} KiB)")
    return 0


cli = command(main)  # the console command (pyproject.toml)

if __name__ == "__main__":
    sys.exit(cli())
