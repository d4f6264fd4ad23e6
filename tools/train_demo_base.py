#!/usr/bin/env python
"""Pretrain the demo's tiny text-to-image model of the procedural world, from scratch, on a CPU.

    python tools/train_demo_base.py                      # all stages, about an hour on 2 cores
    python tools/train_demo_base.py --resume             # continue an interrupted run
    python tools/train_demo_base.py --stages unet export --unet_steps 6000

Stages (each writes its result to --work, so an interrupted run resumes at the stage it was in,
and the UNet stage at its last checkpoint):
  images   render the training pool (scenes of every shape/colour pair except the held-out ones)
  vae      AutoencoderKL 3 x (16, 32, 64), 64 px -> 4 x 16 x 16 latents; L1 + MSE + tiny KL
  text     CLIP text encoder (real CLIP vocabulary, width 64, 2 layers) pretrained to encode every
           attribute of a caption at its end-of-text token (attribute heads; then frozen): a jointly
           trained tiny encoder does not bind colour words to the right object
  unet     UNet2DConditionModel (32, 64, 128) on cached latents and text states, epsilon, SD's
           noise schedule, 10% caption dropout, EMA of the weights
  export   a diffusers folder (fp16 weights) that StableDiffusionPipeline.from_pretrained loads
Everything is seeded: the same arguments give the same model.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

from library.demo.pretrain import load_vae, optimizer_step
from library.utils.toolmain import command

ROOT = Path(__file__).resolve().parents[1]

STAGES = ("images", "vae", "text", "unet", "export")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def save_weights(module, path: Path) -> None:
    """safetensors, atomically: a stage counts as done when its file exists, so it must be whole."""
    from safetensors.torch import save

    from library.utils.atomic import atomic_write_bytes

    atomic_write_bytes(path, save({k: v.contiguous() for k, v in module.state_dict().items()}))


# --- images -------------------------------------------------------------------------------------

def stage_images(work: Path, count: int, seed: int) -> None:
    import numpy as np
    import torch

    from library.demo.world import held_out_pairs, render, scenes
    from library.utils.atomic import atomic_path

    out = work / "pool.pt"
    if out.exists():
        return
    held = held_out_pairs()
    pool = list(scenes(seed, count, exclude=held))
    pixels = np.stack([np.asarray(render(s)) for s in pool])  # uint8 N x 64 x 64 x 3
    with atomic_path(out) as tmp:
        torch.save({"pixels": torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous(),
                    "captions": [s.caption() for s in pool]}, tmp)
    log(f"rendered {count} scenes (held out: {sorted(held)})")


def load_pool(work: Path):
    import torch

    return torch.load(work / "pool.pt", weights_only=True)


def to_unit(pixels):
    return pixels.float() / 127.5 - 1


# --- vae ----------------------------------------------------------------------------------------

def stage_vae(work: Path, steps: int, seed: int) -> None:
    import torch
    from diffusers import AutoencoderKL

    from library.demo.models import VAE_CONFIG

    out = work / "vae.safetensors"
    if out.exists():
        return
    torch.manual_seed(seed)
    pool = load_pool(work)["pixels"]
    vae = AutoencoderKL(**VAE_CONFIG)
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=steps, pct_start=0.05)
    gen = torch.Generator().manual_seed(seed)
    vae.train()
    for step in range(steps):
        idx = torch.randint(0, len(pool), (16,), generator=gen)
        x = to_unit(pool[idx])
        post = vae.encode(x).latent_dist
        z = post.sample(generator=gen)
        rec = vae.decode(z).sample
        loss = (rec - x).abs().mean() + ((rec - x) ** 2).mean() + 1e-6 * post.kl().mean()
        optimizer_step(opt, sched, loss)
        if step % 200 == 0 or step == steps - 1:
            log(f"vae step {step}/{steps} loss {loss.item():.4f}")
    vae.eval()
    with torch.no_grad():
        lat = torch.cat([vae.encode(to_unit(pool[k:k + 64])).latent_dist.mode() for k in range(0, min(len(pool), 2048), 64)])
        rec = vae.decode(lat[:256]).sample
        mse = ((rec - to_unit(pool[:256])) ** 2).mean().item()
    scaling = 1.0 / lat.std().item()
    (work / "vae.json").write_text(json.dumps({"scaling_factor": scaling, "val_mse": mse}))
    save_weights(vae, out)
    log(f"vae done: reconstruction MSE {mse:.4f} (PSNR {10 * math.log10(4 / mse):.1f} dB), scaling {scaling:.4f}")


# --- text encoder -------------------------------------------------------------------------------

def stage_text(work: Path, steps: int, seed: int) -> None:
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    from library.demo.models import HEADS, TEXT_CONFIG, scene_labels
    from library.demo.world import scenes
    from library.models import shipped

    out = work / "text_encoder.safetensors"
    if out.exists():
        return
    torch.manual_seed(seed)
    tok = shipped.load_tokenizer(shipped.tree("sd15") / "tokenizer")
    te = CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG))
    heads = torch.nn.ModuleDict({k: torch.nn.Linear(64, len(v)) for k, v in HEADS.items()})
    opt = torch.optim.AdamW(list(te.parameters()) + list(heads.parameters()), lr=2e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.05)
    # Every caption the world can produce (held-out pairs included: words are seen, images are not).
    pool = list(scenes(seed + 1, 20000))
    rng = random.Random(seed)
    for step in range(steps):
        batch = rng.sample(pool, 128)
        ids = tok([sc.caption() for sc in batch], padding="max_length", max_length=77, truncation=True,
                  return_tensors="pt").input_ids
        pooled = te(ids).pooler_output  # the end-of-text token's state
        labels = [scene_labels(sc) for sc in batch]
        loss = sum(torch.nn.functional.cross_entropy(heads[k](pooled), torch.tensor([lab[k] for lab in labels]))
                   for k in HEADS)
        optimizer_step(opt, sched, loss)
        if step % 200 == 0 or step == steps - 1:
            log(f"text step {step}/{steps} loss {loss.item():.4f}")
    save_weights(te, out)


def load_text(work: Path):
    from safetensors.torch import load_file
    from transformers import CLIPTextConfig, CLIPTextModel

    from library.demo.models import TEXT_CONFIG

    te = CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG))
    te.load_state_dict(load_file(str(work / "text_encoder.safetensors")))
    return te.eval().requires_grad_(False)


# --- unet ---------------------------------------------------------------------------------------

def stage_unet(work: Path, steps: int, seed: int, batch: int, checkpoint_every: int = 250) -> None:
    import torch
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from safetensors.torch import load_file, save_file

    from library.demo.models import SCHEDULER_CONFIG, UNET_CONFIG
    from library.models import shipped
    from library.utils.atomic import atomic_path

    final = work / "unet.safetensors"
    if final.exists():
        return
    pool = load_pool(work)
    cache = work / "unet_inputs.pt"
    if not cache.exists():
        vae, te = load_vae(work), load_text(work)
        tok = shipped.load_tokenizer(shipped.tree("sd15") / "tokenizer")
        with torch.no_grad():
            lat = torch.cat([vae.encode(to_unit(pool["pixels"][k:k + 128])).latent_dist.mode()
                             for k in range(0, len(pool["pixels"]), 128)]) * vae.config.scaling_factor
            unique = sorted(set(pool["captions"])) + [""]
            states = torch.cat([te(tok(unique[k:k + 256], padding="max_length", max_length=77, truncation=True,
                                       return_tensors="pt").input_ids).last_hidden_state
                                for k in range(0, len(unique), 256)])
        index = {c: i for i, c in enumerate(unique)}
        with atomic_path(cache) as tmp:
            torch.save({"latents": lat, "states": states.half(), "caption_index": torch.tensor(
                [index[c] for c in pool["captions"]]), "empty": len(unique) - 1}, tmp)
        log(f"cached {len(lat)} latents and {len(unique)} caption states")
    inputs = torch.load(cache, weights_only=True)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**UNET_CONFIG)
    ema = UNet2DConditionModel(**UNET_CONFIG)
    ema.load_state_dict(unet.state_dict())
    ema.requires_grad_(False)
    noise_sched = DDPMScheduler(**{k: v for k, v in SCHEDULER_CONFIG.items() if k != "set_alpha_to_one"})
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-3, weight_decay=1e-2)
    warmup = 300

    def lr_at(step):
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(steps - warmup, 1)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    start = 0
    ckpt = work / "unet_checkpoint"
    if (ckpt / "state.json").exists():
        unet.load_state_dict(load_file(str(ckpt / "unet.safetensors")))
        ema.load_state_dict(load_file(str(ckpt / "ema.safetensors")))
        opt.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True))
        start = json.loads((ckpt / "state.json").read_text())["step"]
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at, last_epoch=start - 1)
        log(f"unet: resumed at step {start}")
    lat, states, cap = inputs["latents"], inputs["states"], inputs["caption_index"]
    unet.train()
    tick = time.time()
    for step in range(start, steps):
        gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
        idx = torch.randint(0, len(lat), (batch,), generator=gen)
        x0 = lat[idx]
        drop = torch.rand(batch, generator=gen) < 0.1
        ctx = states[torch.where(drop, torch.full_like(idx, inputs["empty"]), cap[idx])].float()
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, 1000, (batch,), generator=gen)
        pred = unet(noise_sched.add_noise(x0, noise, t), t, ctx).sample
        loss = torch.nn.functional.mse_loss(pred, noise)
        optimizer_step(opt, sched, loss, unet.parameters())
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema.parameters(), unet.parameters()):
                e.mul_(decay).add_(p.detach(), alpha=1 - decay)
        if step % 100 == 0 or step == steps - 1:
            rate = (step + 1 - start) / max(time.time() - tick, 1e-9)
            log(f"unet step {step}/{steps} loss {loss.item():.4f} lr {sched.get_last_lr()[0]:.2e} ({rate:.2f} steps/s)")
        if (step + 1) % checkpoint_every == 0 and step + 1 < steps:
            tmp = work / "unet_checkpoint.tmp"
            tmp.mkdir(exist_ok=True)
            save_file(unet.state_dict(), str(tmp / "unet.safetensors"))
            save_file(ema.state_dict(), str(tmp / "ema.safetensors"))
            torch.save(opt.state_dict(), tmp / "optimizer.pt")
            (tmp / "state.json").write_text(json.dumps({"step": step + 1}))
            if ckpt.exists():
                import shutil

                shutil.rmtree(ckpt)
            tmp.rename(ckpt)
    save_weights(ema, final)
    log("unet done")


# --- export -------------------------------------------------------------------------------------

def stage_export(work: Path, out: Path) -> None:
    import shutil

    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from safetensors.torch import load_file

    from library.demo.models import SCHEDULER_CONFIG, UNET_CONFIG
    from library.models import shipped

    unet = UNet2DConditionModel(**UNET_CONFIG)
    unet.load_state_dict(load_file(str(work / "unet.safetensors")))
    pipe = StableDiffusionPipeline(
        vae=load_vae(work), text_encoder=load_text(work), tokenizer=shipped.load_tokenizer(shipped.tree("sd15") /
                                                                                            "tokenizer"),
        unet=unet, scheduler=DDIMScheduler(**SCHEDULER_CONFIG), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.to(torch.float16)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    pipe.save_pretrained(str(tmp), safe_serialization=True)
    shipped.copy_tokenizer_files(tmp / "tokenizer")
    (tmp / "tokenizer" / "tokenizer.json").unlink(missing_ok=True)  # 3.6 MB that vocab.json + merges.txt already hold
    # Stored in fp16 to halve the size, but transformers loads a config's dtype as is: declare fp32
    # so that a plain StableDiffusionPipeline.from_pretrained gets one dtype for every component.
    te_config = tmp / "text_encoder" / "config.json"
    te_config.write_text(te_config.read_text().replace('"dtype": "float16"', '"dtype": "float32"'))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    log(f"exported {out} ({size / 2 ** 20:.1f} MiB)")


def main(argv: list[str] | None = None) -> int:
    from library.demo.models import BASE_MODEL

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "demo_base", help="work folder (checkpoints)")
    ap.add_argument("--out", type=Path, default=BASE_MODEL, help="where to export the diffusers folder")
    ap.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    ap.add_argument("--resume", action="store_true", help="keep the results already in --work")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--images", type=int, default=20000, help="size of the rendered training pool")
    ap.add_argument("--vae_steps", type=int, default=2500)
    ap.add_argument("--text_steps", type=int, default=1500)
    ap.add_argument("--unet_steps", type=int, default=6000)
    ap.add_argument("--batch", type=int, default=32, help="UNet batch size")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = ap.parse_args(argv)

    from library.utils.runtime import offline_and_quiet

    offline_and_quiet()
    import shutil

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.work.exists() and not args.resume and set(args.stages) == set(STAGES):
        shutil.rmtree(args.work)
    args.work.mkdir(parents=True, exist_ok=True)
    started = time.time()
    if "images" in args.stages:
        stage_images(args.work, args.images, args.seed)
    if "vae" in args.stages:
        stage_vae(args.work, args.vae_steps, args.seed)
    if "text" in args.stages:
        stage_text(args.work, args.text_steps, args.seed)
    if "unet" in args.stages:
        stage_unet(args.work, args.unet_steps, args.seed, args.batch)
    if "export" in args.stages:
        stage_export(args.work, args.out)
    log(f"done in {(time.time() - started) / 60:.1f} minutes")
    return 0


cli = command(main)  # the console command (pyproject.toml)

if __name__ == "__main__":
    sys.exit(cli())
