"""GPU memory and host-sync behaviour, proven on the CPU: byte counts through autograd graphs and
saved-tensor hooks, device/dtype assertions inside callbacks, FLOP counts, a sync counter."""
from __future__ import annotations

import pytest
import torch

from library.lora.network import ADAPTER
from library.train.diffusion import step_generator
from library.utils.memory import SavedTensors, graph_saved_bytes
from tests.helpers import first_batch, tiny_trainer


def apt_trainer(tmp_path, tiny_models, images, *overrides, model="sdxl", **training):
    return tiny_trainer(tmp_path, tiny_models[model], images, ("apt", "true"), *overrides, **training)


def spread_lora(trainer) -> None:
    """Non-zero, deterministic LoRA up-weights: the tuned pass differs from the reference."""
    with torch.no_grad():
        for _, layer in trainer.parts.network.layers.values():
            w = layer.lora_B[ADAPTER].weight
            w.copy_(torch.linspace(-0.05, 0.05, w.numel()).reshape(w.shape))


def recorded(rec) -> list[torch.Tensor]:
    return list(rec.maps.values()) + [t for pairs in rec.features.values() for pair in pairs for t in pair]


# --- finding 1: the recorder under gradient checkpointing -------------------------------------

def test_checkpointed_backward_leaves_nothing_alive_in_the_recorder(tmp_path, tiny_models, images):
    trainer = apt_trainer(tmp_path, tiny_models, images, ("gradient_checkpointing", "true"))
    spread_lora(trainer)
    method = trainer.parts.method
    rec = method.controller.recorder
    batch = first_batch(trainer)
    result = trainer.parts.denoiser.loss(batch, step_generator(0, 0, 0), method.step(batch, 0))
    first = {key: id(t) for key, t in rec.maps.items()}
    assert len(first) > 0
    result.loss.backward()
    method.after_backward()
    # The block reruns of checkpointing recorded nothing: the maps are still the first run's, and
    # the graphs behind everything recorded hold no saved tensor any more (the rerun's would).
    assert {key: id(t) for key, t in rec.maps.items()} == first
    assert graph_saved_bytes(recorded(rec)) == 0


def test_recorder_keeps_the_first_recording_of_a_pass_until_cleared():
    from library.apt.attention import Recorder, RecordingAttnProcessor
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    attn = Attention(8, cross_attention_dim=6, heads=2, dim_head=4)
    rec = Recorder()
    attn.set_processor(RecordingAttnProcessor(rec, "layer", record_maps="probs"))
    x, ctx = torch.randn(1, 5, 8), torch.randn(1, 3, 6)
    with rec.recording("tuned"):
        attn(x, ctx)
        kept = rec.maps[("layer", "tuned")]
        attn(x * 2, ctx)  # what a checkpointed rerun does
        assert rec.maps[("layer", "tuned")] is kept
    rec.clear()
    with rec.recording("tuned"):
        attn(x * 2, ctx)
    assert not torch.equal(rec.maps[("layer", "tuned")], kept)


def test_apt_regulariser_gradients_are_the_same_with_checkpointing(tmp_path, tiny_models, images):
    grads = []
    for checkpointing in ("false", "true"):
        folder = tmp_path / checkpointing
        folder.mkdir()
        trainer = apt_trainer(folder, tiny_models, images, ("gradient_checkpointing", checkpointing))
        spread_lora(trainer)
        method = trainer.parts.method
        batch = first_batch(trainer)
        with SavedTensors() as saved:
            trainer.parts.denoiser.loss(batch, step_generator(0, 0, 0), method.step(batch, 0))
        ids = trainer.parts.denoiser.conditioning.tokenize(batch.captions)[0]
        terms = method.controller.regularisers(ids)
        assert terms.l_attn > 0 and terms.l_mu > 0
        trainer.parts.optimizer.zero_grad(set_to_none=True)
        terms.total(1.0, 1.0).backward()
        method.after_backward()
        grads.append({n: p.grad.clone() for n, p in trainer.parts.bundle.unet.named_parameters()
                      if p.grad is not None})
        grads[-1]["saved"] = torch.tensor(float(saved.bytes))
    plain, checkpointed = grads
    assert checkpointed["saved"] < plain["saved"]  # checkpointing is on in the second run
    assert plain.keys() == checkpointed.keys() and len(plain) > 1
    for name in plain:
        if name != "saved":
            assert torch.allclose(plain[name], checkpointed[name], atol=1e-7, rtol=1e-4), name
