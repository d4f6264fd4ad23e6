"""Text conditioning as SD1.x/2.x and SDXL expect it.

SD1.x/2.x: the last hidden state of the text encoder (or, with clip_skip = n, the n-th last layer
passed through the final layer norm, as kohya and the WebUIs do). SDXL: the penultimate hidden
states of both encoders concatenated (768 + 1280), TE2's pooled projection, and the time ids
(original size, crop top-left, target size) built by the caller from the real crop.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)


@dataclass
class Conditioning:
    hidden_states: torch.Tensor            # B x 77 x cross_attention_dim
    pooled: torch.Tensor | None = None     # B x proj (SDXL)

    def to(self, device, dtype=None) -> "Conditioning":
        return Conditioning(self.hidden_states.to(device, dtype),
                            None if self.pooled is None else self.pooled.to(device, dtype))


def _final_norm(encoder):
    return getattr(encoder, "text_model", encoder).final_layer_norm


class TextConditioner:
    def __init__(self, arch: str, tokenizers: list, encoders: list, clip_skip: int = 1):
        self.arch = arch
        self.tokenizers = tokenizers
        self.encoders = encoders
        self.clip_skip = clip_skip
        self._warned_long = False
        if arch == "sdxl" and clip_skip != 1:
            log.warning("clip_skip is ignored for SDXL, which always uses the penultimate layers")

    def tokenize(self, captions: list[str]) -> list[torch.Tensor]:
        ids = []
        for tok in self.tokenizers:
            out = tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt", return_length=False)
            ids.append(out.input_ids)
        if not self._warned_long:
            lengths = [len(x) for x in self.tokenizers[0](captions).input_ids]
            if max(lengths, default=0) > self.tokenizers[0].model_max_length:
                self._warned_long = True
                log.warning("a caption is longer than 75 tokens and is truncated (%d tokens)", max(lengths))
        return ids

    def encode_ids(self, ids: list[torch.Tensor]) -> Conditioning:
        device = next(self.encoders[0].parameters()).device
        if self.arch != "sdxl":
            enc = self.encoders[0]
            out = enc(ids[0].to(device), output_hidden_states=True)
            if self.clip_skip == 1:
                return Conditioning(out.last_hidden_state)
            return Conditioning(_final_norm(enc)(out.hidden_states[-self.clip_skip]))
        out1 = self.encoders[0](ids[0].to(device), output_hidden_states=True)
        out2 = self.encoders[1](ids[1].to(device), output_hidden_states=True)
        hidden = torch.cat([out1.hidden_states[-2], out2.hidden_states[-2].to(out1.hidden_states[-2].dtype)], dim=-1)
        return Conditioning(hidden, out2.text_embeds)

    def encode(self, captions: list[str]) -> Conditioning:
        return self.encode_ids(self.tokenize(captions))


def sdxl_time_ids(rows: list[tuple[int, ...]], device, dtype) -> torch.Tensor:
    """B x 6: original (h, w), crop (top, left), target (h, w) per sample."""
    return torch.tensor(rows, device=device, dtype=dtype)
