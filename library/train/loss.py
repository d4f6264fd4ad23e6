"""The training loss, built once from the options and used by every pass that computes one:
the training step, validation and APT's reference pass (its indicator compares like with like).

`per_sample` is the loss of each sample between prediction and target (masked where a loss mask
is given), computed in fp32 whatever the autocast dtype; `weights` are the per-sample factors the
user chose on top: the image weights of the batch (prior_loss_weight for regularisation images)
and Min-SNR. A new loss option goes here, in one place.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _num(value) -> str:
    return "None" if value is None else repr(value)


class Loss:
    def __init__(self, objective, min_snr_gamma: float | None = None):
        self.objective = objective
        self.min_snr_gamma = min_snr_gamma

    @classmethod
    def from_options(cls, training, objective) -> "Loss":
        """From the [training] options (library.config.options.TrainingOptions)."""
        return cls(objective, training.min_snr_gamma)

    def per_sample(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B,) mean squared error per sample in fp32; `mask` (B x 1 x h x w) weights latent positions."""
        err = F.mse_loss(pred.float(), target.float(), reduction="none")
        if mask is not None:
            err = err * mask
            return err.flatten(1).sum(1) / (mask.flatten(1).sum(1) * err.shape[1]).clamp_min(1e-8)
        return err.flatten(1).mean(1)

    def timestep_weights(self, timesteps: torch.Tensor) -> torch.Tensor | None:
        """Min-SNR-gamma weights per sample (None when off)."""
        if self.min_snr_gamma is None:
            return None
        return self.objective.min_snr_weights(timesteps, self.min_snr_gamma)

    def weights(self, image_weights: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The per-sample weights of the loss the user chose: image weights times Min-SNR."""
        snr = self.timestep_weights(timesteps)
        return image_weights if snr is None else image_weights * snr.to(image_weights.device)

    def metadata(self) -> dict[str, str]:
        return {"ss_min_snr_gamma": _num(self.min_snr_gamma)}
