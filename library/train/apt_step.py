"""One APT training micro-batch: timesteps first, then the augmentation they call for, then noise;
the reference pass (LoRA off, no gradients) and the tuned pass on the same input; the weighted
diffusion loss plus the RS and AA terms. The indicator is updated from both passes' losses."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from library.apt import augment as aug
from library.apt.controller import AptController
from library.errors import UserError
from library.train.batches import Batch
from library.train.diffusion import per_sample_mse

log = logging.getLogger(__name__)


@dataclass
class AptResult:
    loss: torch.Tensor        # what is back-propagated
    timesteps: torch.Tensor
    loss_theta: torch.Tensor  # unweighted per-sample losses of both passes, for the indicator
    loss_ref: torch.Tensor
    stats: dict[str, float]


def black_fill(encoder, size: tuple[int, int] = (64, 64)) -> torch.Tensor:
    """Per-channel latent of a black image: what a zoomed-out image's border encodes to."""
    black = -torch.ones(1, 3, size[1], size[0])
    return encoder(black)[0].float().mean(dim=(1, 2)).cpu()


def make_apt(trainer) -> AptController:
    """APT for a trainer whose network is injected and whose VAE is still on the device."""
    opts, b = trainer.cfg.apt, trainer.bundle
    exclude = []
    if opts.aa_exclude_token:
        exclude = b.tokenizers[0](opts.aa_exclude_token, add_special_tokens=False).input_ids
        if not exclude:
            raise UserError(f"[apt] aa_exclude_token: {opts.aa_exclude_token!r} gives no tokens")
    apt = AptController(opts, b.unet, trainer.network.set_enabled,
                        int(b.scheduler_config.get("num_train_timesteps", 1000)),
                        xformers=trainer.cfg.training.attention == "xformers",
                        eos_id=b.tokenizers[0].eos_token_id, exclude_ids=exclude)
    apt.fill = black_fill(trainer.encoder)
    if trainer.accelerator.is_main_process:
        log.info("APT on: %d RS layers, %d AA layers, augmentation %s", len(apt.layers["rs"]), len(apt.layers["aa"]),
                 f"in {opts.augment_space} space" if opts.augment else "off")
    return apt


def observe(trainer, result: "AptResult", batch: Batch) -> None:
    """Update the APT indicator with this micro-batch's losses from every process."""
    keep = torch.tensor([trainer.cfg.apt.indicator_includes_reg or not trainer.data.records[r].subset.is_reg
                         for r in batch.records], dtype=torch.float32)
    rows = torch.stack([result.timesteps.float(), result.loss_theta.float().cpu(), result.loss_ref.float().cpu(),
                        keep]).T.to(trainer.device)
    acc = trainer.accelerator
    if acc.num_processes > 1:
        rows = acc.gather(acc.pad_across_processes(rows, dim=0, pad_index=0))
    rows = rows[rows[:, 3] > 0].cpu()  # padding rows and excluded samples have keep = 0
    if len(rows):
        trainer.apt.observe(rows[:, 0].long(), rows[:, 1], rows[:, 2])


def apt_forward(trainer, apt: AptController, batch: Batch, gen: torch.Generator) -> AptResult:
    opts = apt.opts
    device = trainer.device
    diffusion = trainer.diffusion
    latents = batch.latents.to(device)
    timesteps = diffusion.sample_timesteps(latents.shape[0], gen)
    gamma, plan = apt.draw(timesteps, gen)
    mask = batch.mask.to(device) if batch.mask is not None else None
    if plan is not None and bool(plan.apply.any()):
        if opts.augment_space == "pixel" and batch.pixels is not None:
            pixels = aug.apply(batch.pixels, plan, -1.0 if opts.augment_fill == "black" else 0.0)
            sel = plan.apply.nonzero().flatten()
            latents = latents.clone()
            latents[sel.to(device)] = trainer.encoder(pixels[sel]).to(device, latents.dtype)
        else:
            latents = aug.apply(latents, plan, apt.fill if opts.augment_fill == "black" else 0.0)
        if mask is not None:
            mask = aug.apply(mask, plan, 0.0)  # the uncovered border is not part of the subject
    noise = diffusion.sample_noise(latents, gen)
    noisy = diffusion.add_noise(latents, diffusion.input_noise(noise, gen), timesteps)
    cond, kwargs = trainer.conditioning(batch)
    t_dev = timesteps.to(device)
    ref_pred = apt.reference(lambda: trainer.base_unet(noisy, t_dev, cond.hidden_states.detach(), **kwargs).sample)
    pred = apt.tuned(lambda: trainer.unet(noisy, t_dev, cond.hidden_states, **kwargs).sample)
    target = diffusion.target(latents, noise, timesteps)
    loss_theta = per_sample_mse(pred, target, mask)
    loss_ref = per_sample_mse(ref_pred, target, mask)
    weights = apt.loss_weights(gamma).to(device)
    per_sample = trainer.weigh(loss_theta * weights, batch, timesteps)
    input_ids = trainer.conditioner.tokenize(batch.captions)[0] if apt.layers["aa"] else None
    terms = apt.regularisers(input_ids)
    loss = per_sample.mean() + terms.total(opts.lambda_dist, opts.lambda_attn).to(device)
    stats = {"apt/loss_theta": loss_theta.detach().mean().item(), "apt/loss_ref": loss_ref.mean().item(),
             "apt/l_mu": terms.l_mu.detach().item(), "apt/l_sigma": terms.l_sigma.detach().item(),
             "apt/l_attn": terms.l_attn.detach().item(),
             "apt/augment_rate": plan.rate if plan is not None else 0.0, "apt/loss_weight": float(weights.mean())}
    return AptResult(loss, timesteps, loss_theta.detach(), loss_ref.detach(), stats)
