"""Loss types, timestep sampling, EMA of the LoRA weights and masked training (issue 24)."""
from __future__ import annotations

import json
import math

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from library.apt.indicator import OverfitIndicator
from library.config import build_config
from library.errors import UserError
from library.models.objectives import DDPMObjective
from library.train.diffusion import TimestepSampler, step_generator
from library.train.loop import Trainer
from library.train.loss import Loss
from tests.helpers import first_batch, make_images, run_main, tiny_config, tiny_trainer

SD_SCHEDULER = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}
FP32 = [("save_precision", "float"), ("mixed_precision", "no")]


def eps_objective(v: bool = False) -> DDPMObjective:
    return DDPMObjective(SD_SCHEDULER, v_prediction=v)


# --- loss types -------------------------------------------------------------------------------

def test_loss_types_equal_hand_computed_values():
    obj = eps_objective()
    pred = torch.tensor([[[[0.5, -1.0]]], [[[2.0, 0.0]]]])   # B=2, C=1, 1x2
    target = torch.tensor([[[[0.0, 0.0]]], [[[0.0, 0.5]]]])
    t = torch.tensor([0, 999])
    d = [[0.5, -1.0], [2.0, -0.5]]  # pred - target

    def mean(rows):
        return torch.tensor([sum(r) / len(r) for r in rows])

    assert torch.allclose(Loss(obj).per_sample(pred, target, t), mean([[x * x for x in r] for r in d]))
    assert torch.allclose(Loss(obj, loss_type="l1").per_sample(pred, target, t), mean([[abs(x) for x in r] for r in d]))

    def pseudo(x, c):
        return 2 * (math.sqrt(x * x + c * c) - c)

    # constant: c = huber_c * huber_scale for every timestep; huber multiplies by c, smooth_l1 does not
    c = 0.3 * 2.0
    got = Loss(obj, loss_type="huber", huber_schedule="constant", huber_c=0.3, huber_scale=2.0).per_sample(pred, target, t)
    assert torch.allclose(got, mean([[c * pseudo(x, c) for x in r] for r in d]))
    got = Loss(obj, loss_type="smooth_l1", huber_schedule="constant", huber_c=0.3, huber_scale=2.0).per_sample(
        pred, target, t)
    assert torch.allclose(got, mean([[pseudo(x, c) for x in r] for r in d]))
    # exponential: c(t) = exp(log(huber_c) * t / T) * huber_scale
    cs = [math.exp(math.log(0.1) * k / 1000) for k in (0, 999)]
    got = Loss(obj, loss_type="huber", huber_schedule="exponential", huber_c=0.1).per_sample(pred, target, t)
    assert torch.allclose(got, mean([[cs[i] * pseudo(x, cs[i]) for x in r] for i, r in enumerate(d)]))
    # snr: c(t) = (1 - huber_c) / (1 + sigma)^2 + huber_c with sigma = sqrt((1 - a) / a)
    a = obj.scheduler.alphas_cumprod.double()
    cs = [(1 - 0.1) / (1 + math.sqrt((1 - a[k]) / a[k])) ** 2 + 0.1 for k in (0, 999)]
    got = Loss(obj, loss_type="smooth_l1", huber_schedule="snr", huber_c=0.1).per_sample(pred, target, t)
    assert torch.allclose(got, mean([[pseudo(x, cs[i]) for x in r] for i, r in enumerate(d)]), rtol=1e-5)
    assert cs[0] > 0.9 and abs(cs[1] - 0.1) < 0.01  # ~1 on clean inputs, huber_c on noise


def test_masked_loss_weighs_positions_and_unmasked_options_follow_onetrainer():
    obj = eps_objective()
    pred = torch.tensor([[[[1.0, 3.0]]]])
    target = torch.zeros_like(pred)
    mask = torch.tensor([[[[1.0, 0.0]]]])
    assert Loss(obj).per_sample(pred, target, torch.tensor([5]), mask).item() == 1.0  # only the masked-in position
    assert Loss(obj, loss_type="l1").per_sample(pred, target, torch.tensor([5]), mask * 0.5).item() == 1.0
    gen = step_generator(0, 0, 0)
    # unmasked_weight: no position weighs less than it
    m = Loss(obj, unmasked_weight=0.25).loss_mask(torch.tensor([[[[1.0, 0.0, 0.5]]]]), gen)
    assert m.tolist() == [[[[1.0, 0.25, 0.5]]]]
    # unmasked_probability: whole samples train without their mask, at that rate
    zeros = torch.zeros(4000, 1, 2, 2)
    m = Loss(obj, unmasked_probability=0.3).loss_mask(zeros, step_generator(0, 1, 0))
    rate = (m.flatten(1).min(1).values == 1).float().mean().item()
    assert abs(rate - 0.3) < 0.03 and set(m.unique().tolist()) == {0.0, 1.0}
    assert Loss(obj).loss_mask(zeros, gen) is zeros  # off: the mask as it was, no draw


def test_timestep_weights_equal_kohya_formulas():
    t = torch.tensor([0, 10, 500, 990])
    for v in (False, True):
        obj = eps_objective(v)
        snr = obj.snr(t).double().clamp(max=1000)
        scale = snr / (snr + 1)
        assert obj.snr(t)[0] > 1000  # the cap matters at t = 0
        debiased = 1 / (snr + 1) if v else 1 / snr.sqrt()
        assert torch.allclose(Loss(obj, debiased_estimation=True).timestep_weights(t).double(), debiased, rtol=1e-5)
        assert torch.allclose(Loss(obj, scale_v_pred_like_noise_pred=True).timestep_weights(t).double(), scale,
                              rtol=1e-5)
        assert torch.allclose(Loss(obj, v_pred_like_loss=0.2).timestep_weights(t).double(), 1 + 0.2 / scale,
                              rtol=1e-5)
        minsnr = obj.min_snr_weights(t, 5.0).double()
        combined = Loss(obj, 5.0, debiased_estimation=True, v_pred_like_loss=0.2).timestep_weights(t).double()
        assert torch.allclose(combined, minsnr * (1 + 0.2 / scale) * debiased, rtol=1e-5)
    assert Loss(eps_objective()).timestep_weights(t) is None
    # the image weights multiply in
    w = Loss(eps_objective(), debiased_estimation=True).weights(torch.tensor([1.0, 0.5, 1.0, 1.0]), t)
    assert torch.allclose(w[1], 0.5 / eps_objective().snr(t[1:2]).sqrt()[0])


# --- timestep sampling ------------------------------------------------------------------------

def test_timestep_samplings_follow_their_formulas_and_the_range():
    n = 20000
    gen = lambda: step_generator(3, 1, 0)  # noqa: E731
    uniform = TimestepSampler(1000).sample(n, gen())
    ln = TimestepSampler(1000, sampling="logit_normal", logit_mean=1.0, logit_std=0.5).sample(n, gen())
    z = torch.randn(n, generator=gen(), dtype=torch.float64)
    assert torch.equal(ln, torch.floor(torch.sigmoid(1.0 + 0.5 * z) * 1000).long())
    sig = TimestepSampler(1000, 100, 900, sampling="sigmoid", sigmoid_scale=2.0).sample(n, gen())
    assert torch.equal(sig, (100 + torch.floor(torch.sigmoid(2.0 * z) * 800)).long())
    shifted = TimestepSampler(1000, sampling="shift", sigmoid_scale=1.0, shift=3.0).sample(n, gen())
    u = torch.sigmoid(z)
    assert torch.equal(shifted, torch.floor(u * 3 / (1 + 2 * u) * 1000).long())
    assert sig.min() >= 100 and sig.max() < 900
    assert abs(uniform.float().mean().item() - 499.5) < 10
    assert ln.float().median() > 700 and shifted.float().median() > 700  # both lean towards noise
    meta = TimestepSampler(1000, 100, 900, sampling="sigmoid", sigmoid_scale=2.0).metadata()
    assert meta == {"ss_min_timestep": "100", "ss_max_timestep": "900", "ss_timestep_sampling": "sigmoid",
                    "ss_sigmoid_scale": "2.0"}


def test_apt_indicator_per_bin_is_right_when_bins_are_sampled_unevenly():
    """Under a skewed distribution a bin's gamma comes from its own samples only: the per-bin
    losses are means over the bin's samples and each bin's EMA moves only when it is sampled, so
    how often a bin is drawn changes how fast its gamma settles, never its value."""
    ratio = torch.linspace(0.3, 0.95, 10, dtype=torch.float64)  # L_theta / L_ref per bin

    def run(sampler):
        ind = OverfitIndicator(bins=10, ema_alpha=0.2)
        counts = torch.zeros(10)
        for step in range(300):
            t = sampler.sample(8, step_generator(0, step, 0))
            ref = 1 + torch.rand(8, generator=step_generator(1, step, 0), dtype=torch.float64)
            theta = ratio[ind.bin_of(t)] * ref
            ind.update(t, theta, ref)
            counts += torch.bincount(ind.bin_of(t), minlength=10)
        return ind, counts

    skewed, counts = run(TimestepSampler(1000, sampling="logit_normal", logit_mean=-1.5, logit_std=0.6))
    flat, _ = run(TimestepSampler(1000))
    assert counts[0] > 20 * max(counts[8], 1) and counts[9] == 0  # strongly uneven; bin 9 never drawn
    expected = 1 - ratio ** 0.5
    seen = skewed.seen
    assert torch.allclose(skewed.gamma()[seen], expected[seen], atol=1e-9)
    assert torch.allclose(flat.gamma(), expected, atol=1e-9)
    assert skewed.gamma()[9] == 0  # a bin never sampled says nothing


# --- the runs ---------------------------------------------------------------------------------

def masked_images(folder, count: int = 4, size=(64, 64)):
    """Images with a red left half and its mask beside it (<stem>_mask.png)."""
    folder.mkdir(parents=True, exist_ok=True)
    w, h = size
    for i in range(count):
        img = Image.new("RGB", size, (30, 30, 200))
        img.paste((220, 30, 30), (0, 0, w // 2 - 4 * i % 8, h))
        img.save(folder / f"img{i}.png")
        mask = Image.new("L", size, 0)
        mask.paste(255, (0, 0, w // 2 - 4 * i % 8, h))
        mask.save(folder / f"img{i}_mask.png")
        (folder / f"img{i}.txt").write_text(f"a red half {i}")
    return folder


def config_with(tmp_path, model, images, subset: dict | None = None, **training):
    path = tiny_config(tmp_path, model, images, **training)
    if subset:
        extra = "".join(f"{k} = {json.dumps(v)}\n" for k, v in subset.items())
        path.write_text(path.read_text().replace("image_dir = ", extra + "image_dir = "))
    return path


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
@pytest.mark.parametrize("apt", [False, True])
def test_every_feature_trains_end_to_end_and_is_in_the_metadata(tmp_path, tiny_models, arch, apt):
    images = masked_images(tmp_path / "imgs")
    path = config_with(tmp_path, tiny_models[arch], images, {"flip_aug": True, "caption_dropout_rate": 0.5})
    trainer = Trainer(build_config(str(path), [
        ("log_with", "none"), ("apt", str(apt).lower()), ("loss_type", "huber"), ("huber_schedule", "exponential"),
        ("debiased_estimation_loss", "true"), ("timestep_sampling", "logit_normal"), ("logit_mean", "0.5"),
        ("min_timestep", "50"), ("ema", "true"), ("ema_decay", "0.9"), ("masked_loss", "true"),
        ("unmasked_probability", "0.2"), ("unmasked_weight", "0.1")]))
    assert len(trainer.parts.data.records) == 4  # the masks are not training images
    assert trainer.parts.batches.build(trainer.parts.data.epoch_batches(1)[0], 1, 0).mask is not None
    final = trainer.run()
    assert len(trainer.losses) == 3 and all(math.isfinite(v) for v in trainer.losses)
    with safe_open(str(final), "pt") as f:
        meta = f.metadata()
    with safe_open(str(final.with_name("lora-ema.safetensors")), "pt") as f:
        ema_meta = f.metadata()
    assert (meta["ss_loss_type"], meta["ss_huber_schedule"], meta["ss_huber_c"]) == ("huber", "exponential", "0.1")
    assert (meta["ss_debiased_estimation"], meta["ss_timestep_sampling"], meta["ss_logit_mean"]) == \
        ("True", "logit_normal", "0.5")
    assert (meta["ss_min_timestep"], meta["ss_masked_loss"], meta["ss_unmasked_weight"]) == ("50", "True", "0.1")
    assert (meta["ss_ema"], meta["ss_ema_decay"], meta["ss_ema_weights"], ema_meta["ss_ema_weights"]) == \
        ("True", "0.9", "False", "True")
    assert meta["apt_enabled"] == str(apt)


def test_apt_reference_and_indicator_use_the_run_loss(tmp_path, tiny_models, images):
    trainer = tiny_trainer(tmp_path, tiny_models["sd15"], images, ("apt", "true"), ("loss_type", "l1"))
    run = trainer.parts
    batch = first_batch(trainer)
    gen = lambda: step_generator(7, 0, 0)  # noqa: E731
    micro = run.method.step(batch, 0)
    result = run.denoiser.loss(batch, gen(), micro)
    inputs = run.denoiser.noisy_inputs(batch, gen(), method=run.method.step(batch, 0))
    ref = run.denoiser.reference(batch, inputs)
    l1 = (ref.float() - inputs.target.float()).abs().flatten(1).mean(1)
    assert torch.allclose(micro.loss_ref, l1, atol=1e-6)
    l2 = (ref.float() - inputs.target.float()).pow(2).flatten(1).mean(1)
    assert not torch.allclose(micro.loss_ref, l2, atol=1e-3)
    # the tuned loss of the same step is the run's loss too (LoRA up-weights start at zero: equal here)
    assert torch.allclose(result.per_sample, l1, atol=1e-6)


def kohya_of(trainer, params) -> dict[str, torch.Tensor]:
    """The network's file tensors with `params` (one tensor per trained parameter) in place."""
    net = trainer.parts.network
    saved = [p.detach().clone() for p in net.parameters()]
    with torch.no_grad():
        for p, v in zip(net.parameters(), params):
            p.copy_(v)
        out = net.kohya_state_dict(torch.float32)
        for p, v in zip(net.parameters(), saved):
            p.copy_(v)
    return out


def test_ema_equals_the_hand_computed_recurrence_and_is_saved(tmp_path, tiny_models, images):
    trainer = tiny_trainer(tmp_path, tiny_models["sd15"], images, *FP32, ("ema", "true"), ("ema_decay", "0.8"),
                           ("ema_update_every", "2"), ("ema_device", "cpu"), ("save_every_n_steps", "2"),
                           ("save_last_n_steps", "2"), max_train_steps=5)
    params = list(trainer.parts.network.parameters())
    expected = [p.detach().double().clone() for p in params]
    updates = 0

    def listen(report, values):
        nonlocal updates
        if report.step % 2:
            return  # updates after steps 2 and 4 only
        d = min(0.8, (1 + updates) / (10 + updates))  # warm-up: 0.1, then 2/11
        for e, p in zip(expected, params):
            e.mul_(d).add_((1 - d) * p.detach().double())
        updates += 1

    trainer.probe.on_step(listen)
    final = trainer.run()
    assert updates == 2 and trainer.parts.ema.updates == 2
    assert all(a.device.type == "cpu" for a in trainer.parts.ema.shadow)
    for e, a in zip(expected, trainer.parts.ema.shadow):
        assert torch.allclose(a.double(), e, atol=1e-7)
    assert any(not torch.allclose(a, p.detach()) for a, p in zip(trainer.parts.ema.shadow, params))
    names = {p.name for p in final.parent.glob("*.safetensors")}
    assert names == {"lora.safetensors", "lora-ema.safetensors", "lora-step00000004.safetensors",
                     "lora-step00000004-ema.safetensors"}  # step 2's pair pruned together
    saved_ema = load_file(str(final.with_name("lora-ema.safetensors")))
    want = kohya_of(trainer, trainer.parts.ema.shadow)
    assert saved_ema.keys() == want.keys() and all(torch.allclose(saved_ema[k], want[k], atol=1e-7) for k in want)
    # the trained weights are saved as trained, and the network holds them after the EMA save
    saved = load_file(str(final))
    now = trainer.parts.network.kohya_state_dict(torch.float32)
    assert all(torch.equal(saved[k], now[k]) for k in now)


def test_ema_changes_nothing_in_training_with_apt(tmp_path, tiny_models, images):
    runs = {}
    for ema in ("false", "true"):
        folder = tmp_path / ema
        folder.mkdir()
        t = tiny_trainer(folder, tiny_models["sd15"], images, *FP32, ("apt", "true"), ("ema", ema),
                         ("apt.reference_every", "1"))
        t.run()
        runs[ema] = (t.parts.network.kohya_state_dict(torch.float32), t.losses,
                     t.parts.method.controller.indicator.state_dict())
    assert runs["false"][1] == runs["true"][1] and runs["false"][2] == runs["true"][2]
    assert all(torch.equal(runs["false"][0][k], runs["true"][0][k]) for k in runs["false"][0])


def test_ema_resume_equals_a_straight_run(tmp_path, tiny_models):
    images = make_images(tmp_path / "images", 4)
    straight_dir, split_dir = tmp_path / "straight", tmp_path / "split"
    straight_dir.mkdir()
    split_dir.mkdir()
    ema = [*FP32, ("log_with", "none"), ("ema", "true"), ("ema_decay", "0.7"), ("ema_update_every", "2")]
    Trainer(build_config(str(tiny_config(straight_dir, tiny_models["sd15"], images, max_train_steps=6)), ema)).run()
    split = tiny_config(split_dir, tiny_models["sd15"], images, max_train_steps=3)
    Trainer(build_config(str(split), [*ema, ("save_state", "true")])).run()
    assert (split_dir / "out" / "lora-state" / "ema.safetensors").is_file()
    resumed = Trainer(build_config(str(split), [*ema, ("resume", "latest"), ("max_train_steps", "6")]))
    assert resumed.parts.ema.updates == 1
    resumed.run()
    a = load_file(str(straight_dir / "out" / "lora-ema.safetensors"))
    b = load_file(str(split_dir / "out" / "lora-ema.safetensors"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    with pytest.raises(UserError, match="ema_decay = 0.7, this run has 0.5"):
        Trainer(build_config(str(split), [*ema, ("ema_decay", "0.5"), ("resume", "latest"),
                                          ("max_train_steps", "9")]))


# --- masks ------------------------------------------------------------------------------------

def test_mask_images_are_resized_cropped_and_flipped_with_their_image(tmp_path, tiny_models):
    images = masked_images(tmp_path / "imgs", 2, size=(96, 64))
    cond = tmp_path / "cond"
    cond.mkdir()
    for p in images.glob("*_mask.png"):
        p.rename(cond / p.name.replace("_mask", ""))  # kohya's layout: the image's own name
    path = config_with(tmp_path, tiny_models["sd15"], images,
                       {"flip_aug": True, "random_crop": True, "conditioning_data_dir": str(cond)})
    trainer = Trainer(build_config(str(path), [("log_with", "none"), ("masked_loss", "true")]))
    data = trainer.parts.data
    flips = set()
    for epoch in range(1, 6):
        for index in range(2):
            s = data.sample(index, epoch, "0:0")
            flips.add(s.flipped)
            red = (s.pixels[0] - s.pixels[2]) > 0
            agree = (red == (s.mask[0] > 0.5)).float().mean().item()
            assert agree > 0.97, (epoch, index, s.flipped, s.crop_left_top)
    assert flips == {True, False}
    batch = first_batch(trainer)
    assert batch.mask.shape == (2, 1, 8, 8)
    trainer.run()
    assert all(math.isfinite(v) for v in trainer.losses)


def test_masks_in_the_latent_cache_follow_the_mask_file(tmp_path, tiny_models):
    images = masked_images(tmp_path / "imgs", 2)
    path = config_with(tmp_path, tiny_models["sd15"], images)
    over = [("log_with", "none"), ("masked_loss", "true"), ("cache_latents", "true")]
    cached = first_batch(Trainer(build_config(str(path), over)))
    live = first_batch(Trainer(build_config(str(path), over[:2])))
    assert torch.allclose(cached.mask, live.mask) and cached.mask.min() == 0 and cached.mask.max() == 1
    trainer = Trainer(build_config(str(path), over))
    key = trainer.parts.batches.cache.key(0, False)
    Image.new("L", (64, 64), 255).save(images / "img0_mask.png")
    assert Trainer(build_config(str(path), over)).parts.batches.cache.key(0, False) != key


def test_mask_problems_are_one_line_naming_the_image(tmp_path, tiny_models):
    images = masked_images(tmp_path / "imgs", 2)
    path = config_with(tmp_path, tiny_models["sd15"], images)

    def error(*over) -> str:
        code, _, err = run_main(["--config", str(path), "--log_with", "none", *over])
        assert code == 2, err
        line = [x for x in err.strip().splitlines() if x.startswith("error")]
        assert len(line) == 1, err
        return line[0]

    Image.new("L", (32, 64), 255).save(images / "img1_mask.png")
    msg = error("--masked_loss", "true")
    assert "img1.png" in msg and "64x64" in msg and "32x64" in msg
    (images / "img1_mask.png").unlink()
    msg = error("--masked_loss", "true")
    assert "img1.png: no mask image" in msg and "img1_mask.png" in msg
    (images / "img0_mask.png").unlink()  # with conditioning_data_dir, the masks are in that folder
    cond = tmp_path / "cond"
    cond.mkdir()
    Image.new("L", (64, 64), 255).save(cond / "img0.png")
    Image.new("L", (64, 64), 255).save(cond / "stray.png")
    path.write_text(path.read_text().replace("image_dir = ", f'conditioning_data_dir = "{cond}"\nimage_dir = '))
    Image.new("L", (64, 64), 255).save(cond / "img1.png")
    assert "stray.png: a mask image that names no image" in error("--masked_loss", "true")
    (tmp_path / "p").mkdir()
    plain = config_with(tmp_path / "p", tiny_models["sd15"], make_images(tmp_path / "plain", 2))
    code, _, err = run_main(["--config", str(plain), "--log_with", "none", "--unmasked_weight", "0.1"])
    assert code == 2 and "unmasked_weight = 0.1: no image has a loss mask" in err


@pytest.mark.parametrize("over,message", [
    (["--loss_type", "l3"], "loss_type"),
    (["--huber_c", "0"], "huber_c"),
    (["--scale_v_pred_loss_like_noise_pred", "true"], "scale_v_pred_loss_like_noise_pred: only for v-prediction"),
    (["--logit_std", "0.5"], 'logit_std: used only with timestep_sampling = "logit_normal"'),
    (["--timestep_sampling", "sigmoid", "--timestep_shift", "2"], 'timestep_shift: used only with timestep_sampling = "shift"'),
    (["--timestep_sampling", "beta"], "timestep_sampling"),
    (["--ema_decay", "1"], "ema_decay"),
    (["--ema_device", "gpu"], "ema_device"),
    (["--unmasked_probability", "1.5"], "unmasked_probability"),
])
def test_bad_values_are_refused_with_one_line(tmp_path, tiny_models, images, over, message):
    path = tiny_config(tmp_path, tiny_models["sd15"], images)
    code, _, err = run_main(["--config", str(path), "--log_with", "none", *over])
    lines = [x for x in err.strip().splitlines() if x.startswith("error")]
    assert code == 2 and len(lines) == 1 and message in lines[0], err


# --- network_multiplier per dataset -----------------------------------------------------------

def test_dataset_network_multiplier_scales_the_weight_change_while_its_batches_train(tmp_path, tiny_models, images):
    path = tiny_config(tmp_path, tiny_models["sd15"], images)
    path.write_text(path.read_text().replace("resolution = 64", "resolution = 64\nnetwork_multiplier = -1.0"))
    trainer = Trainer(build_config(str(path), [("log_with", "none"), *FP32]))
    run = trainer.parts
    net = run.network
    torch.manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.05)
    batch = first_batch(trainer)
    assert batch.multiplier == -1.0
    scales = [dict(layer.scaling) for _, layer in net.layers.values()]
    negated = run.denoiser.loss(batch, step_generator(7, 0, 0)).per_sample
    assert [dict(layer.scaling) for _, layer in net.layers.values()] == scales  # put back exactly
    with torch.no_grad():
        for _, layer in net.layers.values():
            layer.lora_B["default"].weight.neg_()  # -B A: the weight change of multiplier -1
    batch.multiplier = 1.0
    flipped = run.denoiser.loss(batch, step_generator(7, 0, 0)).per_sample
    assert torch.allclose(negated, flipped, atol=1e-6)
    with torch.no_grad():
        for _, layer in net.layers.values():
            layer.lora_B["default"].weight.neg_()
    plain = run.denoiser.loss(batch, step_generator(7, 0, 0)).per_sample
    assert not torch.allclose(negated, plain, atol=1e-4)
    trainer.run()
    with safe_open(str(tmp_path / "out" / "lora.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["ss_datasets"])[0]["network_multiplier"] == -1.0
    path.write_text(path.read_text().replace("network_multiplier = -1.0", "network_multiplier = 0"))
    code, _, err = run_main(["--config", str(path), "--log_with", "none"])
    assert code == 2 and "network_multiplier: 0 would train nothing" in err
    path.write_text(path.read_text().replace("network_multiplier = 0", "network_multiplier = 0.5"))
    code, _, err = run_main(["--config", str(path), "--log_with", "none", "--network_type", "dora"])
    assert code == 2 and "network_multiplier: DoRA" in err


def test_network_multiplier_holds_over_the_backward_pass_with_gradient_checkpointing(tmp_path, tiny_models, images):
    grads = {}
    for gc in ("false", "true"):
        folder = tmp_path / gc
        folder.mkdir()
        path = tiny_config(folder, tiny_models["sd15"], images)
        path.write_text(path.read_text().replace("resolution = 64", "resolution = 64\nnetwork_multiplier = -1.0"))
        trainer = Trainer(build_config(str(path), [("log_with", "none"), *FP32, ("gradient_checkpointing", gc)]))
        run = trainer.parts
        torch.manual_seed(0)
        with torch.no_grad():
            for p in run.network.parameters():
                p.normal_(0, 0.05)
        params = list(run.network.parameters())
        original = run.optimizer.step

        def step(*args, **kwargs):
            grads[gc] = [p.grad.detach().clone() for p in params]
            return original(*args, **kwargs)

        run.optimizer.step = step
        trainer.train_step(0)
    assert all(torch.allclose(a, b, atol=1e-6, rtol=1e-4) for a, b in zip(grads["false"], grads["true"]))
