"""The shared training step and APT at its seams: regularisation images, the reference pass with
the text encoder trained, precision islands, non-finite references, gradient accumulation."""
from __future__ import annotations

import logging
import math

import pytest
import torch

from library.config import build_config
from library.errors import UserError
from library.lora.network import ADAPTER
from library.train.diffusion import step_generator
from library.train.loop import Trainer
from library.train.method import MethodStep
from tests.helpers import first_batch, make_images, tiny_config, tiny_trainer, write_config


def perturb_lora(network, std: float = 0.05, seed: int = 0) -> None:
    """Non-zero up-weights, so that the LoRA changes the model's output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in network.layers.values():
            w = layer.lora_B[ADAPTER].weight
            w.copy_(torch.randn(w.shape, generator=gen) * std)


def force_gamma(method, gamma: float) -> None:
    """Every bin of the indicator at `gamma` (whichever form the indicator has)."""
    ind = method.controller.indicator
    ind.seen[:] = True
    if ind.form in ("relative", "views"):  # gamma = 1 - (theta / other)^k
        ind.ema_ref[:] = 1.0
        ind.ema_theta[:] = (1 - gamma) ** (1 / ind.scale)
    else:  # gamma = 1 - exp(-k (ref - theta))
        ind.ema_theta[:] = 0.0
        ind.ema_ref[:] = -math.log(1 - gamma) / ind.scale
    assert ind.gamma().tolist() == pytest.approx([gamma] * ind.bins, abs=1e-9)


# --- regularisation images --------------------------------------------------------------------

def test_reg_images_keep_prior_loss_weight_and_are_never_augmented_under_apt(tmp_path, tiny_models):
    train_dir = make_images(tmp_path / "train", 2, caption="a sks shape")
    reg_dir = make_images(tmp_path / "reg", 2, caption="a shape")
    tables = {"model": {"pretrained_model_name_or_path": str(tiny_models["sd15"])},
              "network": {"network_dim": 4}, "optimizer": {"learning_rate": 1e-3},
              "training": {"max_train_steps": 1, "train_batch_size": 4, "seed": 3, "prior_loss_weight": 0.7},
              "logging": {"log_with": "none"}, "saving": {"output_dir": str(tmp_path / "out")}}
    path = write_config(tmp_path / "c.toml", tables, [{"resolution": 64, "subsets": [
        {"image_dir": str(train_dir)}, {"image_dir": str(reg_dir), "is_reg": True}]}])
    common = [("apt.rs", "false"), ("apt.aa", "false"), ("apt.p_max", "1.0"), ("apt.rotation_max", "90")]
    trainer = Trainer(build_config(str(path), [("apt", "true"), *common]))
    perturb_lora(trainer.parts.network)
    force_gamma(trainer.parts.method, 0.999999)  # training images: augmented (p_max 1) and weighted ~0
    batch = first_batch(trainer)
    reg = batch.is_reg
    assert reg.sum() == 2 and (~reg).sum() == 2
    seen = []
    original = trainer.parts.denoiser.noisy_inputs

    def spy(*args, **kw):
        inputs = original(*args, **kw)
        seen.append(inputs.latents.cpu())
        return inputs

    trainer.parts.denoiser.noisy_inputs = spy
    with torch.no_grad():
        gen = step_generator(0, 0, 0)
        apt = trainer.parts.denoiser.loss(batch, gen, trainer.parts.method.step(batch, 0))
        plain = trainer.parts.denoiser.loss(batch, step_generator(0, 0, 0), MethodStep())
    augmented, untouched = seen
    assert torch.equal(augmented[reg], untouched[reg])  # reg images: never augmented
    assert not torch.equal(augmented[~reg], untouched[~reg])  # training images: all augmented (p_max 1)
    # The regularisation images' loss terms are exactly what they are without APT.
    assert torch.equal(apt.per_sample[reg], plain.per_sample[reg])
    expected = (plain.per_sample[reg] * 0.7).sum() / 4  # training images weigh (1 - gamma) ~ 0
    assert apt.loss.item() == pytest.approx(expected.item(), rel=1e-4)


# --- APT's weighting and augmentation end to end ------------------------------------------------

def test_forced_gamma_scales_the_loss_and_fires_augmentation_at_its_rate(tmp_path, tiny_models, images):
    trainer = tiny_trainer(tmp_path, tiny_models["sd15"], images, ("apt", "true"), ("apt.rs", "false"),
                          ("apt.aa", "false"), ("apt.augment", "false"))
    perturb_lora(trainer.parts.network)
    batch = first_batch(trainer)
    losses = {}
    for gamma in (0.0, 0.5):
        force_gamma(trainer.parts.method, gamma)
        with torch.no_grad():
            losses[gamma] = trainer.parts.denoiser.loss(batch, step_generator(1, 0, 0), trainer.parts.method.step(batch, 0)).loss
    assert losses[0.5].item() == pytest.approx(0.5 * losses[0.0].item(), rel=1e-5)

    trainer = tiny_trainer(tmp_path, tiny_models["sd15"], images, ("apt", "true"), ("apt.rs", "false"),
                          ("apt.aa", "false"), ("apt.p_max", "0.8"))
    force_gamma(trainer.parts.method, 0.6)
    batch = first_batch(trainer)
    rates = []
    with torch.no_grad():
        for k in range(40):
            result = trainer.parts.denoiser.loss(batch, step_generator(2, k, 0), trainer.parts.method.step(batch, k))
            rates.append(result.stats["apt/augment_rate"])
            assert result.stats["apt/loss_weight"] == pytest.approx(0.4, rel=1e-5)
    assert abs(sum(rates) / len(rates) - 0.6) < 0.12, sum(rates) / len(rates)


# --- the reference pass is the base model, also with the text encoder trained ------------------

def test_reference_conditioning_is_the_base_text_encoders_when_they_are_trained(tmp_path, tiny_models, images):
    trainer = tiny_trainer(tmp_path, tiny_models["sdxl"], images, ("apt", "true"),
                          ("network_train_unet_only", "false"))
    perturb_lora(trainer.parts.network)
    batch = first_batch(trainer)
    captured = []
    original = trainer.parts.denoiser.predict

    def spy(inputs, unet=None, cond=None):
        captured.append((inputs.cond if cond is None else cond, unet))
        return original(inputs, unet, cond)

    trainer.parts.denoiser.predict = spy
    trainer.parts.denoiser.loss(batch, step_generator(0, 0, 0), trainer.parts.method.step(batch, 0))
    trainer.parts.method.after_backward()
    (ref_cond, ref_unet), (tuned_cond, _) = captured
    assert ref_unet is trainer.parts.bundle.unet
    conditioner = trainer.parts.denoiser.conditioning.local
    with torch.no_grad():
        trainer.parts.network.set_enabled(False)
        base = conditioner.encode(batch.captions)
        trainer.parts.network.set_enabled(True)
        tuned = conditioner.encode(batch.captions)
    assert not torch.allclose(base.hidden_states, tuned.hidden_states)  # the TE LoRA matters
    assert torch.equal(ref_cond.hidden_states, base.hidden_states) and torch.equal(ref_cond.pooled, base.pooled)
    assert torch.allclose(tuned_cond.hidden_states, tuned.hidden_states)
    assert not ref_cond.hidden_states.requires_grad


# --- precision islands ------------------------------------------------------------------------

def test_vae_encode_ignores_autocast(tmp_path, tiny_models, images):
    trainer = tiny_trainer(tmp_path, tiny_models["sd15"], images)
    pixels = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    encoder = trainer.parts.batches.encoder
    encoder.vae.to(trainer.parts.device)
    plain = encoder(pixels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = encoder(pixels)
    assert inside.dtype == torch.float32 and torch.equal(inside, plain)


def test_recorded_attention_maps_are_fp32_under_autocast():
    from diffusers.models.attention_processor import Attention

    from library.apt.attention import Recorder, RecordingAttnProcessor

    torch.manual_seed(0)
    attn = Attention(query_dim=32, cross_attention_dim=16, heads=2, dim_head=16)
    rec = Recorder()
    attn.set_processor(RecordingAttnProcessor(rec, "layer", record_maps="probs"))
    x, ctx = torch.randn(2, 24, 32), torch.randn(2, 7, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16), rec.recording("tuned"):
        attn(x, encoder_hidden_states=ctx)
        q, k = attn.to_q(x), attn.to_k(ctx)  # the bf16 projections the processor saw
    q = q.float().view(2, -1, 2, 16).transpose(1, 2)
    k = k.float().view(2, -1, 2, 16).transpose(1, 2)
    expected = ((q @ k.transpose(-1, -2)) * attn.scale).softmax(-1).mean(1)
    got = rec.maps[("layer", "tuned")]
    assert got.dtype == torch.float32
    assert (got - expected).abs().max() < 1e-6  # a bf16 matmul would be ~1e-3 off


# --- non-finite references --------------------------------------------------------------------

def test_non_finite_reference_never_reaches_the_indicator(tmp_path, tiny_models, images, caplog):
    # reference passes at steps 0 and 4 (the default reference_every = 4); the second one is poisoned
    trainer = tiny_trainer(tmp_path, tiny_models["sd15"], images, ("apt", "true"), ("learning_rate", "5e-3"),
                           max_train_steps=6)
    unet = trainer.parts.bundle.unet
    original = unet.forward
    calls = {"n": 0}

    def poisoned(sample, *args, **kw):
        if not torch.is_grad_enabled():  # the reference pass
            calls["n"] += 1
            if calls["n"] == 2:  # its prediction and recordings become NaN
                sample = sample * float("nan")
        return original(sample, *args, **kw)

    unet.forward = poisoned
    with caplog.at_level(logging.WARNING, logger="library"):
        trainer.run()
    assert calls["n"] == 2 and all(math.isfinite(v) for v in trainer.losses) and len(trainer.losses) == 6
    ind = trainer.parts.method.controller.indicator
    assert torch.isfinite(ind.ema_ref).all() and torch.isfinite(ind.gamma()).all()
    assert trainer.parts.method.skipped == {"indicator": 1, "regularisers": 1}
    assert any("non-finite reference" in r.message for r in caplog.records)


# --- resume checks every indicator setting ----------------------------------------------------

@pytest.mark.parametrize("key,value,name", [("apt.indicator_scale", "20", "scale"), ("apt.ema_alpha", "0.5",
                                                                                       "ema_alpha")])
def test_resume_refuses_changed_indicator_settings(tmp_path, tiny_models, images, key, value, name):
    path = tiny_config(tmp_path, tiny_models["sd15"], images, max_train_steps=1)
    common = [("apt", "true"), ("log_with", "none")]
    Trainer(build_config(str(path), [*common, ("save_state", "true")])).run()
    with pytest.raises(UserError, match=rf"cannot continue APT: the indicator was saved with {name} = .*, this run "
                                        rf"has {value}"):
        Trainer(build_config(str(path), [*common, ("resume", "latest"), ("max_train_steps", "2"), (key, value)]))


# --- gradient accumulation --------------------------------------------------------------------

def test_two_micro_batches_of_one_give_the_gradients_of_one_batch_of_two(tmp_path, tiny_models, images):
    trainer = tiny_trainer(tmp_path, tiny_models["sd15"], images, ("max_grad_norm", "0"), max_train_steps=2)
    perturb_lora(trainer.parts.network)
    samples = trainer.step_samples(0)[0]
    assert len(samples) == 2
    d = trainer.parts.denoiser
    noise = {s.record: torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(s.record)) for s in samples}
    current = {}
    assemble = trainer.parts.batches.assemble

    def spy_assemble(chunk):
        batch = assemble(chunk)
        current["records"] = batch.records
        return batch

    trainer.parts.batches.assemble = spy_assemble
    d.timesteps.sample = lambda n, gen: torch.tensor([(200 + 300 * r) % 1000 for r in current["records"]])
    d.noise.sample = lambda latents, gen: torch.stack([noise[r] for r in current["records"]]).to(latents)
    grads = []
    trainer.parts.optimizer.step = lambda *a, **k: None
    for split in ([samples], [samples[:1], samples[1:]]):
        trainer.step_samples = lambda step, split=split: split
        trainer.parts.optimizer.zero_grad(set_to_none=True)
        original_zero = trainer.parts.optimizer.zero_grad
        captured = {}

        def capture(*a, **k):
            captured.update({n: p.grad.clone() for n, p in trainer.parts.bundle.unet.named_parameters()
                             if p.grad is not None})
            original_zero(*a, **k)

        trainer.parts.optimizer.zero_grad = capture
        trainer.train_step(0)
        trainer.parts.optimizer.zero_grad = original_zero
        grads.append(captured)
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-7, rtol=1e-5), name


# --- conditioning, full_bf16, samplers ----------------------------------------------------------

def test_clip_skip_takes_the_penultimate_layer_through_the_final_norm(tmp_path, tiny_models, images):

    trainer = tiny_trainer(tmp_path, tiny_models["sd15"], images)
    b = trainer.parts.bundle
    skip1 = b.family.caption_encoder(b.tokenizers, b.text_encoders, 1)
    skip2 = b.family.caption_encoder(b.tokenizers, b.text_encoders, 2)
    captions = ["a red circle", "a blue square"]
    with torch.no_grad():
        ids = b.tokenizers[0](captions, padding="max_length", max_length=77, truncation=True,
                              return_tensors="pt").input_ids
        out = b.text_encoders[0](ids, output_hidden_states=True)
        penultimate = b.text_encoders[0].final_layer_norm(out.hidden_states[-2])
        one, two = skip1.encode(captions).hidden_states, skip2.encode(captions).hidden_states
    assert torch.allclose(one, out.last_hidden_state)
    assert torch.allclose(two, penultimate) and not torch.allclose(one, two)


def test_full_bf16_trains_bf16_lora_parameters(tmp_path, tiny_models, images):
    trainer = tiny_trainer(tmp_path, tiny_models["sd15"], images, ("full_bf16", "true"), ("mixed_precision", "bf16"),
                          ("learning_rate", "1e-2"), max_train_steps=2)
    params = list(trainer.parts.network.parameters())
    assert params and all(p.dtype == torch.bfloat16 for p in params)
    before = [p.detach().clone() for p in params]
    trainer.run()
    assert any(not torch.equal(a, p.detach()) for a, p in zip(before, params))
    inner = getattr(trainer.parts.optimizer, "optimizer", trainer.parts.optimizer)
    states = [s for s in inner.state.values() if "exp_avg" in s]
    assert states and all(s["exp_avg"].dtype == torch.bfloat16 for s in states)


def test_each_sampler_name_maps_to_the_scheduler_it_claims(tiny_models):
    import diffusers

    from library.models.shipped import read_json
    from library.train.sampling import make_scheduler

    config = read_json(tiny_models["sd15"] / "scheduler" / "scheduler_config.json")
    expected = {"euler_a": ("EulerAncestralDiscreteScheduler", {}),
                "euler": ("EulerDiscreteScheduler", {}),
                "ddim": ("DDIMScheduler", {"clip_sample": False}),
                "dpm++_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2,
                                                              "use_karras_sigmas": False}),
                "dpm++_2m_karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++",
                                                                     "use_karras_sigmas": True})}
    for name, (cls, settings) in expected.items():
        scheduler = make_scheduler(name, config, False, False)
        assert type(scheduler) is getattr(diffusers, cls), name
        for key, value in settings.items():
            assert scheduler.config[key] == value, (name, key)
        assert scheduler.config.prediction_type == "epsilon"
    assert make_scheduler("euler", config, True, False).config.prediction_type == "v_prediction"


# --- rank-aware logging -----------------------------------------------------------------------

def test_only_the_main_process_prints_info_and_warnings(monkeypatch):
    from library.utils.runtime import MainProcessOnly

    keep = MainProcessOnly()

    def record(level):
        return logging.LogRecord("library.x", level, __file__, 1, "message", None, None)

    monkeypatch.setenv("RANK", "1")
    assert not keep.filter(record(logging.INFO)) and not keep.filter(record(logging.WARNING))
    assert keep.filter(record(logging.ERROR))
    monkeypatch.setenv("RANK", "0")
    assert keep.filter(record(logging.INFO)) and keep.filter(record(logging.WARNING))


# --- reference_every --------------------------------------------------------------------------

def test_reference_every_runs_the_reference_pass_and_indicator_update_every_kth_step(tmp_path, tiny_models, images):
    trainer = tiny_trainer(tmp_path, tiny_models["sd15"], images, ("apt", "true"), ("apt.reference_every", "2"),
                          ("learning_rate", "5e-3"), max_train_steps=5)
    unet = trainer.parts.bundle.unet
    original = unet.forward
    passes = []

    def spy(*args, **kw):
        passes.append((trainer.step, torch.is_grad_enabled()))
        return original(*args, **kw)

    unet.forward = spy
    states, stats = [], []

    def record(report, values):
        states.append(torch.tensor(trainer.probe.indicator()["ema_ref"], dtype=torch.float64))
        stats.append(dict(values))

    trainer.probe.on_step(record)
    trainer.run()
    references = [step for step, grad in passes if not grad]
    assert references == [0, 2, 4]  # one no-grad reference pass on steps 0, 2, 4 (one micro-batch each)
    assert [step for step, grad in passes if grad] == [0, 1, 2, 3, 4]
    assert torch.equal(states[0], states[1]) and torch.equal(states[2], states[3])  # no update in between
    assert not torch.equal(states[1], states[2])
    assert "apt/l_mu" in stats[0] and "apt/l_mu" not in stats[1] and "apt/loss_weight" in stats[1]
    assert trainer.parts.method.controller.history.steps == [1, 2, 3, 4, 5]
