"""APT as a training method: the hooks it adds to the shared training step.

Per micro-batch, once the timesteps are drawn: gamma of each sample's bin and the augmentation it
calls for (training images only); then, before the trained pass, the reference pass (the step
context's base-model prediction: every adapter off, no gradients, the same noisy input, the base
text encoders' conditioning) while the recorder records; the trained pass records what RS and AA
compare; the loss weights (1 - gamma) apply to training images only, regularisation images keep
prior_loss_weight exactly as without APT. After the step the indicator is updated from both
passes' losses, gathered from every process, skipping non-finite values.

`attach` installs the recording attention processors on the chosen layers (the others keep
theirs); `detach` puts the previous processors back.
"""
from __future__ import annotations

import json
import logging
import math
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch

from library.apt import augment as aug
from library.apt.controller import AptController
from library.apt.indicator import bin_ranges
from library.errors import UserError
from library.train.batches import Batch
from library.train.method import MethodSetup, MethodStep, TrainingMethod, register_method
from library.train.step import StepContext, StepLoss

log = logging.getLogger(__name__)


def black_fill(encode: Callable[[torch.Tensor], torch.Tensor], size: tuple[int, int] = (64, 64)) -> torch.Tensor:
    """Per-channel latent of a black image: what a zoomed-out image's border encodes to."""
    black = -torch.ones(1, 3, size[1], size[0])
    return encode(black)[0].float().mean(dim=(1, 2)).cpu()


class AptStep(MethodStep):
    def __init__(self, method: "AptMethod", batch: Batch, reference: bool):
        self.method = method
        self.batch = batch
        self.reference = reference  # reference pass, RS/AA and indicator update at this step
        self.gamma = torch.zeros(len(batch.records))
        self.weights = torch.ones(len(batch.records))  # (1 - gamma), floored; 1 for regularisation images
        self.draw: aug.AugmentDraw | None = None
        self.loss_ref: torch.Tensor | None = None
        self.loss_view: torch.Tensor | None = None  # the "views" indicator's held-out views
        self.clean: tuple[torch.Tensor, torch.Tensor | None] | None = None  # latents and mask before augmentation
        # reference steps: the per-sample losses the indicator compares, read to the host once (extra_loss)
        self.loss_theta_host: torch.Tensor | None = None
        self.loss_other_host: torch.Tensor | None = None  # the base model's, or the views' for "views"
        self._stats: dict[str, float] = {}

    @property
    def augmented(self) -> torch.Tensor:
        return self.draw.apply if self.draw is not None else torch.zeros(len(self.gamma), dtype=torch.bool)

    def augment(self, latents, mask, timesteps, gen):
        apt = self.method.controller
        # Regularisation images are the prior: never augmented, never down-weighted.
        self.gamma = torch.where(self.batch.is_reg, 0.0, apt.indicator.gamma_at(timesteps))
        self.weights = apt.loss_weights(self.gamma)
        self.draw = apt.draw(self.gamma, gen)
        self.clean = (latents, mask)
        if self.reference and apt.indicator.form == "views":
            self.views_gen = torch.Generator().manual_seed(gen.initial_seed() ^ 0x9E3779B9)
        if self.draw is None or not bool(self.draw.apply.any()):
            return latents, mask
        fill = apt.opts.augment_fill
        if apt.opts.augment_space == "pixel" and self.batch.pixels is not None:
            pixels = aug.apply(self.batch.pixels, self.draw, {"black": -1.0, "zeros": 0.0}.get(fill, fill))
            chosen = self.draw.apply.nonzero().flatten().to(latents.device)
            latents = latents.clone()
            latents[chosen] = self.method.encode(pixels[chosen.cpu()]).to(latents.device, latents.dtype)
        else:
            latents = aug.apply(latents, self.draw, {"black": self.method.fill, "zeros": 0.0}.get(fill, fill))
        if mask is not None:
            mask = aug.apply(mask, self.draw, 0.0)  # the uncovered border is not part of the subject
        return latents, mask

    def before_prediction(self, ctx: StepContext) -> None:
        if not self.reference:
            return
        apt = self.method.controller
        if apt.indicator.form == "views":
            self.loss_view = self.view_losses(ctx)
        if apt.indicator.form != "views" or apt.layers["rs"] or apt.layers["aa"]:
            apt.recorder.clear()
            with apt.recorder.recording("ref"):
                pred = ctx.reference()
            self.loss_ref = ctx.per_sample_loss(pred)

    def view_losses(self, ctx: StepContext) -> torch.Tensor:
        """The trained model's loss on a fresh shifted view of each clean training image (the image
        mirrored at its edges, whole pixels, never trained on) at the same timestep and noise."""
        apt = self.method.controller
        latents, mask = self.clean
        if apt.opts.augment_space == "pixel" and self.batch.pixels is not None:
            pixels = self.batch.pixels
            shifts = aug.draw_view_shifts(len(pixels), max(1, round(apt.opts.view_shift * pixels.shape[-1])),
                                          self.views_gen)
            views = self.method.encode(aug.shift_views(pixels, shifts)).to(latents.device, latents.dtype)
            scale = latents.shape[-1] / pixels.shape[-1]
            mask_shifts = (shifts.float() * scale).round().long()
        else:
            shifts = aug.draw_view_shifts(len(latents), max(1, round(apt.opts.view_shift * latents.shape[-1])),
                                          self.views_gen)
            views, mask_shifts = aug.shift_views(latents, shifts), shifts
        view_mask = None if mask is None else aug.shift_views(mask, mask_shifts)
        return ctx.loss_on(views, view_mask)

    @contextmanager
    def prediction(self):
        # Left on after the forward: see AptController.stop_recording.
        if self.reference:
            self.method.controller.recorder.active = "tuned"
        yield

    def sample_weights(self) -> torch.Tensor:
        return self.weights

    def extra_loss(self, ctx: StepContext, per_sample: torch.Tensor) -> torch.Tensor | None:
        apt = self.method.controller
        self._stats = {"apt/augment_rate": self.draw.rate if self.draw is not None else 0.0,
                       "apt/loss_weight": float(self.weights.mean())}  # both on the host
        if not self.reference:
            self._stats["apt/loss_theta"] = per_sample.detach().mean().item()
            return None
        input_ids = ctx.tokenize(self.batch.captions)[0] if apt.layers["aa"] else None
        terms = apt.regularisers(input_ids)
        total = terms.total(apt.opts.lambda_dist, apt.opts.lambda_attn)
        if apt.opts.regularisers_scale == "gamma":  # the regularisers grow with the indicator (gamma is on the host)
            train = ~self.batch.is_reg
            total = total * (float(self.gamma[train].mean()) if bool(train.any()) else 0.0)
        # One read of the device for everything the host needs from a reference step: the
        # regularisers' finiteness, the statistics, and the per-sample losses the indicator compares
        # (at the end of the step).
        device = per_sample.device
        theta = per_sample.detach().float()
        other = (self.loss_view if apt.indicator.form == "views" else self.loss_ref).detach().float().flatten()
        named = {"apt/loss_theta": theta.mean()}
        if self.loss_ref is not None:
            named["apt/loss_ref"] = self.loss_ref.detach().float().mean()
        if self.loss_view is not None:
            named["apt/loss_view"] = self.loss_view.detach().float().mean()
        named.update({"apt/l_mu": terms.l_mu.detach(), "apt/l_sigma": terms.l_sigma.detach(),
                      "apt/l_attn": terms.l_attn.detach(), "total": total.detach()})
        values = torch.cat([torch.stack([v.float().to(device) for v in named.values()]), theta,
                            other.to(device)]).tolist()
        k, n = len(named), len(theta)
        host = dict(zip(named, values[:k]))
        self.loss_theta_host = torch.tensor(values[k:k + n])
        self.loss_other_host = torch.tensor(values[k + n:])
        finite = math.isfinite(host.pop("total"))
        if not finite:
            # A non-finite reference (its recordings are the targets) must not poison the step.
            self.method.count_skipped("regularisers")
            total = torch.zeros((), device=per_sample.device)
        self._stats.update({
            **{key: host[key] for key in ("apt/loss_theta", "apt/loss_ref", "apt/loss_view") if key in host},
            "apt/l_mu": host["apt/l_mu"] if finite else 0.0,
            "apt/l_sigma": host["apt/l_sigma"] if finite else 0.0,
            "apt/l_attn": host["apt/l_attn"] if finite else 0.0,
        })
        return total

    def stats(self) -> dict[str, float]:
        return self._stats


@register_method
class AptMethod(TrainingMethod):
    name = "apt"
    inactive_metadata = {"apt_enabled": "False"}

    def __init__(self, controller: AptController, family, model, encode: Callable[[torch.Tensor], torch.Tensor],
                 fill: torch.Tensor, includes_reg: bool, gather: Callable[[torch.Tensor], torch.Tensor],
                 settings: dict):
        self.controller = controller
        self.family = family
        self.model = model
        self.encode = encode
        self.fill = fill
        self.includes_reg = includes_reg
        self.gather = gather
        self.settings = settings
        self.skipped = {"indicator": 0, "regularisers": 0}
        self._steps: list[AptStep] = []  # the micro-batches of the step in progress
        self.last_stats: dict[str, float] = {}  # mean APT statistics of the last finished step
        self._step = -1
        self._saved_processors: dict | None = None

    @classmethod
    def selected(cls, cfg) -> bool:
        return cfg.training.apt

    @classmethod
    def build(cls, setup: MethodSetup) -> "AptMethod":
        """For a model whose network is injected and whose attention kernel is chosen; the VAE must be
        on the device (the black border's latent is encoded here)."""
        opts, tokenizer = setup.cfg.apt, setup.tokenizers[0]
        exclude = []
        if opts.aa_exclude_token:
            exclude = tokenizer(opts.aa_exclude_token, add_special_tokens=False).input_ids
            if not exclude:
                raise UserError(f"[apt] aa_exclude_token: {opts.aa_exclude_token!r} gives no tokens")
        controller = AptController(opts, setup.family.attention_layers(setup.model), setup.num_timesteps,
                                   xformers=setup.cfg.training.attention == "xformers",
                                   eos_id=tokenizer.eos_token_id, exclude_ids=exclude)
        log.info("APT on: %d RS layers, %d AA layers, augmentation %s", len(controller.layers["rs"]),
                 len(controller.layers["aa"]), f"in {opts.augment_space} space" if opts.augment else "off")
        return cls(controller, setup.family, setup.model, setup.encoder, black_fill(setup.encoder),
                   opts.indicator_includes_reg, setup.gather, asdict(opts))

    def attach(self) -> None:
        if self._saved_processors is not None:
            return
        self._saved_processors = self.family.attention_processors(self.model)
        self.family.set_attention_processors(self.model, {**self._saved_processors, **self.controller.processors})

    def detach(self) -> None:
        if self._saved_processors is None:
            return
        self.family.set_attention_processors(self.model, self._saved_processors)
        self._saved_processors = None

    def count_skipped(self, what: str) -> None:
        self.skipped[what] += 1
        log.warning("APT: non-finite reference values; %s update skipped (%d so far in this run)", what,
                    self.skipped[what])

    def step(self, batch: Batch, step: int) -> AptStep:
        if step != self._step:  # a new step (a skipped one leaves its micro-batches behind)
            self._steps, self._step = [], step
        micro = AptStep(self, batch, reference=step % self.controller.opts.reference_every == 0)
        self._steps.append(micro)
        return micro

    def after_backward(self) -> None:
        self.controller.stop_recording()

    def end_step(self, step: int, losses: list[tuple[StepLoss, Batch]]) -> None:
        results = [r for r, _ in losses]
        self.last_stats = {k: sum(r.stats[k] for r in results) / len(results) for k in results[0].stats}
        rows = []
        views = self.controller.indicator.form == "views"
        for micro, (result, batch) in zip(self._steps, losses):
            if not micro.reference:
                continue
            keep = ~batch.is_reg if not self.includes_reg else torch.ones_like(batch.is_reg)
            if views:  # an augmented sample's training loss is on a transformed image, not the one it could memorise
                keep = keep & ~micro.augmented
            rows.append(torch.stack([result.timesteps.float(), micro.loss_theta_host, micro.loss_other_host,
                                     keep.float()]).T)
        self._steps = []
        if rows:  # between reference passes the indicator stays as it was
            gathered = self.gather(torch.cat(rows))
            gathered = gathered[gathered[:, 3] > 0]  # padding rows and excluded samples have keep = 0
            finite = torch.isfinite(gathered[:, 1:3]).all(1)
            if not bool(finite.all()):
                self.count_skipped("indicator")
            gathered = gathered[finite]
            if len(gathered):
                self.controller.observe(gathered[:, 0].long(), gathered[:, 1], gathered[:, 2])
        self.controller.end_step(step + 1)

    def metrics(self) -> dict[str, float]:
        out = dict(self.last_stats)
        ind = self.controller.indicator
        out.update({f"apt/gamma_t{lo:03d}": float(g)
                    for (lo, _), g in zip(bin_ranges(ind.bins, ind.num_timesteps), ind.gamma())})
        out.update({f"apt/skipped_{k}_updates": float(v) for k, v in self.skipped.items()})
        return out

    def state_dict(self) -> dict:
        return {"apt": self.controller.state_dict()}

    def load_state_dict(self, extra: dict, source: str) -> None:
        if "apt" not in extra:
            log.warning("%s: the state has no APT indicator (saved without apt); it starts from zero", source)
            return
        try:
            self.controller.load_state_dict(extra["apt"])
        except ValueError as exc:
            raise UserError(f"{source}: cannot continue APT: {exc}; use the [apt] settings the state was "
                            "saved with, or start a new run") from None

    def metadata(self) -> dict[str, str]:
        ind = self.controller.indicator
        return {"apt_enabled": "True", "apt_settings": json.dumps(self.settings),
                "apt_indicator": json.dumps([round(float(g), 6) for g in ind.gamma()]),
                "apt_indicator_bins": json.dumps([list(r) for r in bin_ranges(ind.bins, ind.num_timesteps)])}

    def write_reports(self, folder: Path, title: str) -> None:
        h, n = self.controller.history, self.controller.indicator.num_timesteps
        if not h.steps:
            return
        from library.apt.plot import write_csv, write_png

        write_csv(folder / "apt_indicator.csv", h.steps, h.gammas, n)
        write_png(folder / "apt_indicator.png", h.steps, h.gammas, n, title=f"APT overfitting indicator: {title}")
