"""APT's "views" indicator (held-out shifted views of the training images), translation and
reflect-fill augmentation, and regularisers scaled by gamma."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from library.apt import augment as aug
from library.train.diffusion import step_generator
from tests.helpers import first_batch, tiny_trainer
from tests.test_step import force_gamma, perturb_lora


def test_view_shifts_move_whole_pixels_with_mirrored_edges():
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    moved = aug.shift_views(x, torch.tensor([[1, 0]]))  # one pixel to the right
    assert torch.equal(moved[0, 0, :, 1:], x[0, 0, :, :3])           # the content, moved
    assert torch.equal(moved[0, 0, :, 0], x[0, 0, :, 1])             # the uncovered column mirrors the edge
    down = aug.shift_views(x, torch.tensor([[0, -2]]))  # two up
    assert torch.equal(down[0, 0, :2], x[0, 0, 2:]) and torch.equal(down[0, 0, 2], x[0, 0, 2])
    shifts = aug.draw_view_shifts(500, 3, torch.Generator().manual_seed(0))
    assert shifts.abs().max() == 3 and not bool((shifts == 0).all(1).any())
    values = torch.randn(4, 3, 8, 8)
    assert set(aug.shift_views(values, torch.tensor([[2, -1]] * 4)).flatten().tolist()) <= set(values.flatten().tolist())


def test_translation_and_reflect_fill():
    img = torch.zeros(1, 1, 16, 16)
    img[..., 6:10, 6:10] = 1.0
    plan = aug.AugmentDraw(torch.tensor([True]), torch.ones(1), torch.zeros(1), torch.tensor([[0.25, 0.0]]))
    moved = aug.apply(img, plan, 0.0)
    assert torch.allclose(moved[..., 6:10, 10:14], torch.ones(1, 1, 4, 4), atol=1e-5)  # 4 px = 0.25 of 16
    assert moved[..., 6:10, 6:10].abs().max() < 1e-5
    bright = torch.ones(1, 1, 16, 16)
    zoomed = aug.AugmentDraw(torch.tensor([True]), torch.full((1,), 2.0), torch.zeros(1))
    assert aug.apply(bright, zoomed, 0.0)[0, 0, 0, 0] < 0.01              # a black (zero) border
    assert torch.allclose(aug.apply(bright, zoomed, "reflect"), bright)  # mirrored: no border at all
    # Without translate_max the draws are those of before (the shift is drawn last, if at all).
    a = aug.draw(torch.full((3,), 0.5), 0.8, 2.0, 15.0, torch.Generator().manual_seed(1))
    b = aug.draw(torch.full((3,), 0.5), 0.8, 2.0, 15.0, torch.Generator().manual_seed(1), translate_max=0.1)
    assert torch.equal(a.zoom, b.zoom) and torch.equal(a.angle, b.angle) and a.shift is None
    assert b.shift.abs().max() <= 0.1 and b.shift.shape == (3, 2)


def views_trainer(tmp_path, tiny_models, images, *overrides, **training):
    return tiny_trainer(tmp_path, tiny_models["sd15"], images, ("apt", "true"), ("apt.indicator", "views"),
                        *overrides, **training)


def test_view_loss_is_the_tuned_models_loss_on_shifted_training_images(tmp_path, tiny_models, images):
    trainer = views_trainer(tmp_path, tiny_models, images, ("apt.augment", "false"))
    parts = trainer.parts
    perturb_lora(parts.network)
    seen = {}
    loss_on = parts.denoiser.loss_on

    def spy(inputs, latents, mask):
        seen["inputs"], seen["views"] = inputs, latents
        return loss_on(inputs, latents, mask)

    parts.denoiser.loss_on = spy
    batch = first_batch(trainer)
    gen = step_generator(0, 0, 0)
    micro = parts.method.step(batch, 0)
    result = parts.denoiser.loss(batch, gen, micro)
    parts.method.after_backward()
    inputs = seen["inputs"]
    # The views are judged at the training step's own timesteps and noise...
    assert torch.equal(inputs.timesteps, result.timesteps)
    sched = parts.denoiser.objective.scheduler
    latents = batch.latents
    assert torch.allclose(inputs.noisy, sched.add_noise(latents, inputs.input_noise, inputs.timesteps))
    # ...on whole-pixel shifts of the clean training latents (mirrored edges), by the tuned UNet.
    shifts = aug.draw_view_shifts(len(batch.records), max(1, round(0.1 * latents.shape[-1])),
                                  torch.Generator().manual_seed(gen.initial_seed() ^ 0x5DEECE66D ^ 0x9E3779B9))
    assert bool((shifts != 0).any(1).all())
    views = aug.shift_views(latents, shifts)
    assert torch.equal(seen["views"], views)
    with torch.no_grad():
        pred = parts.bundle.unet(sched.add_noise(views, inputs.input_noise, inputs.timesteps), inputs.timesteps,
                                 inputs.cond.hidden_states).sample
        expected = F.mse_loss(pred.float(), inputs.noise.float(), reduction="none").flatten(1).mean(1)
        with trainer.probe.adapters(False):
            base = parts.bundle.unet(sched.add_noise(views, inputs.input_noise, inputs.timesteps),
                                     inputs.timesteps, inputs.cond.hidden_states).sample
    assert torch.allclose(micro.loss_view, expected, atol=1e-6)
    assert not torch.allclose(F.mse_loss(base.float(), inputs.noise.float(), reduction="none").flatten(1).mean(1),
                              expected, atol=1e-4)  # the LoRA is on: not the base model's loss
    assert not torch.allclose(micro.loss_view, result.per_sample.detach(), atol=1e-4)  # not the training image's
    assert micro.loss_ref is not None  # RS and AA are on: the reference pass still runs


def test_views_need_no_reference_pass_without_rs_and_aa_and_run_only_on_reference_steps(tmp_path, tiny_models,
                                                                                        images):
    trainer = views_trainer(tmp_path, tiny_models, images, ("apt.rs", "false"), ("apt.aa", "false"),
                            ("apt.reference_every", "2"), max_train_steps=4)
    parts = trainer.parts
    calls = {"reference": 0, "views": 0}
    reference, loss_on = parts.denoiser.reference, parts.denoiser.loss_on

    def count(name, fn):
        def spy(*a, **k):
            calls[name] += 1
            return fn(*a, **k)
        return spy

    parts.denoiser.reference = count("reference", reference)
    parts.denoiser.loss_on = count("views", loss_on)
    trainer.run()
    assert calls == {"reference": 0, "views": 2}  # steps 0 and 2 only, one micro-batch each
    assert trainer.probe.indicator()["form"] == "views" and any(trainer.probe.indicator()["seen"])


def test_augmented_and_regularisation_samples_do_not_update_the_views_indicator(tmp_path, tiny_models, images):
    trainer = views_trainer(tmp_path, tiny_models, images, ("apt.p_max", "1.0"))
    parts = trainer.parts
    force_gamma(parts.method, 0.999999)  # every training sample augmented
    before = parts.method.controller.indicator.ema_ref.clone()
    batch = first_batch(trainer)
    result = parts.denoiser.loss(batch, step_generator(0, 0, 0), parts.method.step(batch, 0))
    parts.method.after_backward()
    parts.method.end_step(0, [(result, batch)])
    assert torch.equal(parts.method.controller.indicator.ema_ref, before)  # nothing to learn from


def test_regularisers_scaled_by_gamma(tmp_path, tiny_models, images):
    results = {}
    for scale in ("constant", "gamma"):
        (tmp_path / scale).mkdir()
        trainer = tiny_trainer(tmp_path / scale, tiny_models["sd15"], images, ("apt", "true"),
                               ("apt.augment", "false"), ("apt.loss_weighting", "false"),
                               ("apt.regularisers_scale", scale))
        perturb_lora(trainer.parts.network)
        force_gamma(trainer.parts.method, 0.25)
        batch = first_batch(trainer)
        micro = trainer.parts.method.step(batch, 0)
        results[scale] = trainer.parts.denoiser.loss(batch, step_generator(0, 0, 0), micro)
        trainer.parts.method.after_backward()
    constant, gamma = results["constant"], results["gamma"]
    # The same terms (lambda_dist = lambda_attn = 1), once at full strength and once at mean gamma.
    terms = sum(constant.stats[f"apt/{k}"] for k in ("l_mu", "l_sigma", "l_attn"))
    assert terms > 0 and constant.stats["apt/l_mu"] == gamma.stats["apt/l_mu"]
    assert torch.allclose(constant.loss - gamma.loss, torch.tensor(0.75 * terms), rtol=1e-3)


def test_views_indicator_resumes_exactly(tmp_path, tiny_models, images):
    """The views' shifts come from the step's generator and the indicator's EMAs are in the state: a run
    stopped and resumed ends with the weights and indicator of a straight run."""
    from safetensors.torch import load_file

    from library.config.loader import build_config
    from library.train.loop import Trainer
    from tests.helpers import tiny_config

    views = [("apt", "true"), ("apt.indicator", "views"), ("apt.reference_every", "1"),
             ("save_precision", "float"), ("mixed_precision", "no")]
    runs = {}
    for name, steps in (("straight", 4), ("split", 2)):
        (tmp_path / name).mkdir()
        runs[name] = tiny_config(tmp_path / name, tiny_models["sd15"], images, max_train_steps=steps)
    straight = Trainer(build_config(str(runs["straight"]), views))
    straight.run()
    Trainer(build_config(str(runs["split"]), [*views, ("save_state", "true")])).run()
    resumed = Trainer(build_config(str(runs["split"]), [*views, ("resume", "latest"), ("max_train_steps", "4")]))
    resumed.run()
    a = load_file(str(tmp_path / "straight" / "out" / "lora.safetensors"))
    b = load_file(str(tmp_path / "split" / "out" / "lora.safetensors"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    ia, ib = straight.probe.indicator(), resumed.probe.indicator()
    assert ia["form"] == ib["form"] == "views" and any(ia["seen"])
    assert torch.allclose(torch.as_tensor(ia["gamma"]), torch.as_tensor(ib["gamma"]), atol=1e-6)
