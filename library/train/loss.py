"""The training loss, built once from the options and used by every pass that computes one:
the training step, validation and APT's reference pass (its indicator compares like with like).

`per_sample` is the loss of each sample between prediction and target: the element-wise loss of
`loss_type` (l2, l1, or kohya's pseudo-Huber `huber` / `smooth_l1` with a threshold per timestep
from `huber_schedule`), weighted by the loss mask where one is given and reduced to one value per
sample, in fp32 whatever the autocast dtype. `weights` are the per-sample factors the user chose
on top: the image weights of the batch (prior_loss_weight for regularisation images), Min-SNR,
kohya's v-prediction scalings and debiased estimation, in kohya's order. A new loss option goes
here, in one place.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LOSS_TYPES = ("l2", "l1", "huber", "smooth_l1")
HUBER_SCHEDULES = ("constant", "exponential", "snr")
# kohya caps the SNR at 1000 in its v-prediction scalings and debiased estimation: at t = 0 it is
# near infinite for some schedules.
SNR_CAP = 1000.0


def _num(value) -> str:
    return "None" if value is None else repr(value)


class Loss:
    def __init__(self, objective, min_snr_gamma: float | None = None, loss_type: str = "l2",
                 huber_schedule: str = "snr", huber_c: float = 0.1, huber_scale: float = 1.0,
                 debiased_estimation: bool = False, scale_v_pred_like_noise_pred: bool = False,
                 v_pred_like_loss: float | None = None, unmasked_probability: float = 0.0,
                 unmasked_weight: float = 0.0):
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type {loss_type!r}; valid: {', '.join(LOSS_TYPES)}")
        if huber_schedule not in HUBER_SCHEDULES:
            raise ValueError(f"huber_schedule {huber_schedule!r}; valid: {', '.join(HUBER_SCHEDULES)}")
        self.objective = objective
        self.min_snr_gamma = min_snr_gamma
        self.loss_type = loss_type
        self.huber_schedule = huber_schedule
        self.huber_c = huber_c
        self.huber_scale = huber_scale
        self.debiased_estimation = debiased_estimation
        self.scale_v_pred_like_noise_pred = scale_v_pred_like_noise_pred
        self.v_pred_like_loss = v_pred_like_loss or None
        self.unmasked_probability = unmasked_probability
        self.unmasked_weight = unmasked_weight

    @classmethod
    def from_options(cls, training, objective) -> "Loss":
        """From the [training] options (library.config.options.TrainingOptions)."""
        t = training
        return cls(objective, t.min_snr_gamma, t.loss_type, t.huber_schedule, t.huber_c, t.huber_scale,
                   t.debiased_estimation_loss, t.scale_v_pred_loss_like_noise_pred, t.v_pred_like_loss,
                   t.unmasked_probability, t.unmasked_weight)

    # --- the loss mask ------------------------------------------------------------------------
    def loss_mask(self, mask: torch.Tensor | None, gen: torch.Generator) -> torch.Tensor | None:
        """The mask a step trains with, as OneTrainer has it: with probability unmasked_probability a
        sample trains unmasked (all ones), and no position weighs less than unmasked_weight. The
        draw uses its own generator so that the noise stays the same with and without masks."""
        if mask is None or (not self.unmasked_probability and not self.unmasked_weight):
            return mask
        mask = mask.float()
        if self.unmasked_probability:
            own = torch.Generator().manual_seed(gen.initial_seed() ^ 0x3C6EF372)
            unmasked = torch.rand(mask.shape[0], generator=own) < self.unmasked_probability
            mask = torch.where(unmasked.to(mask.device).view(-1, *[1] * (mask.ndim - 1)), torch.ones_like(mask),
                               mask)
        return mask.clamp_min(self.unmasked_weight) if self.unmasked_weight else mask

    # --- the element-wise loss ----------------------------------------------------------------
    def huber_threshold(self, timesteps: torch.Tensor) -> torch.Tensor:
        """kohya's per-sample threshold c of huber / smooth_l1 (float32, on the CPU)."""
        t = timesteps.cpu()
        if self.huber_schedule == "constant":
            return torch.full((len(t),), self.huber_c * self.huber_scale, dtype=torch.float32)
        if self.huber_schedule == "exponential":
            # from huber_scale at t = 0 down to huber_c * huber_scale at t = T
            alpha = -math.log(self.huber_c) / self.objective.num_timesteps
            return (torch.exp(-alpha * t.double()) * self.huber_scale).float()
        # "snr": sigma = sqrt((1 - a) / a) = 1 / sqrt(SNR); c goes from ~1 (clean) to huber_c (noise)
        sigma = self.objective.snr(t).double().clamp_min(1e-30).rsqrt()
        return ((1 - self.huber_c) / (1 + sigma) ** 2 + self.huber_c).float()

    def elementwise(self, pred: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        pred, target = pred.float(), target.float()
        if self.loss_type == "l2":
            return F.mse_loss(pred, target, reduction="none")
        if self.loss_type == "l1":
            return F.l1_loss(pred, target, reduction="none")
        c = self.huber_threshold(timesteps).to(pred.device).view(-1, *[1] * (pred.ndim - 1))
        smooth = 2 * (torch.sqrt((pred - target) ** 2 + c ** 2) - c)
        return c * smooth if self.loss_type == "huber" else smooth

    def per_sample(self, pred: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor,
                   mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B,) loss per sample in fp32; `mask` (B x 1 x h x w) weights latent positions and the
        result is the mean over the weighted area."""
        err = self.elementwise(pred, target, timesteps)
        if mask is not None:
            err = err * mask
            return err.flatten(1).sum(1) / (mask.flatten(1).sum(1) * err.shape[1]).clamp_min(1e-8)
        return err.flatten(1).mean(1)

    # --- per-sample weights -------------------------------------------------------------------
    def _capped_snr(self, timesteps: torch.Tensor) -> torch.Tensor:
        return self.objective.snr(timesteps).clamp(max=SNR_CAP)

    def timestep_weights(self, timesteps: torch.Tensor) -> torch.Tensor | None:
        """The product of the per-timestep weights that are on (None when none is), in kohya's
        order: Min-SNR, v-prediction scaled like noise prediction, v-prediction-like loss,
        debiased estimation."""
        w = None
        if self.min_snr_gamma is not None:
            w = self.objective.min_snr_weights(timesteps, self.min_snr_gamma)
        if self.scale_v_pred_like_noise_pred or self.v_pred_like_loss or self.debiased_estimation:
            snr = self._capped_snr(timesteps)
            w = torch.ones_like(snr) if w is None else w
            scale = snr / (snr + 1)
            if self.scale_v_pred_like_noise_pred:
                w = w * scale
            if self.v_pred_like_loss:
                w = w * (1 + self.v_pred_like_loss / scale)  # loss + loss / scale * v_pred_like_loss
            if self.debiased_estimation:
                w = w * (1 / (snr + 1) if self.objective.prediction_type != "epsilon" else snr.rsqrt())
        return w

    def weights(self, image_weights: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The per-sample weights of the loss the user chose: image weights times the timestep weights."""
        w = self.timestep_weights(timesteps)
        return image_weights if w is None else image_weights * w.to(image_weights.device)

    def metadata(self) -> dict[str, str]:
        return {"ss_min_snr_gamma": _num(self.min_snr_gamma), "ss_loss_type": self.loss_type,
                "ss_huber_schedule": self.huber_schedule, "ss_huber_c": _num(self.huber_c),
                "ss_huber_scale": _num(self.huber_scale),
                "ss_debiased_estimation": str(self.debiased_estimation),
                "ss_scale_v_pred_loss_like_noise_pred": str(self.scale_v_pred_like_noise_pred),
                "ss_v_pred_like_loss": _num(self.v_pred_like_loss),
                "ss_unmasked_probability": _num(self.unmasked_probability),
                "ss_unmasked_weight": _num(self.unmasked_weight)}
