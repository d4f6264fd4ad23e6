"""Text-encoder outputs computed once per distinct caption (cache_text_encoder_outputs).

Only valid when the text encoders are frozen and every caption is the same at every step; the
config refuses the option otherwise (library.config.loader). After filling, the text encoders are
no longer needed on the device.
"""
from __future__ import annotations

from typing import Callable

import torch

from library.data.captions import fixed_caption
from library.data.dataset import TrainingData
from library.models.conditioning import Conditioning

class TextCache:
    def __init__(self, data: TrainingData, encode: Callable[[list[str]], Conditioning], batch_size: int = 8):
        self.data = data
        self.encode = encode
        self.batch_size = batch_size
        self.entries: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def captions(self) -> list[str]:
        seen = dict.fromkeys(fixed_caption(r.caption, r.subset) for r in self.data.records)
        return list(seen)

    @torch.no_grad()
    def fill(self) -> None:
        todo = [c for c in self.captions() if c not in self.entries]
        for k in range(0, len(todo), self.batch_size):
            chunk = todo[k:k + self.batch_size]
            cond = self.encode(chunk)
            for i, caption in enumerate(chunk):
                pooled = None if cond.pooled is None else cond.pooled[i].cpu()
                self.entries[caption] = (cond.hidden_states[i].cpu(), pooled)

    def get(self, captions: list[str]) -> Conditioning:
        rows = [self.entries[c] for c in captions]
        pooled = None if rows[0][1] is None else torch.stack([r[1] for r in rows])
        return Conditioning(torch.stack([r[0] for r in rows]), pooled)
