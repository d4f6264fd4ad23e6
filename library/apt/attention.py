"""A recording attention processor: the stock SDPA/xformers output, plus what APT needs.

SDPA and xformers never materialise attention probabilities, so for the cross-attention layers
chosen for alignment the processor also computes `softmax(Q K^T * scale)` over the text tokens
from the same Q and K (cheap: 77 keys) and stores it averaged over heads; for the self-attention
layers chosen for representation stabilisation it stores the per-channel mean and standard
deviation of the layer's output (or of Q, K and V). Every other layer keeps the stock processor.

Values are stored by layer and pass, once between two `clear()`s. With gradient checkpointing
the forward runs again during backward: the rerun must compute the same maps and statistics
(checkpointing checks that it saves the same tensors as the first run, and fills the first run's
graph with them), but keeps the first run's tensors. The losses were built from those; a rerun's
tensors would never be used, and their graphs would keep the block's recomputed activations
alive until the step ends. Outside APT steps recording is off and the processor only computes
the output.
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F

from library.config.options import LAYER_ALIASES
from library.errors import UserError


class Recorder:
    def __init__(self):
        self.active: str | None = None  # the pass being recorded ("ref" / "tuned"), or None
        self.features: dict[tuple[str, str], list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.maps: dict[tuple[str, str], torch.Tensor] = {}

    @contextmanager
    def recording(self, name: str):
        previous, self.active = self.active, name
        try:
            yield
        finally:
            self.active = previous

    def clear(self) -> None:
        self.features.clear()
        self.maps.clear()

    def keep(self, store: dict, layer: str, value) -> None:
        """Record `value` for `layer` in the active pass, unless that pass already recorded it
        since the last clear (a checkpointed block run again during backward)."""
        store.setdefault((layer, self.active), value)

    def layers(self, kind: str) -> list[str]:
        store = self.features if kind == "features" else self.maps
        return sorted({layer for layer, _ in store})


def _no_autocast(device_type: str):
    """Autocast off; the meta device (library.train.memory_estimate counts on it) has none."""
    return nullcontext() if device_type == "meta" else torch.autocast(device_type, enabled=False)


def attention_maps(query: torch.Tensor, key: torch.Tensor, scale: float, attention_mask: torch.Tensor | None,
                   probabilities: bool) -> torch.Tensor:
    """Head-averaged attention maps (B, N, tokens) in fp32. Autocast is switched off: inside it a
    matmul of fp32 tensors still runs in bf16/fp16, and these maps are loss targets. For backward
    only `query` and `key` are kept, as they are (the attention kernel keeps the same tensors):
    their fp32 copies and the per-head probabilities are recomputed there."""
    return _HeadMeanMaps.apply(query, key, attention_mask, scale, probabilities)


def _maps(query, key, attention_mask, scale, probabilities) -> torch.Tensor:
    """Per-head maps (B, heads, N, tokens) in fp32."""
    logits = (query.float() @ key.float().transpose(-1, -2)) * scale
    if attention_mask is not None:
        logits = logits + attention_mask.float()
    return logits.softmax(dim=-1) if probabilities else logits


class _HeadMeanMaps(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query, key, attention_mask, scale, probabilities):
        with _no_autocast(query.device.type):
            maps = _maps(query, key, attention_mask, scale, probabilities).mean(dim=1)
        ctx.save_for_backward(query, key, attention_mask)
        ctx.scale, ctx.probabilities = scale, probabilities
        return maps

    @staticmethod
    def backward(ctx, grad):
        query, key, attention_mask = ctx.saved_tensors
        with _no_autocast(grad.device.type):
            per_head = (grad.float() / query.shape[1]).unsqueeze(1)  # d maps / d per-head maps
            if ctx.probabilities:
                p = _maps(query, key, attention_mask, ctx.scale, True)
                d_logits = p * (per_head - (per_head * p).sum(-1, keepdim=True))
            else:
                d_logits = per_head.expand(-1, query.shape[1], -1, -1)
            d_query = (d_logits @ key.float()) * ctx.scale if ctx.needs_input_grad[0] else None
            d_key = (d_logits.transpose(-1, -2) @ query.float()) * ctx.scale if ctx.needs_input_grad[1] else None
        return (None if d_query is None else d_query.to(query.dtype),
                None if d_key is None else d_key.to(key.dtype), None, None, None)


def channel_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample, per-channel mean and standard deviation over positions of a (B, N, C) tensor, in
    fp32 with autocast off (statistics). For backward `x` is kept as it is, not its fp32 copy."""
    return _ChannelStats.apply(x)


class _ChannelStats(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        with _no_autocast(x.device.type):
            xf = x.float()
            mean, std = xf.mean(dim=1), xf.std(dim=1, unbiased=False)
        ctx.save_for_backward(x, mean, std)
        return mean, std

    @staticmethod
    def backward(ctx, d_mean, d_std):
        x, mean, std = ctx.saved_tensors
        n = x.shape[1]
        with _no_autocast(x.device.type):
            out = torch.zeros_like(x, dtype=torch.float32)
            if d_mean is not None:
                out = out + (d_mean / n).unsqueeze(1)
            if d_std is not None:
                # d std / d x = (x - mean) / (n std); a constant channel (std 0) gets no gradient
                safe = torch.where(std > 0, std, torch.ones_like(std))
                scale = torch.where(std > 0, d_std / (n * safe), torch.zeros_like(std))
                out = out + (x.float() - mean.unsqueeze(1)) * scale.unsqueeze(1)
        return out.to(x.dtype)


class RecordingAttnProcessor:
    """Drop-in for diffusers' AttnProcessor2_0 (or XFormersAttnProcessor when `xformers`)."""

    def __init__(self, recorder: Recorder, layer: str, record_maps: str | None = None,
                 record_features: str | None = None, xformers: bool = False):
        self.recorder = recorder
        self.layer = layer
        self.record_maps = record_maps  # None, "probs" or "logits"
        self.record_features = record_features  # None, "output" or "qkv"
        self.xformers = xformers

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args, **kwargs):
        # The statements mirror AttnProcessor2_0 so that the output is bit-identical to it.
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape)
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        rec = self.recorder
        recording = rec.active
        if recording and self.record_features == "qkv":
            rec.keep(rec.features, self.layer, [channel_stats(t) for t in (query, key, value)])
        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if recording and self.record_maps:
            rec.keep(rec.maps, self.layer, attention_maps(query, key, attn.scale, attention_mask,
                                                          self.record_maps == "probs"))
        if self.xformers:
            hidden_states = self._xformers(query, key, value, attention_mask, attn)
        else:
            hidden_states = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0,
                                                           is_causal=False)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if recording and self.record_features == "output":
            rec.keep(rec.features, self.layer, [channel_stats(hidden_states)])
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    @staticmethod
    def _xformers(query, key, value, attention_mask, attn):
        import xformers.ops

        # xformers takes (batch, tokens, heads, head_dim); SDPA's layout is (batch, heads, tokens, head_dim)
        out = xformers.ops.memory_efficient_attention(query.transpose(1, 2), key.transpose(1, 2),
                                                      value.transpose(1, 2), attn_bias=attention_mask, scale=attn.scale)
        return out.transpose(1, 2)


def select_layers(names: list[str], selectors: tuple[str, ...], key: str = "layers") -> list[str]:
    """Layers whose path starts with one of `selectors` ("all", "down", "mid", "up" or a path prefix).
    A selector that matches nothing is an error: it would silently switch the term off there."""
    for s in selectors:
        if not any(n.startswith(LAYER_ALIASES.get(s, s)) for n in names):
            raise UserError(f"[apt] {key}: {s!r} matches no attention layer of this model; valid: \"all\", "
                            f"\"down\", \"mid\", \"up\" or a prefix of e.g. {names[0] if names else '(none)'}")
    prefixes = [LAYER_ALIASES.get(s, s) for s in selectors]
    return [n for n in names if any(n.startswith(p) for p in prefixes)]


def recording_processors(layers, recorder: Recorder, rs_selectors: tuple[str, ...], aa_selectors: tuple[str, ...],
                         rs_features: str | None, aa_maps: str | None, xformers: bool) -> tuple[dict, dict]:
    """Recording processors for the chosen self-attention (RS) and cross-attention (AA) layers of a
    model whose attention layers are `layers` (library.models.family.AttentionLayer); returns
    ({layer name: processor}, {"rs": names, "aa": names}). The other layers keep their processors."""
    names = [layer.name for layer in layers]
    self_attn = [layer.name for layer in layers if not layer.cross]
    cross_attn = [layer.name for layer in layers if layer.cross]
    rs = select_layers(self_attn, rs_selectors, "rs_layers") if rs_features else []
    aa = select_layers(cross_attn, aa_selectors, "aa_layers") if aa_maps else []
    chosen_rs, chosen_aa = set(rs), set(aa)
    processors = {name: RecordingAttnProcessor(recorder, name, record_maps=aa_maps if name in chosen_aa else None,
                                               record_features=rs_features if name in chosen_rs else None,
                                               xformers=xformers)
                  for name in names if name in chosen_rs or name in chosen_aa}
    return processors, {"rs": rs, "aa": aa}
