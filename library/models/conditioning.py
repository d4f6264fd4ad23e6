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
    """Captions -> Conditioning through a family's tokenizers and text encoders.

    With `max_token_length` (kohya's 150 or 225) a caption is tokenized to that many tokens plus BOS
    and EOS; the text encoders, which read 77 positions, see it as 75-token chunks each wrapped in
    BOS and EOS (`chunk_ids`), and the hidden states are put back in the caption's token order: the
    first chunk's BOS, every chunk's 75 token states, the last chunk's final position (kohya's layout,
    2 + max_token_length positions). `tokenize` returns the ids in that same order, so a token mask
    (APT's attention alignment) lines up with the hidden states.
    """

    def __init__(self, tokenizers: list, encoders: list, clip_skip: int = 1, max_token_length: int | None = None):
        self.tokenizers = tokenizers
        self.encoders = encoders
        self.clip_skip = clip_skip
        self.max_token_length = max_token_length

    def length(self, tok) -> int:
        """Token positions per caption, BOS and EOS included."""
        return tok.model_max_length if not self.max_token_length else self.max_token_length + 2

    def tokenize(self, captions: list[str]) -> list[torch.Tensor]:
        ids = []
        for tok in self.tokenizers:
            out = tok(captions, padding="max_length", max_length=self.length(tok), truncation=True,
                      return_tensors="pt", return_length=False)
            ids.append(out.input_ids)
        return ids

    def run(self, index: int, ids: torch.Tensor, **kwargs):
        """Encoder `index` on caption ids of any supported length: (its output on every chunk, chunks per
        caption). The output's tensors have B * chunks rows."""
        tok = self.tokenizers[index]
        window = tok.model_max_length
        if ids.shape[1] == window:
            return self.encoders[index](ids.to(self.device), **kwargs), 1
        chunks = chunk_ids(ids, window, tok.eos_token_id, tok.pad_token_id)
        return self.encoders[index](chunks.reshape(-1, window).to(self.device), **kwargs), chunks.shape[1]

    def encode_ids(self, ids: list[torch.Tensor]) -> Conditioning:
        raise NotImplementedError

    def encode(self, captions: list[str]) -> Conditioning:
        return self.encode_ids(self.tokenize(captions))

    @property
    def device(self) -> torch.device:
        return next(self.encoders[0].parameters()).device


def chunk_ids(ids: torch.Tensor, window: int, eos: int, pad: int) -> torch.Tensor:
    """(B, 2 + n * (window - 2)) caption ids -> (B, n, window): each run of window - 2 tokens wrapped in
    the caption's BOS and its last id. With a pad token other than EOS (SD2.x, SDXL's second encoder)
    a chunk cut inside the text ends in EOS, and a chunk past the text starts with EOS after its BOS,
    so every chunk reads as a caption of its own."""
    inner = window - 2
    body = ids[:, 1:-1]
    n = body.shape[1] // inner
    out = torch.empty(ids.shape[0], n, window, dtype=ids.dtype)
    out[:, :, 0] = ids[:, :1]
    out[:, :, 1:-1] = body.reshape(ids.shape[0], n, inner)
    out[:, :, -1] = ids[:, -1:]
    if pad != eos:
        cut = (out[:, :, -2] != eos) & (out[:, :, -2] != pad)
        out[:, :, -1] = torch.where(cut, torch.full_like(out[:, :, -1], eos), out[:, :, -1])
        empty = out[:, :, 1] == pad
        out[:, :, 1] = torch.where(empty, torch.full_like(out[:, :, 1], eos), out[:, :, 1])
    return out


def join_chunks(states: torch.Tensor, batch: int, chunks: int) -> torch.Tensor:
    """(B * n, window, D) hidden states of the chunks -> (B, 2 + n * (window - 2), D) in caption order."""
    if chunks == 1:
        return states
    window = states.shape[1]
    per = states.reshape(batch, chunks, window, states.shape[-1])
    inner = per[:, :, 1:-1].reshape(batch, chunks * (window - 2), states.shape[-1])
    return torch.cat([per[:, 0, :1], inner, per[:, -1, -1:]], dim=1)


class ClipCaptionEncoder(CaptionEncoder):
    """SD1.x / SD2.x: one CLIP text encoder, clip_skip counted from its last layer."""

    def encode_ids(self, ids: list[torch.Tensor]) -> Conditioning:
        enc = self.encoders[0]
        out, chunks = self.run(0, ids[0], output_hidden_states=True)
        if self.clip_skip == 1:
            states = out.last_hidden_state
        else:
            states = _final_norm(enc)(out.hidden_states[-self.clip_skip])
        return Conditioning(join_chunks(states, ids[0].shape[0], chunks))


class SdxlCaptionEncoder(CaptionEncoder):
    """SDXL: both encoders' penultimate hidden states, concatenated, and TE2's pooled projection."""

    def __init__(self, tokenizers: list, encoders: list, clip_skip: int = 1, max_token_length: int | None = None):
        super().__init__(tokenizers, encoders, clip_skip, max_token_length)
        if clip_skip != 1:
            log.warning("clip_skip is ignored for SDXL, which always uses the penultimate layers")

    def encode_ids(self, ids: list[torch.Tensor]) -> Conditioning:
        batch = ids[0].shape[0]
        out1, chunks = self.run(0, ids[0], output_hidden_states=True)
        out2, _ = self.run(1, ids[1], output_hidden_states=True)
        h1 = join_chunks(out1.hidden_states[-2], batch, chunks)
        h2 = join_chunks(out2.hidden_states[-2], batch, chunks)
        pooled = out2.text_embeds.reshape(batch, chunks, -1)[:, 0]  # the first chunk's, as kohya
        return Conditioning(torch.cat([h1, h2.to(h1.dtype)], dim=-1), pooled)
