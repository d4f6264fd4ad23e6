"""Text conditioning as the Stable Diffusion families expect it, from captions.

SD1.x/2.x: the last hidden state of the text encoder (or, with clip_skip = n, the n-th last layer
passed through the final layer norm, as kohya and the WebUIs do). SDXL: the penultimate hidden
states of both encoders concatenated (768 + 1280) and TE2's pooled projection; its size/crop
micro-conditioning is not text and is added by the family when the denoiser is called.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)


@dataclass
class Conditioning:
    """What the denoiser is conditioned on for a batch of captions."""
    hidden_states: torch.Tensor            # B x tokens x cross_attention_dim
    pooled: torch.Tensor | None = None     # B x proj (SDXL)

    def to(self, device, dtype=None) -> "Conditioning":
        return Conditioning(self.hidden_states.to(device, dtype),
                            None if self.pooled is None else self.pooled.to(device, dtype))


def _final_norm(encoder):
    return getattr(encoder, "text_model", encoder).final_layer_norm


class CaptionEncoder:
    """Captions -> Conditioning through a family's tokenizers and text encoders."""

    def __init__(self, tokenizers: list, encoders: list, clip_skip: int = 1):
        self.tokenizers = tokenizers
        self.encoders = encoders
        self.clip_skip = clip_skip

    def tokenize(self, captions: list[str]) -> list[torch.Tensor]:
        ids = []
        for tok in self.tokenizers:
            out = tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt", return_length=False)
            ids.append(out.input_ids)
        return ids

    def encode_ids(self, ids: list[torch.Tensor]) -> Conditioning:
        raise NotImplementedError

    def encode(self, captions: list[str]) -> Conditioning:
        return self.encode_ids(self.tokenize(captions))

    @property
    def device(self) -> torch.device:
        return next(self.encoders[0].parameters()).device


class ClipCaptionEncoder(CaptionEncoder):
    """SD1.x / SD2.x: one CLIP text encoder, clip_skip counted from its last layer."""

    def encode_ids(self, ids: list[torch.Tensor]) -> Conditioning:
        enc = self.encoders[0]
        out = enc(ids[0].to(self.device), output_hidden_states=True)
        if self.clip_skip == 1:
            return Conditioning(out.last_hidden_state)
        return Conditioning(_final_norm(enc)(out.hidden_states[-self.clip_skip]))


class SdxlCaptionEncoder(CaptionEncoder):
    """SDXL: both encoders' penultimate hidden states, concatenated, and TE2's pooled projection."""

    def __init__(self, tokenizers: list, encoders: list, clip_skip: int = 1):
        super().__init__(tokenizers, encoders, clip_skip)
        if clip_skip != 1:
            log.warning("clip_skip is ignored for SDXL, which always uses the penultimate layers")

    def encode_ids(self, ids: list[torch.Tensor]) -> Conditioning:
        out1 = self.encoders[0](ids[0].to(self.device), output_hidden_states=True)
        out2 = self.encoders[1](ids[1].to(self.device), output_hidden_states=True)
        hidden = torch.cat([out1.hidden_states[-2], out2.hidden_states[-2].to(out1.hidden_states[-2].dtype)], dim=-1)
        return Conditioning(hidden, out2.text_embeds)
