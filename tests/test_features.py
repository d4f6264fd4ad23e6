"""Optimizers, LR schedules, loss options, saving and pruning, NaN guard, validation, logging."""
from __future__ import annotations

import math

import pytest
import torch

from library.config import build_config
from library.errors import UserError
from library.models.objectives import DDPMObjective
from library.train.diffusion import NoiseSampler, TimestepSampler, pyramid_noise, step_generator
from library.train.loss import Loss
from library.train.loop import Trainer
from library.train.schedules import warmup_steps
from tests.helpers import make_images, run_main, tiny_config, tiny_trainer

SD_SCHEDULER = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}


@pytest.mark.parametrize("optimizer,args", [
    ("AdamW", '["weight_decay=0.01", "betas=(0.9,0.99)"]'),
    ("AdamW8bit", "[]"),
    ("Lion", '["weight_decay=0.01"]'),
    ("Lion8bit", "[]"),
    ("Prodigy", '["d_coef=0.5", "safeguard_warmup=True"]'),
    ("Adafactor", "[]"),
    ("Adafactor", '["relative_step=True", "scale_parameter=True", "warmup_init=True"]'),
    ("SGD", '["momentum=0.9", "nesterov=True"]'),
])
def test_every_optimizer_trains(tmp_path, tiny_models, images, optimizer, args):
    lr = "1.0" if optimizer == "Prodigy" else "1e-3"
    trainer = tiny_trainer(tmp_path, tiny_models["sd15"], images, ("optimizer_type", optimizer), ("optimizer_args", args),
                          ("learning_rate", lr))
    expected = {"AdamW": "AdamW", "AdamW8bit": "AdamW8bit", "Lion": "Lion", "Lion8bit": "Lion8bit",
                "Prodigy": "Prodigy", "Adafactor": "Adafactor", "SGD": "SGD"}[optimizer]
    inner = getattr(trainer.parts.optimizer, "optimizer", trainer.parts.optimizer)
    assert type(inner).__name__ == expected
    before = {k: v.clone() for k, v in trainer.parts.network.kohya_state_dict().items()}
    trainer.run()
    after = trainer.parts.network.kohya_state_dict()
    assert all(math.isfinite(v) for v in trainer.losses)
    assert any(not torch.equal(before[k], after[k]) for k in before if "lora_up" in k)


def test_optimizer_args_as_a_table_and_errors(tmp_path, tiny_models, images):
    path = tiny_config(tmp_path, tiny_models["sd15"], images)
    text = path.read_text().replace("[optimizer]", "[optimizer]\noptimizer_args = { weight_decay = 0.05 }")
    path.write_text(text)
    trainer = Trainer(build_config(str(path), []))
    assert trainer.parts.optimizer.param_groups[0]["weight_decay"] == 0.05
    with pytest.raises(UserError, match="not key=value"):
        Trainer(build_config(str(path), [("optimizer_args", '["weight_decay"]')]))
    with pytest.raises(UserError, match="not accepted by AdamW"):
        Trainer(build_config(str(path), [("optimizer_args", '["nonsense=1"]')]))


def test_missing_optional_package_names_it(tmp_path, tiny_models, images, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "prodigyopt", None)  # makes `import prodigyopt` fail
    with pytest.raises(UserError) as err:
        tiny_trainer(tmp_path, tiny_models["sd15"], images, ("optimizer_type", "Prodigy"))
    assert str(err.value) == 'optimizer_type = "Prodigy" needs the prodigyopt package: pip install prodigyopt'


@pytest.mark.parametrize("schedule,check", [
    ("constant", lambda lrs: all(abs(x - 1e-3) < 1e-12 for x in lrs[2:])),
    ("constant_with_warmup", lambda lrs: lrs[0] == 5e-4 and abs(lrs[-1] - 1e-3) < 1e-12),
    ("linear", lambda lrs: lrs[-1] < lrs[4] and lrs[-1] >= 0),
    ("cosine", lambda lrs: lrs[-1] < 1e-4),
    ("cosine_with_restarts", lambda lrs: any(b > a for a, b in zip(lrs[3:], lrs[4:]))),
    ("polynomial", lambda lrs: lrs[-1] < lrs[4]),
])
def test_every_schedule(tmp_path, tiny_models, images, schedule, check):
    trainer = tiny_trainer(tmp_path, tiny_models["sd15"], images, ("lr_scheduler", schedule), ("lr_warmup_steps", "2"),
                          ("lr_scheduler_num_cycles", "3"), ("lr_scheduler_power", "2.0"), max_train_steps=12)
    lrs = []
    original = trainer.parts.scheduler.step

    def record():
        original()
        lrs.append(trainer.parts.optimizer.param_groups[0]["lr"])

    trainer.parts.scheduler.step = record
    trainer.run()
    assert len(lrs) == 12 and check(lrs), lrs


def test_warmup_fraction_and_max_train_epochs(tmp_path, tiny_models, images):
    assert warmup_steps(0.1, 200) == 20 and warmup_steps(5, 200) == 5 and warmup_steps(0, 10) == 0
    trainer = tiny_trainer(tmp_path, tiny_models["sd15"], images, ("max_train_epochs", "3"))
    assert trainer.parts.plan.steps_per_epoch == 2 and trainer.parts.total_steps == 6  # 4 images, batch 2
    trainer.run()
    assert trainer.step == 6


def test_noise_and_timestep_options():
    gen = step_generator(1, 2, 3)
    noise = pyramid_noise((2, 4, 32, 32), gen, 6, 0.3)
    assert abs(noise.std().item() - 1.0) < 1e-4
    eps = DDPMObjective(SD_SCHEDULER, v_prediction=False)
    t = TimestepSampler(eps.num_timesteps, 200, 300).sample(2000, step_generator(0, 0, 0))
    assert t.min() >= 200 and t.max() < 300
    weights = Loss(eps, min_snr_gamma=5.0).timestep_weights(torch.tensor([10, 500, 990]))
    snr = eps.snr(torch.tensor([10, 500, 990]))
    assert torch.allclose(weights, torch.clamp(snr, max=5.0) / snr)
    assert weights[0] < 1.0 and weights[2] == 1.0  # low t (high SNR) down-weighted, high t untouched
    v = DDPMObjective(SD_SCHEDULER, v_prediction=True)
    snr_v = v.snr(torch.tensor([10]))
    assert torch.allclose(Loss(v, 5.0).timestep_weights(torch.tensor([10])), torch.clamp(snr_v, max=5.0) / (snr_v + 1))
    zero = DDPMObjective(SD_SCHEDULER, v_prediction=True, zero_terminal_snr=True)
    assert zero.scheduler.alphas_cumprod[-1] < 1e-6 < DDPMObjective(SD_SCHEDULER, False).scheduler.alphas_cumprod[-1]
    offset = NoiseSampler(offset=0.1).sample(torch.zeros(64, 4, 8, 8), step_generator(0, 0, 0))
    channel_means = offset.mean(dim=(2, 3))
    assert channel_means.std() > 0.05  # per-channel constant offsets are present


@pytest.mark.parametrize("overrides", [
    [("noise_offset", "0.05"), ("min_snr_gamma", "5")],
    [("multires_noise_iterations", "4"), ("multires_noise_discount", "0.3"), ("ip_noise_gamma", "0.1")],
    [("v_parameterization", "true"), ("zero_terminal_snr", "true"), ("min_timestep", "100"), ("max_timestep", "900")],
    [("clip_skip", "2"), ("full_bf16", "true"), ("mixed_precision", "bf16")],
])
def test_loss_options_train(tmp_path, tiny_models, images, overrides):
    trainer = tiny_trainer(tmp_path, tiny_models["sd15"], images, *overrides)
    trainer.run()
    assert len(trainer.losses) == 3 and all(math.isfinite(v) for v in trainer.losses)


def test_v_prediction_uses_velocity_target(tmp_path, tiny_models, images):
    trainer = tiny_trainer(tmp_path, tiny_models["sd15"], images, ("v_parameterization", "true"))
    d = trainer.parts.denoiser.objective
    latents, noise, t = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.tensor([10, 900])
    a = d.scheduler.alphas_cumprod[t].sqrt().view(-1, 1, 1, 1)
    s = (1 - d.scheduler.alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1)
    assert torch.allclose(d.target(latents, noise, t), a * noise - s * latents, atol=1e-6)


def test_masked_loss_from_alpha_channel(tmp_path, tiny_models):
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(2):
        img = Image.new("RGBA", (64, 64), (255, 0, 0, 0))
        img.paste((0, 0, 255, 255), (0, 0, 32, 64))  # left half opaque
        img.save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text("a blue half")
    path = tiny_config(tmp_path, tiny_models["sd15"], folder)
    path.write_text(path.read_text().replace('image_dir = ', 'alpha_mask = true\nimage_dir = '))
    trainer = Trainer(build_config(str(path), []))
    batch = trainer.parts.batches.build(trainer.parts.data.epoch_batches(1)[0], 1, 0)
    assert batch.mask.shape == (2, 1, 8, 8)
    assert batch.mask[0, 0, :, :4].min() == 1.0 and batch.mask[0, 0, :, 4:].max() == 0.0 or \
        batch.mask[0, 0, :, 4:].min() == 1.0  # a flipped sample has the opaque half on the right
    trainer.run()
    assert all(math.isfinite(v) for v in trainer.losses)


def test_intermediate_saves_and_pruning(tmp_path, tiny_models, images):
    trainer = tiny_trainer(tmp_path, tiny_models["sd15"], images, ("save_every_n_steps", "2"), ("save_last_n_steps", "4"),
                          ("save_every_n_epochs", "1"), ("save_last_n_epochs", "2"), ("save_state", "true"),
                          max_train_steps=10)
    trainer.run()
    out = tmp_path / "out"
    names = sorted(p.name for p in out.iterdir() if p.name not in ("logs", "events.jsonl"))
    # steps 2..8 saved every 2, the last 4 steps kept; epochs 1..4 saved (5 is the final save), 2 kept
    assert names == sorted(["lora-000003.safetensors", "lora-000003-state", "lora-000004.safetensors",
                            "lora-000004-state", "lora-step00000006.safetensors", "lora-step00000006-state",
                            "lora-step00000008.safetensors", "lora-step00000008-state", "lora.safetensors",
                            "lora-state"])
    assert not list(out.glob(".*"))  # no temporary files left behind


def poison_step(trainer, at: int):
    """Make the training step's loss NaN at optimizer step `at` (from 0)."""
    original = trainer.parts.denoiser.loss

    def poisoned(batch, gen, *args, **kw):
        result = original(batch, gen, *args, **kw)
        if trainer.step == at:
            result.loss = result.loss * float("nan")
        return result

    trainer.parts.denoiser.loss = poisoned


def test_nan_loss_stops_with_the_step_or_is_skipped(tmp_path, tiny_models, images):
    trainer = tiny_trainer(tmp_path, tiny_models["sd15"], images, max_train_steps=4)
    poison_step(trainer, 2)
    with pytest.raises(UserError) as err:
        trainer.run()
    assert "loss became nan at step 3 (epoch 2)" in str(err.value)
    assert not (tmp_path / "out" / "lora.safetensors").exists()
    trainer = tiny_trainer(tmp_path, tiny_models["sd15"], images, ("skip_nan_steps", "true"), ("lr_scheduler", "linear"),
                          max_train_steps=4)
    poison_step(trainer, 2)
    before = None
    lrs = []

    def spy_step(step):
        nonlocal before
        if step == 2:
            before = {k: v.clone() for k, v in trainer.parts.network.kohya_state_dict().items()}
        result = Trainer.train_step(trainer, step)
        lrs.append(trainer.parts.scheduler.get_last_lr()[0])
        if step == 2:
            assert result is None
            after = trainer.parts.network.kohya_state_dict()
            assert all(torch.equal(before[k], after[k]) for k in before)
        return result

    trainer.train_step = spy_step
    trainer.run()
    assert trainer.step == 4 and len(trainer.losses) == 3
    # The schedule follows the step counter, also across the skipped step: linear decay over 4 steps.
    assert lrs == pytest.approx([1e-3 * (1 - k / 4) for k in range(1, 5)])


def test_validation_loss_is_logged(tmp_path, tiny_models):
    folder = make_images(tmp_path / "imgs", 6)
    path = tiny_config(tmp_path, tiny_models["sd15"], folder, max_train_steps=4, validate_every_n_steps=2)
    path.write_text(path.read_text().replace("resolution = 64", "resolution = 64\nvalidation_split = 0.34"))
    trainer = Trainer(build_config(str(path), [("learning_rate", "5e-3")]))
    assert len(trainer.parts.data.validation) == 2
    trainer.run()
    steps = [s for s, _ in trainer.reporting.outputs.validation_history]
    assert steps == [0, 2, 4]
    first = trainer.parts.validator.run(trainer.parts.batches, trainer.parts.denoiser)
    assert first["val/loss"] == pytest.approx(trainer.reporting.outputs.validation_history[-1][1], rel=1e-5)  # fixed noise: repeatable
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logs = list((tmp_path / "out" / "logs").rglob("events.out.tfevents.*"))
    acc = EventAccumulator(str(logs[0].parent))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert "val/loss" in tags and "loss" in tags and "lr/unet" in tags and "grad_norm" in tags
    assert any(t.startswith("loss_by_timestep/") for t in tags)
    assert [e.step for e in acc.Scalars("val/loss")] == [0, 2, 4]


def test_wandb_without_the_package_is_a_clear_error(tmp_path, tiny_models, images):
    pytest.importorskip("tensorboard")
    try:
        import wandb  # noqa: F401
        pytest.skip("wandb is installed")
    except ImportError:
        pass
    path = tiny_config(tmp_path, tiny_models["sd15"], images)
    code, _, err = run_main(["--config", str(path), "--log_with", "wandb"])
    assert code == 2 and err.strip() == 'error: log_with = "wandb" needs the wandb package: pip install wandb'
