"""APT's overfitting indicator, one value per timestep bin.

Per bin b, exponential moving averages of the batch-mean losses of the tuned model (with LoRA)
and of the reference model (LoRA disabled) over the samples whose timestep fell in the bin:
`ema <- (1 - a) * ema + a * new`, the first observation initialising it. From them, per bin:

- "relative" (the default): `gamma_b = clamp(1 - (E_b[L_theta] / E_b[L_ref]) ** k, 0, 1)`, i.e.
  `1 - exp(-k * log(E_b[L_ref] / E_b[L_theta]))`: the gap read as a ratio of the two losses of the
  same bin. A ratio does not depend on the absolute loss scale of the model, the resolution or
  the noise schedule: a LoRA whose loss on its training images is half the base model's at some
  timesteps has the same gamma on SD1.5, SDXL or the demo model. It rises towards 1 only as the
  tuned loss goes towards 0 (memorisation), never saturating at a finite gap.
- "paper": `gamma_b = clamp(1 - exp(-T * (E_b[L_ref] - E_b[L_theta])), 0, 1)` with T = 1000, as in
  the APT paper. Its constant assumes a loss-gap magnitude: a gap of 0.001 already gives 0.63.

- "views": the relative form's ratio with another comparison loss: the tuned model's loss on a
  shifted view of each training image that is never trained on (same timestep, same noise), instead
  of the base model's loss. A LoRA that learns the concept denoises a new view of it as well as the
  training image (ratio ~1, gamma ~0) however much better than the base model it has become; one
  that memorises the training pixels denoises them better than any other view (gamma rises).

A bin never seen has gamma 0.
"""
from __future__ import annotations

import torch


def bin_ranges(bins: int, num_timesteps: int = 1000) -> list[tuple[int, int]]:
    """(first, last) timestep of each bin as `OverfitIndicator.bin_of` assigns them, also when
    `bins` does not divide the number of timesteps: bin b holds t with t * bins // T == b."""
    return [(-(-b * num_timesteps // bins), -(-(b + 1) * num_timesteps // bins) - 1) for b in range(bins)]


FORMS = ("relative", "paper", "views")
# k of the relative and views forms: chosen on development seeds (docs/results.md says which and how).
RELATIVE_SCALE = 0.5
VIEWS_SCALE = 0.5


def default_scale(form: str, num_timesteps: int = 1000) -> float:
    return {"paper": float(num_timesteps), "views": VIEWS_SCALE}.get(form, RELATIVE_SCALE)


class OverfitIndicator:
    def __init__(self, bins: int = 10, ema_alpha: float = 0.1, num_timesteps: int = 1000, scale: float | None = None,
                 form: str = "relative"):
        if form not in FORMS:
            raise ValueError(f"indicator form {form!r}; valid: {', '.join(FORMS)}")
        self.bins = bins
        self.ema_alpha = ema_alpha
        self.num_timesteps = num_timesteps
        self.form = form
        self.scale = default_scale(form, num_timesteps) if scale is None else float(scale)
        self.ema_ref = torch.zeros(bins, dtype=torch.float64)  # the comparison loss: the views' for "views"
        self.ema_theta = torch.zeros(bins, dtype=torch.float64)
        self.seen = torch.zeros(bins, dtype=torch.bool)

    def bin_of(self, timesteps: torch.Tensor) -> torch.Tensor:
        """b = t // (T / B), computed in integers so bin edges are exact."""
        return torch.clamp((timesteps.long().cpu() * self.bins) // self.num_timesteps, 0, self.bins - 1)

    def update(self, timesteps: torch.Tensor, loss_theta: torch.Tensor, loss_ref: torch.Tensor) -> None:
        bins = self.bin_of(timesteps)
        theta, ref = loss_theta.detach().double().cpu(), loss_ref.detach().double().cpu()
        a = self.ema_alpha
        for b in bins.unique().tolist():
            sel = bins == b
            new_theta, new_ref = theta[sel].mean(), ref[sel].mean()
            if self.seen[b]:
                self.ema_theta[b] = (1 - a) * self.ema_theta[b] + a * new_theta
                self.ema_ref[b] = (1 - a) * self.ema_ref[b] + a * new_ref
            else:
                self.ema_theta[b], self.ema_ref[b] = new_theta, new_ref
                self.seen[b] = True

    def gap(self) -> torch.Tensor:
        """The loss gap per bin the indicator reads: E[L_ref] - E[L_theta] ("paper"), or
        log(E[L_ref] / E[L_theta]) ("relative", and "views" with the views' loss as L_ref); 0 for bins
        never seen."""
        if self.form in ("relative", "views"):
            gap = torch.log(self.ema_ref.clamp_min(1e-12) / self.ema_theta.clamp_min(1e-12))
        else:
            gap = self.ema_ref - self.ema_theta
        return torch.where(self.seen, gap, torch.zeros_like(gap))

    def gamma(self) -> torch.Tensor:
        """gamma per bin (float64, B values)."""
        g = torch.clamp(1 - torch.exp(-self.scale * self.gap()), 0.0, 1.0)
        return torch.where(self.seen, g, torch.zeros_like(g))

    def gamma_at(self, timesteps: torch.Tensor) -> torch.Tensor:
        return self.gamma()[self.bin_of(timesteps)].float()

    def state_dict(self) -> dict:
        return {**self.settings(), "ema_ref": self.ema_ref.tolist(), "ema_theta": self.ema_theta.tolist(),
                "seen": self.seen.tolist()}

    def settings(self) -> dict:
        """What the saved EMAs mean: resuming them under other settings would be silently wrong."""
        return {"form": self.form, "bins": self.bins, "ema_alpha": self.ema_alpha,
                "num_timesteps": self.num_timesteps, "scale": self.scale}

    def load_state_dict(self, state: dict) -> None:
        for key, value in self.settings().items():
            saved = state.get(key, "paper" if key == "form" else None)  # states before "form" used the paper's
            if saved != value:
                raise ValueError(f"the indicator was saved with {key} = {saved}, this run has {value}")
        self.ema_ref = torch.tensor(state["ema_ref"], dtype=torch.float64)
        self.ema_theta = torch.tensor(state["ema_theta"], dtype=torch.float64)
        self.seen = torch.tensor(state["seen"], dtype=torch.bool)
