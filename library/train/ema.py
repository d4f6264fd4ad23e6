"""An exponential moving average (EMA) of the trained LoRA weights.

After every `every`-th optimizer step the average moves towards the weights just trained:
`ema <- d_k * ema + (1 - d_k) * w`, with `d_k = ema_decay`, or with warm-up
`d_k = min(ema_decay, (1 + k) / (10 + k))` where k counts the updates made before (so the first
update keeps 10% of the starting weights, and early weights fade fast). The average starts at
the network's starting weights and is kept in fp32, on the training device or the CPU.

It never takes part in training: the optimizer and the forward passes (APT's reference pass
included, which turns the adapters off) see only the trained weights. Saves and samples swap the
average in for as long as they need it (`applied`) and put the trained weights back bit for bit.
Its state (the tensors and the update count) goes into the training state, so a resumed run
continues the same average.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

from library.errors import UserError


class LoraEma:
    def __init__(self, params: list[torch.nn.Parameter], decay: float, warmup: bool = True, every: int = 1,
                 device: torch.device | str | None = None):
        self.params = list(params)
        self.decay = decay
        self.warmup = warmup
        self.every = every
        self.device = torch.device(device) if device is not None else None
        self.shadow = [p.detach().float().clone().to(self.device or p.device) for p in self.params]
        self.updates = 0

    @classmethod
    def from_options(cls, training, params, device: torch.device) -> "LoraEma | None":
        if not training.ema:
            return None
        return cls(params, training.ema_decay, training.ema_warmup, training.ema_update_every,
                   "cpu" if training.ema_device == "cpu" else device)

    @torch.no_grad()
    def restart(self) -> None:
        """Start the average again from the network's current weights."""
        for avg, p in zip(self.shadow, self.params):
            avg.copy_(p.detach().to(avg.device, torch.float32))
        self.updates = 0

    def decay_at(self, k: int) -> float:
        """The decay of update k (from 0)."""
        return min(self.decay, (1 + k) / (10 + k)) if self.warmup else self.decay

    @torch.no_grad()
    def after_step(self, step: int) -> bool:
        """After optimizer step `step` (from 0): update when it is due; returns whether it was."""
        if (step + 1) % self.every:
            return False
        d = self.decay_at(self.updates)
        for avg, p in zip(self.shadow, self.params):
            avg.mul_(d).add_(p.detach().to(avg.device, torch.float32), alpha=1 - d)
        self.updates += 1
        return True

    @contextmanager
    def applied(self):
        """The network holds the average inside the block, its trained weights again after it."""
        with torch.no_grad():
            saved = [p.detach().clone() for p in self.params]
            for p, avg in zip(self.params, self.shadow):
                p.copy_(avg.to(p.device, p.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for p, keep in zip(self.params, saved):
                    p.copy_(keep)

    def metadata(self) -> dict[str, str]:
        """What a LoRA file says of the EMA; the EMA's own file sets ss_ema_weights = True."""
        return {"ss_ema": "True", "ss_ema_decay": repr(self.decay), "ss_ema_warmup": str(self.warmup),
                "ss_ema_update_every": str(self.every), "ss_ema_weights": "False"}

    # --- state --------------------------------------------------------------------------------
    def settings(self) -> dict:
        return {"decay": self.decay, "warmup": self.warmup, "every": self.every}

    def state(self) -> tuple[dict, dict[str, torch.Tensor]]:
        """(facts for state.json, the tensors)."""
        return ({**self.settings(), "updates": self.updates},
                {f"p{i:05d}": t for i, t in enumerate(self.shadow)})

    def load(self, facts: dict | None, tensors: dict[str, torch.Tensor] | None, source: str) -> None:
        if facts is None or tensors is None:
            raise UserError(f"{source}: the state has no EMA weights (saved with ema = false); resume with "
                            "ema = false, or start a new run")
        for key, value in self.settings().items():
            if facts.get(key) != value:
                raise UserError(f"{source}: the EMA was saved with ema_{'update_every' if key == 'every' else key} "
                                f"= {facts.get(key)}, this run has {value}; use the setting it was saved with, or "
                                "start a new run")
        if len(tensors) != len(self.shadow):
            raise UserError(f"{source}: the EMA holds {len(tensors)} tensors, the network {len(self.shadow)}")
        for i, avg in enumerate(self.shadow):
            saved = tensors[f"p{i:05d}"]
            if saved.shape != avg.shape:
                raise UserError(f"{source}: EMA tensor {i} has shape {tuple(saved.shape)}, the network's "
                                f"{tuple(avg.shape)}")
            avg.copy_(saved.to(avg.device, torch.float32))
        self.updates = int(facts["updates"])
