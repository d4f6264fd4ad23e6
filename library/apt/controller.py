"""APT for one training run: the indicator, augmentation draws, loss weights, the recording
processors and the RS/AA terms from what they recorded.

The model calls (the reference pass with the adapters off, the trained pass) and installing the
processors belong to the training method (library.train.apt_method), so this package needs
neither the model, the data pipeline nor the loop.
"""
from __future__ import annotations

from dataclasses import dataclass, field
import torch

from library.apt import augment as aug
from library.apt.attention import Recorder, recording_processors
from library.apt.indicator import OverfitIndicator
from library.apt.losses import attention_loss, representation_loss, token_mask


@dataclass
class AptTerms:
    l_mu: torch.Tensor
    l_sigma: torch.Tensor
    l_attn: torch.Tensor

    def total(self, lambda_dist: float, lambda_attn: float) -> torch.Tensor:
        return lambda_dist * (self.l_mu + self.l_sigma) + lambda_attn * self.l_attn


@dataclass
class AptHistory:
    steps: list[int] = field(default_factory=list)
    gammas: list[list[float]] = field(default_factory=list)

    def add(self, step: int, gamma: torch.Tensor) -> None:
        self.steps.append(step)
        self.gammas.append([round(float(g), 6) for g in gamma])


class AptController:
    """`layers` are the model's attention layers (library.models.family.AttentionLayer); the
    recording processors for the chosen ones are in `processors`, for the training method to
    install."""

    def __init__(self, opts, layers: list, num_timesteps: int, xformers: bool = False, eos_id: int = 49407,
                 exclude_ids: list[int] | None = None):
        self.opts = opts
        self.indicator = OverfitIndicator(opts.bins, opts.ema_alpha, num_timesteps, opts.indicator_scale,
                                          opts.indicator)
        self.recorder = Recorder()
        self.history = AptHistory()
        self.eos_id = eos_id
        self.exclude_ids = exclude_ids or []
        rs_features = opts.rs_features if opts.rs and opts.lambda_dist > 0 else None
        aa_maps = ("logits" if opts.aa_distance == "logits" else "probs") if opts.aa and opts.lambda_attn > 0 else None
        self.processors, self.layers = recording_processors(layers, self.recorder, opts.rs_layers, opts.aa_layers,
                                                            rs_features, aa_maps, xformers)
        self.fill: torch.Tensor | float = 0.0

    # --- per step -----------------------------------------------------------------------------
    def draw(self, gamma: torch.Tensor, gen: torch.Generator) -> aug.AugmentDraw | None:
        """The augmentation of each sample, given gamma at its timestep (None when augmentation is off)."""
        if not self.opts.augment:
            return None
        o = self.opts
        return aug.draw(gamma, o.p_max, o.zoom_max, o.rotation_max, gen, o.translate_max)

    def loss_weights(self, gamma: torch.Tensor) -> torch.Tensor:
        if not self.opts.loss_weighting:
            return torch.ones_like(gamma)
        return torch.clamp(1 - gamma, min=self.opts.min_weight)

    def stop_recording(self) -> None:
        """Recording of the trained pass stays on until after the backward pass: gradient
        checkpointing runs the forward again during backward, and the rerun must compute exactly
        what the first run did (library.apt.attention keeps the first run's tensors)."""
        self.recorder.active = None

    def regularisers(self, input_ids: torch.Tensor | None) -> AptTerms:
        o = self.opts
        l_mu, l_sigma = representation_loss(self.recorder) if self.layers["rs"] else (torch.zeros(()),) * 2
        if self.layers["aa"]:
            mask = None
            if input_ids is not None:
                mask = token_mask(input_ids, self.eos_id, o.aa_exclude_padding, self.exclude_ids)
            l_attn = attention_loss(self.recorder, mask, o.aa_distance)
        else:
            l_attn = torch.zeros(())
        return AptTerms(l_mu, l_sigma, l_attn)

    def observe(self, timesteps: torch.Tensor, loss_theta: torch.Tensor, loss_ref: torch.Tensor) -> None:
        self.indicator.update(timesteps, loss_theta, loss_ref)

    def end_step(self, steps_done: int) -> None:
        """After an optimizer step: recordings dropped, the indicator noted at `steps_done` steps."""
        self.stop_recording()
        self.recorder.clear()
        self.history.add(steps_done, self.indicator.gamma())

    # --- state --------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"indicator": self.indicator.state_dict(), "history_steps": self.history.steps,
                "history_gammas": self.history.gammas}

    def load_state_dict(self, state: dict) -> None:
        """Raises ValueError naming the indicator setting that differs from the saved state."""
        self.indicator.load_state_dict(state["indicator"])
        self.history = AptHistory(list(state.get("history_steps", [])), list(state.get("history_gammas", [])))
