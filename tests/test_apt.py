"""APT: indicator, augmentation, weighting, recording processor, RS/AA terms, training runs."""
from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open

from library.apt import augment as aug
from library.apt.attention import Recorder, RecordingAttnProcessor, select_layers
from library.apt.indicator import OverfitIndicator, bin_ranges
from library.apt.losses import attention_loss, token_mask
from library.config import build_config
from library.errors import UserError
from library.lora.network import ADAPTER
from library.train.diffusion import step_generator
from library.train.loop import Trainer
from tests.helpers import first_batch, tiny_config, tiny_trainer


def apt_trainer(tmp_path, tiny_models, images, *overrides, model="sd15", **training) -> Trainer:
    return tiny_trainer(tmp_path, tiny_models[model], images, ("apt", "true"), *overrides, **training)


def apt_loss(trainer, batch, gen=None, step: int = 0):
    """One micro-batch through the shared training step with APT's hooks."""
    return trainer.parts.denoiser.loss(batch, gen or step_generator(0, step, 0), trainer.parts.method.step(batch, step))


# --- indicator --------------------------------------------------------------------------------

@pytest.mark.parametrize("bins", [10, 3, 7])
def test_bin_ranges_label_exactly_the_timesteps_each_bin_receives(bins):
    ind = OverfitIndicator(bins=bins)
    assigned = ind.bin_of(torch.arange(1000))
    ranges = bin_ranges(bins, 1000)
    assert [(int((assigned == b).nonzero().min()), int((assigned == b).nonzero().max())) for b in range(bins)] == ranges
    if bins == 10:
        assert ranges[0] == (0, 99) and ranges[9] == (900, 999)


def test_indicator_bins_ema_first_observation_clamp_and_unseen():
    ind = OverfitIndicator(bins=10, ema_alpha=0.1, num_timesteps=1000, form="paper")
    assert ind.bin_of(torch.tensor([0, 99, 100, 550, 999])).tolist() == [0, 0, 1, 5, 9]
    assert ind.gamma().tolist() == [0.0] * 10
    ind.update(torch.tensor([50, 60]), torch.tensor([0.10, 0.20], dtype=torch.float64),
               torch.tensor([0.101, 0.201], dtype=torch.float64))
    assert ind.ema_theta[0] == pytest.approx(0.15) and ind.ema_ref[0] == pytest.approx(0.151)  # first: the mean
    assert ind.gamma()[0] == pytest.approx(1 - math.exp(-1000 * 0.001))  # a gap of 0.001 gives ~0.63
    assert ind.gamma()[1:].tolist() == [0.0] * 9  # unseen bins
    ind.update(torch.tensor([70]), torch.tensor([0.5]), torch.tensor([0.4]))
    assert ind.ema_theta[0] == pytest.approx(0.9 * 0.15 + 0.1 * 0.5)
    assert ind.ema_ref[0] == pytest.approx(0.9 * 0.151 + 0.1 * 0.4)
    assert ind.gamma()[0] == 0.0  # tuned worse than the reference: clamped at 0
    ind.update(torch.tensor([950]), torch.tensor([0.1]), torch.tensor([0.9]))
    assert ind.gamma()[9] == 1.0  # clamped at 1
    state = ind.state_dict()
    other = OverfitIndicator(form="paper")
    other.load_state_dict(json.loads(json.dumps(state)))
    assert torch.equal(other.gamma(), ind.gamma()) and torch.equal(other.seen, ind.seen)
    assert ind.gamma_at(torch.tensor([955, 5, 300])).tolist() == [1.0, 0.0, 0.0]


def test_relative_indicator_reads_the_gap_as_a_ratio_of_the_losses():
    from library.apt.indicator import RELATIVE_SCALE

    ind = OverfitIndicator()  # the default form
    assert ind.form == "relative" and ind.scale == RELATIVE_SCALE
    t = torch.tensor([50, 950])
    ind.update(t, torch.tensor([0.05, 0.72]), torch.tensor([0.20, 0.80]))  # a quarter and 90% of the reference
    k = RELATIVE_SCALE
    assert ind.gap()[[0, 9]].tolist() == pytest.approx([math.log(4), math.log(0.8 / 0.72)])
    assert ind.gamma()[[0, 9]].tolist() == pytest.approx([1 - 0.25 ** k, 1 - 0.9 ** k])
    assert ind.gamma()[1:9].tolist() == [0.0] * 8  # unseen bins
    # Scale-free: the same ratios at a 100x smaller loss scale give the same gamma; the paper's form
    # reads the same relative progress as ~0 there and as ~1 at the larger scale.
    small = OverfitIndicator()
    small.update(t, torch.tensor([0.0005, 0.0072]), torch.tensor([0.0020, 0.0080]))
    assert small.gamma().tolist() == pytest.approx(ind.gamma().tolist())
    paper = [OverfitIndicator(form="paper") for _ in range(2)]
    paper[0].update(t, torch.tensor([0.05, 0.72]), torch.tensor([0.20, 0.80]))
    paper[1].update(t, torch.tensor([0.0005, 0.0072]), torch.tensor([0.0020, 0.0080]))
    assert paper[0].gamma()[0] > 0.99 and paper[1].gamma()[0] < 0.8
    # Towards 1 only as the tuned loss goes towards 0; worse than the reference: 0.
    perfect = OverfitIndicator()
    perfect.update(t, torch.tensor([1e-9, 0.8]), torch.tensor([0.2, 0.8]))
    assert perfect.gamma()[0] > 0.99 and perfect.gamma()[9] == 0.0
    ind.update(torch.tensor([60]), torch.tensor([2.0]), torch.tensor([0.1]))
    assert ind.gamma()[0] == 0.0
    # The EMA state and the form survive a save and load; a state of the other form is refused.
    other = OverfitIndicator()
    other.load_state_dict(json.loads(json.dumps(ind.state_dict())))
    assert torch.equal(other.gamma(), ind.gamma())
    with pytest.raises(ValueError, match="saved with form = relative, this run has paper"):
        OverfitIndicator(form="paper").load_state_dict(ind.state_dict())
    legacy = {k: v for k, v in OverfitIndicator(form="paper").state_dict().items() if k != "form"}
    OverfitIndicator(form="paper").load_state_dict(legacy)  # states from before the form was saved
    with pytest.raises(ValueError, match="form = paper"):
        OverfitIndicator().load_state_dict(legacy)


# --- augmentation -----------------------------------------------------------------------------

def test_augmentation_rate_follows_gamma_capped_at_p_max():
    gen = torch.Generator().manual_seed(0)
    for gamma, expected in ((0.0, 0.0), (0.3, 0.3), (0.95, 0.8)):
        rates = [aug.draw(torch.full((100,), gamma), 0.8, 3.0, 15.0, gen).rate for _ in range(50)]
        assert abs(sum(rates) / len(rates) - expected) < 0.03, (gamma, sum(rates) / len(rates))
    d = aug.draw(torch.full((1000,), 1.0), 1.0, 3.0, 15.0, gen)
    assert 1.0 <= d.zoom.min() and d.zoom.max() <= 3.0 and d.angle.abs().max() <= 15.0


def test_warp_identity_zoom_and_rotation():
    x = torch.randn(2, 4, 16, 16)
    none = aug.AugmentDraw(torch.tensor([False, False]), torch.ones(2), torch.zeros(2))
    assert torch.equal(aug.apply(x, none, 0.0), x)  # gamma = 0: untouched
    assert torch.allclose(aug.warp(x, torch.ones(2), torch.zeros(2)), x, atol=1e-5)
    img = torch.ones(1, 1, 16, 16)
    zoomed = aug.warp(img, torch.tensor([2.0]), torch.tensor([0.0]), fill=-1.0)
    assert zoomed[0, 0, 8, 8] == pytest.approx(1.0) and zoomed[0, 0, 0, 0] == pytest.approx(-1.0)
    assert (zoomed > 0).float().mean() == pytest.approx(0.25, abs=0.05)  # half the width and height
    stripe = torch.zeros(1, 1, 16, 16)
    stripe[..., :, 7:9] = 1.0  # a vertical bar
    turned = aug.warp(stripe, torch.tensor([1.0]), torch.tensor([90.0]))
    assert turned[0, 0, 7:9, :].mean() > 0.8 and turned[0, 0, :, 7:9].mean() < 0.3  # now horizontal
    fill = torch.tensor([1.0, 2.0, 3.0, 4.0])
    bordered = aug.warp(torch.zeros(1, 4, 8, 8), torch.tensor([3.0]), torch.tensor([0.0]), fill)
    assert torch.allclose(bordered[0, :, 0, 0], fill)


# --- processor --------------------------------------------------------------------------------

def test_recording_processor_matches_stock_and_maps_sum_to_one(tiny_models):
    from diffusers.models.attention_processor import AttnProcessor2_0

    from library.config.options import ModelOptions
    from library.models.loader import load_models

    unet = load_models(ModelOptions(pretrained_model_name_or_path=str(tiny_models["sdxl"]))).unet
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 96, generator=g)
    kw = {"added_cond_kwargs": {"text_embeds": torch.randn(2, 64, generator=g),
                                "time_ids": torch.tensor([[64., 64, 0, 0, 64, 64]] * 2)}}
    unet.set_attn_processor(AttnProcessor2_0())
    with torch.no_grad():
        stock = unet(x, torch.tensor([10, 700]), ctx, **kw).sample
    rec = Recorder()
    names = [k.removesuffix(".processor") for k in unet.attn_processors]
    unet.set_attn_processor({k + ".processor": RecordingAttnProcessor(rec, k, record_maps="probs" if
                             k.endswith("attn2") else None, record_features="output" if k.endswith("attn1") else None)
                             for k in names})
    with torch.no_grad(), rec.recording("ref"):
        recorded = unet(x, torch.tensor([10, 700]), ctx, **kw).sample
    assert (recorded - stock).abs().max() <= 1e-6
    assert len(rec.maps) == len(rec.features) == len(names) // 2
    for maps in rec.maps.values():
        assert maps.shape[0] == 2 and maps.shape[-1] == 77
        assert torch.allclose(maps.sum(-1), torch.ones_like(maps.sum(-1)), atol=1e-5)
    with torch.no_grad():
        quiet = unet(x, torch.tensor([10, 700]), ctx, **kw).sample  # recording off outside APT steps
    assert torch.equal(quiet, recorded) and rec.active is None


def test_layer_selection():
    names = ["down_blocks.1.attentions.0.transformer_blocks.0.attn1", "mid_block.attentions.0.transformer_blocks.0.attn1",
             "up_blocks.0.attentions.2.transformer_blocks.1.attn1"]
    assert select_layers(names, ("all",)) == names
    assert select_layers(names, ("mid",)) == names[1:2]
    assert select_layers(names, ("down", "up_blocks.0")) == [names[0], names[2]]
    with pytest.raises(UserError, match=r"\[apt\] rs_layers: 'up_blocks.9' matches no attention layer"):
        select_layers(names, ("mid", "up_blocks.9"), "rs_layers")  # a typo must not switch RS off there


def test_token_mask_and_attention_distances():
    ids = torch.tensor([[49406, 320, 5000, 49407, 49407, 49407], [49406, 5000, 49407, 0, 0, 0]])
    assert token_mask(ids, 49407, True, []).tolist() == [[1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0]]
    assert token_mask(ids, 49407, True, [5000]).tolist() == [[1, 1, 0, 1, 0, 0], [1, 0, 1, 0, 0, 0]]
    assert token_mask(ids, 49407, False, []).sum() == 12
    rec = Recorder()
    a = torch.softmax(torch.randn(2, 5, 6), -1)
    rec.maps[("l", "ref")] = a
    rec.maps[("l", "tuned")] = a.clone()
    for distance in ("mse", "kl", "logits"):
        assert attention_loss(rec, None, distance).item() == pytest.approx(0.0, abs=1e-7)
    rec.maps[("l", "tuned")] = torch.softmax(torch.randn(2, 5, 6), -1)
    for distance in ("mse", "kl"):
        assert attention_loss(rec, None, distance) > 0
    masked = attention_loss(rec, torch.zeros(2, 6), "mse")
    assert masked.item() == 0.0  # every token excluded


# --- the APT step -----------------------------------------------------------------------------

@pytest.mark.parametrize("model", ["sd15", "sdxl"])
def test_at_step_zero_everything_is_zero(tmp_path, tiny_models, images, model):
    trainer = apt_trainer(tmp_path, tiny_models, images, model=model)
    batch = first_batch(trainer)
    micro = trainer.parts.method.step(batch, 0)
    with trainer.parts.accelerator.autocast():
        result = trainer.parts.denoiser.loss(batch, step_generator(0, 0, 0), micro)
    assert torch.equal(result.per_sample, micro.loss_ref)  # LoRA up-weights are zero: same prediction
    assert result.stats["apt/l_mu"] == 0 and result.stats["apt/l_sigma"] == 0 and result.stats["apt/l_attn"] == 0
    assert result.stats["apt/augment_rate"] == 0.0 and result.stats["apt/loss_weight"] == 1.0
    trainer.parts.method.end_step(0, [(result, batch)])
    apt = trainer.parts.method.controller
    assert apt.indicator.seen.any() and apt.indicator.gamma().max() == 0.0
    assert apt.layers["rs"] and apt.layers["aa"]


def test_apt_terms_reach_only_lora_parameters(tmp_path, tiny_models, images):
    trainer = apt_trainer(tmp_path, tiny_models, images, ("apt.lambda_attn", "100"))
    with torch.no_grad():
        for _, layer in trainer.parts.network.layers.values():
            layer.lora_B[ADAPTER].weight.normal_(0, 0.05)
    batch = first_batch(trainer)
    result = apt_loss(trainer, batch)
    terms = trainer.parts.method.controller.regularisers(trainer.parts.denoiser.conditioning.tokenize(batch.captions)[0])
    assert terms.l_mu > 0 and terms.l_sigma > 0 and terms.l_attn > 0
    trainer.parts.optimizer.zero_grad(set_to_none=True)
    terms.total(1.0, 1.0).backward()
    lora = {id(p) for p in trainer.parts.network.parameters()}
    with_grad = [(n, p) for n, p in trainer.parts.bundle.unet.named_parameters() if p.grad is not None]
    assert with_grad and all(id(p) in lora for _, p in with_grad)
    assert any(p.grad.abs().sum() > 0 for _, p in with_grad)
    assert result.loss.requires_grad


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tmp_path, tiny_models, images):
    results = []
    for checkpointing in ("false", "true"):
        d = tmp_path / checkpointing
        d.mkdir()
        trainer = apt_trainer(d, tiny_models, images, ("gradient_checkpointing", checkpointing), model="sdxl")
        with torch.no_grad():
            for _, layer in trainer.parts.network.layers.values():
                layer.lora_B[ADAPTER].weight.copy_(torch.linspace(-0.05, 0.05, layer.lora_B[ADAPTER].weight.numel())
                                                   .reshape(layer.lora_B[ADAPTER].weight.shape))
        result = apt_loss(trainer, first_batch(trainer))
        result.loss.backward()
        trainer.parts.method.after_backward()
        grads = {n: p.grad.clone() for n, p in trainer.parts.bundle.unet.named_parameters() if p.grad is not None}
        results.append((result.loss.item(), grads, result.stats))
    (loss_a, grads_a, stats_a), (loss_b, grads_b, stats_b) = results
    assert loss_a == pytest.approx(loss_b, rel=1e-6) and stats_a["apt/l_attn"] > 0
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        assert torch.allclose(grads_a[name], grads_b[name], atol=1e-6, rtol=1e-4), name


@pytest.mark.parametrize("model,overrides", [
    ("sd15", []),
    ("sdxl", []),
    ("sd15", [("apt.augment", "false")]),
    ("sd15", [("apt.loss_weighting", "false")]),
    ("sdxl", [("apt.rs", "false")]),
    ("sdxl", [("apt.aa", "false")]),
    ("sd15", [("apt.augment_space", "pixel"), ("apt.aa_distance", "kl"), ("apt.rs_features", "qkv")]),
    ("sdxl", [("mixed_precision", "bf16"), ("gradient_checkpointing", "true")]),  # bf16 autocast, as on GPUs
    ("sdxl", [("apt.aa_distance", "logits"), ("apt.aa_exclude_token", "shape"), ("apt.rs_layers", "[\"up\"]"),
              ("apt.aa_layers", "[\"mid\", \"down_blocks.2\"]"), ("apt.min_weight", "0.2")]),
])
def test_end_to_end_runs_with_each_component(tmp_path, tiny_models, images, model, overrides):
    # 5 steps: the last one (step index 4) runs the reference pass under the default reference_every = 4
    trainer = apt_trainer(tmp_path, tiny_models, images, ("learning_rate", "5e-3"), *overrides, model=model,
                          max_train_steps=5)
    out = trainer.run()
    assert all(math.isfinite(v) for v in trainer.losses)
    gamma = trainer.parts.method.controller.indicator.gamma()
    assert trainer.parts.method.controller.indicator.seen.any() and (gamma >= 0).all() and (gamma <= 1).all()
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["apt_enabled"] == "True"
    assert json.loads(meta["apt_indicator"]) == [round(float(g), 6) for g in gamma]
    settings = json.loads(meta["apt_settings"])
    for key, value in overrides:
        if key.startswith("apt.") and value in ("true", "false"):
            assert settings[key[4:]] == (value == "true")
    # A component switched off does nothing (the last step's APT statistics).
    off = {key for key, value in overrides if value == "false"}
    stats = trainer.parts.method.last_stats
    if "apt.rs" in off:
        assert stats["apt/l_mu"] == 0 and stats["apt/l_sigma"] == 0
    if "apt.aa" in off:
        assert stats["apt/l_attn"] == 0
    if "apt.augment" in off:
        assert stats["apt/augment_rate"] == 0
    if "apt.loss_weighting" in off:
        assert stats["apt/loss_weight"] == 1
    assert (tmp_path / "out" / "apt_indicator.png").is_file()
    rows = (tmp_path / "out" / "apt_indicator.csv").read_text().strip().split("\n")
    assert rows[0].startswith("step,t0-99,") and len(rows) == 6


def test_indicator_is_logged_and_restored_on_resume(tmp_path, tiny_models, images):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    straight = tmp_path / "straight"
    straight.mkdir()
    path = tiny_config(straight, tiny_models["sd15"], images, max_train_steps=6)
    full = Trainer(build_config(str(path), [("apt", "true"), ("save_precision", "float"), ("learning_rate", "5e-3")]))
    full.run()
    logs = list((straight / "out" / "logs").rglob("events.out.tfevents.*"))
    acc = EventAccumulator(str(logs[0].parent))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    for tag in ("apt/gamma_t000", "apt/gamma_t900", "apt/augment_rate", "apt/loss_weight", "apt/l_mu", "apt/l_sigma",
                "apt/l_attn", "apt/loss_theta", "apt/loss_ref"):
        assert tag in tags, tag
    split = tmp_path / "split"
    split.mkdir()
    path = tiny_config(split, tiny_models["sd15"], images, max_train_steps=3)
    common = [("apt", "true"), ("save_precision", "float"), ("learning_rate", "5e-3"), ("log_with", "none")]
    Trainer(build_config(str(path), [*common, ("save_state", "true")])).run()
    resumed = Trainer(build_config(str(path), [*common, ("resume", "latest"), ("max_train_steps", "6")]))
    state = json.loads((split / "out" / "lora-state" / "state.json").read_text())["extra"]["apt"]["indicator"]
    assert resumed.parts.method.controller.indicator.state_dict() == state  # restored exactly
    resumed.run()
    assert torch.allclose(resumed.parts.method.controller.indicator.gamma(), full.parts.method.controller.indicator.gamma(), atol=1e-9)
    assert resumed.parts.method.controller.history.steps == list(range(1, 7))
