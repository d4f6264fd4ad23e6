"""The extension seams: a model family, a training method and the probe, added or used from outside
the core (nothing in library/ is edited for them)."""
from __future__ import annotations

import math

import pytest
import torch

from library.errors import UserError
from library.lora.kohya_file import read_lora
from library.models.families import get_family
from library.models.family import register_family, unregister_family
from library.models.objectives import FlowMatchingObjective
from library.models.stable_diffusion import SD1
from library.train.method import MethodStep, TrainingMethod, methods, register_method, selected_method, unregister_method
from tests.helpers import first_batch, tiny_trainer


class ToyFlowFamily(SD1):
    """SD1.x's components trained with rectified flow: another objective, another prediction call and
    other metadata, chosen by model_arch only."""
    name, label = "toyflow", "toy flow-matching"
    auto_detect = False
    catch_all = False
    predictions = 0

    def base_model_version(self, v_parameterization):
        return "toyflow_v1"

    def modelspec_architecture(self, v_parameterization):
        return "toyflow/lora"

    def objective(self, scheduler_config, v_parameterization, zero_terminal_snr):
        return FlowMatchingObjective(shift=3.0)

    def predict(self, model, noisy, timesteps, cond, size_info):
        type(self).predictions += 1
        return model(noisy, timesteps, cond.hidden_states).sample


@pytest.fixture
def toy_family():
    family = register_family(ToyFlowFamily())
    try:
        yield family
    finally:
        unregister_family(family.name)


def test_a_toy_family_trains_end_to_end_without_editing_the_core(tmp_path, tiny_models, images, toy_family):
    trainer = tiny_trainer(tmp_path, tiny_models["sd15"], images, ("model_arch", "toyflow"), max_train_steps=2)
    denoiser = trainer.parts.denoiser
    assert isinstance(denoiser.objective, FlowMatchingObjective) and trainer.probe.family is toy_family
    latents, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = torch.tensor([0, 999])
    assert torch.allclose(denoiser.objective.target(latents, noise, t), noise - latents)
    assert torch.allclose(denoiser.objective.add_noise(latents, noise, t)[1], noise[1])  # t = T - 1: pure noise
    before = ToyFlowFamily.predictions
    trainer.run()
    assert ToyFlowFamily.predictions - before == 2 and all(math.isfinite(v) for v in trainer.losses)
    _, meta = read_lora(tmp_path / "out" / "lora.safetensors")
    assert meta["ss_base_model_version"] == "toyflow_v1" and meta["modelspec.architecture"] == "toyflow/lora"
    assert meta["ss_objective"] == "flow-matching" and meta["ss_flow_shift"] == "3.0"


def test_flow_matching_objective_math():
    obj = FlowMatchingObjective(num_timesteps=1000, shift=1.0)
    latents, noise = torch.ones(3, 1, 2, 2), torch.zeros(3, 1, 2, 2)
    t = torch.tensor([99, 499, 999])
    s = torch.tensor([0.1, 0.5, 1.0])
    assert torch.allclose(obj.add_noise(latents, noise, t), (1 - s).view(-1, 1, 1, 1) * latents)
    snr = obj.snr(t)
    assert torch.allclose(snr[:2], ((1 - s[:2]) / s[:2]) ** 2) and snr[2] < 1e-9
    shifted = FlowMatchingObjective(shift=3.0).sigmas(torch.tensor([499]))
    assert torch.allclose(shifted, torch.tensor([1.5 / 2.0]))  # 3s / (1 + 2s) at s = 0.5: towards noise


def test_unknown_model_arch_names_the_families(tmp_path, tiny_models, images):
    with pytest.raises(UserError, match=r"model_arch: 'sd3' is not a model family; valid: auto, sdxl, sd2, sd1"):
        tiny_trainer(tmp_path, tiny_models["sd15"], images, ("model_arch", "sd3"))
    assert get_family("sdxl").lora_unet_naming == "sgm" and get_family("sd1").lora_unet_naming == "diffusers"


class HalfLossMethod(TrainingMethod):
    """A toy method from outside the core: every sample's loss at half weight."""
    name = "half_loss_test"
    inactive_metadata = {"half_loss": "False"}

    def step(self, batch, step):
        class Half(MethodStep):
            def sample_weights(self):
                return torch.full((len(batch.records),), 0.5)
        return Half()

    def metadata(self):
        return {"half_loss": "True"}


@pytest.fixture
def half_loss():
    register_method(HalfLossMethod)
    try:
        yield HalfLossMethod
    finally:
        unregister_method(HalfLossMethod.name)


def test_a_registered_method_plugs_into_the_step_and_the_metadata(tmp_path, tiny_models, images, half_loss):
    trainer = tiny_trainer(tmp_path, tiny_models["sd15"], images, max_train_steps=1)
    assert selected_method(trainer.cfg) is TrainingMethod and "apt" in methods()
    batch = first_batch(trainer)
    plain = trainer.parts.denoiser.loss(batch, torch.Generator().manual_seed(0)).loss
    trainer.probe.use_method("half_loss_test")
    half = trainer.parts.denoiser.loss(batch, torch.Generator().manual_seed(0),
                                       trainer.parts.method.step(batch, 0)).loss
    assert torch.allclose(half, plain * 0.5)
    trainer.run()
    _, meta = read_lora(tmp_path / "out" / "lora.safetensors")
    assert meta["half_loss"] == "True" and meta["apt_enabled"] == "False"  # APT says it was off


def test_apt_attaches_its_processors_and_detaches_back_to_the_stock_ones(tmp_path, tiny_models, images):
    trainer = tiny_trainer(tmp_path, tiny_models["sd15"], images, max_train_steps=1)
    family, unet = trainer.probe.family, trainer.parts.bundle.unet
    stock = family.attention_processors(unet)
    batch = first_batch(trainer)
    before = trainer.probe.predictions(batch, torch.tensor([300, 700]), seed=1)
    trainer.probe.use_method("apt")
    recording = family.attention_processors(unet)
    assert {type(p).__name__ for p in recording.values()} >= {"RecordingAttnProcessor"}
    assert torch.equal(trainer.probe.predictions(batch, torch.tensor([300, 700]), seed=1), before)
    trainer.probe.use_method("plain")
    after = family.attention_processors(unet)
    assert after.keys() == stock.keys() and all(after[k] is stock[k] for k in stock)


def test_probe_reports_every_step_and_switches_adapters_back(tmp_path, tiny_models, images):
    trainer = tiny_trainer(tmp_path, tiny_models["sd15"], images, ("apt", "true"), max_train_steps=3)
    probe = trainer.probe
    seen = []
    probe.on_step(lambda report, values: seen.append((report.step, values["loss"], probe.indicator()["gamma"])))
    trainer.run()
    assert [s for s, _, _ in seen] == [1, 2, 3] and [v for _, v, _ in seen] == trainer.losses
    assert all(len(g) == 10 for _, _, g in seen)
    batch = probe.training_batch()
    t = torch.tensor([500] * len(batch.records))
    tuned = probe.losses(batch, t, seed=3)
    with probe.adapters(False):
        base = probe.losses(batch, t, seed=3)
        with probe.adapters(True):
            assert torch.equal(probe.losses(batch, t, seed=3), tuned)
        assert torch.equal(probe.losses(batch, t, seed=3), base)  # the inner block restored "off"
    assert not torch.equal(tuned, base) and trainer.parts.network.enabled
