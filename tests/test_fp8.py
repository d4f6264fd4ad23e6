"""Frozen base weights in float8 (fp8_base / fp8_base_unet): the layers compute what their
dequantised weights compute, keep no full-precision weight copy for backward, and train."""
from __future__ import annotations

import copy

import pytest
import torch
from safetensors import safe_open
from torch import nn

from library.errors import UserError
from library.models.fp8 import FP8, base_weight, store_in_fp8
from library.train.diffusion import step_generator
from library.utils.memory import SavedTensors
from tests.helpers import first_batch, tiny_config, tiny_trainer


def by_hand(weight: torch.Tensor) -> torch.Tensor:
    """The dequantised weight, computed independently: each output channel scaled so that its
    largest magnitude is 448, rounded to float8 e4m3, scaled back."""
    w = weight.float()
    rows = w.reshape(w.shape[0], -1)
    scale = (rows.abs().amax(dim=1) / 448.0).reshape(-1, *[1] * (w.dim() - 1))
    return (w / scale).to(torch.float8_e4m3fn).float() * scale


def with_first(layer: nn.Module) -> nn.Module:
    """`layer` behind a small frozen first layer: store_in_fp8 leaves a model's first parameter as
    it is (pipelines read the model's dtype from it)."""
    return nn.Sequential(nn.LayerNorm(3), layer).requires_grad_(False)


def frozen_pair(layer: nn.Module):
    """(the layer stored in float8, a plain copy with the dequantised weight by hand)."""
    layer.requires_grad_(False)
    plain = copy.deepcopy(layer)
    plain.weight = nn.Parameter(by_hand(layer.weight), requires_grad=False)
    assert store_in_fp8(with_first(layer)) == layer.weight.numel()
    return layer, plain


@pytest.mark.parametrize("conv", [False, True])
@pytest.mark.parametrize("autocast", [False, True])
def test_an_fp8_layer_computes_what_its_dequantised_weight_computes(conv, autocast):
    torch.manual_seed(0)
    layer = nn.Conv2d(6, 8, 3, padding=1) if conv else nn.Linear(12, 10)
    with torch.no_grad():
        layer.weight.mul_(torch.logspace(-3, 0, layer.weight.shape[0]).reshape(-1, *[1] * (layer.weight.dim() - 1)))
    fp8, plain = frozen_pair(layer)
    assert fp8.weight.dtype == FP8 and not fp8.weight.requires_grad
    x = torch.randn(2, 6, 5, 5) if conv else torch.randn(3, 12)
    outs, grads = [], []
    for module in (fp8, plain):
        xi = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = module(xi)
        (y.float() * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum().backward()
        outs.append(y)
        grads.append(xi.grad)
    assert outs[0].dtype == outs[1].dtype == (torch.bfloat16 if autocast else torch.float32)
    tol = dict(rtol=2e-2, atol=2e-2) if autocast else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(outs[0], outs[1], **tol)
    torch.testing.assert_close(grads[0], grads[1], **tol)
    assert grads[0].dtype == torch.float32  # the input's gradient in the input's dtype


def test_per_channel_scales_keep_small_weights_that_a_plain_cast_loses():
    torch.manual_seed(0)
    w = torch.randn(64, 64) * 0.004  # the size of many SD attention weights' rows, float8's subnormal range
    layer = nn.Linear(64, 64, bias=False).requires_grad_(False)
    layer.weight.data.copy_(w)
    store_in_fp8(with_first(layer))
    ours = (base_weight(layer, torch.float32) - w).abs().mean() / w.abs().mean()
    plain = (w.to(FP8).float() - w).abs().mean() / w.abs().mean()
    assert ours < 0.04 < 0.1 < plain, (ours, plain)


def test_an_fp8_forward_saves_no_full_precision_weight_for_backward():
    """kohya's way (float8 weights under autocast) saves each layer's bf16 copy for backward:
    as many bytes as a bf16 model. Here the layers save nothing weight-sized."""
    torch.manual_seed(0)

    def stack():
        return nn.Sequential(nn.LayerNorm(256), *[nn.Linear(256, 256, bias=False) for _ in range(4)]).requires_grad_(False)

    ours, kohya = stack(), stack()
    store_in_fp8(ours)
    for layer in kohya[1:]:
        layer.to(FP8)
    weight_bytes_bf16 = 4 * 256 * 256 * 2
    saved = {}
    for name, model in (("ours", ours), ("autocast", kohya)):
        x = torch.randn(8, 256, requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16), SavedTensors(exclude=list(model.parameters())) as count:
            model(x).float().sum().backward()
        saved[name] = count.bytes
    assert saved["autocast"] >= weight_bytes_bf16  # the cast weights kept alive until backward
    assert saved["ours"] < weight_bytes_bf16 / 20, saved  # inputs of the adapters only: none here


def test_fp8_base_stores_the_unet_and_text_encoders_and_trains(tmp_path, tiny_models, images):
    runs = {}
    for name, overrides in (("bf16", []), ("fp8", [("fp8_base", "true")]), ("unet", [("fp8_base_unet", "true")])):
        (tmp_path / name).mkdir()
        trainer = tiny_trainer(tmp_path / name, tiny_models["sdxl"], images, ("mixed_precision", "bf16"),
                               ("apt", "true"), *overrides)
        parts = trainer.parts
        unet, encoders = parts.bundle.unet, parts.bundle.text_encoders
        # the base layers (the adapters' own Linear layers train, in fp32)
        dtypes = {"unet": {m.weight.dtype for m in unet.modules()
                           if type(m) in (nn.Linear, nn.Conv2d) and not m.weight.requires_grad},
                  "te": {m.weight.dtype for te in encoders for m in te.modules()
                         if type(m) is nn.Linear and not m.weight.requires_grad}}
        batch = first_batch(trainer)
        method = parts.method
        with parts.accelerator.autocast():
            loss = parts.denoiser.loss(batch, step_generator(0, 0, 0), method.step(batch, 0)).loss
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in parts.network.parameters() if p.grad is not None])
        runs[name] = (dtypes, loss.detach(), grads, unet)
    assert runs["bf16"][0] == {"unet": {torch.bfloat16}, "te": {torch.bfloat16}}
    # the UNet's first layer stays in bf16: pipelines read a model's dtype from its first parameter
    assert runs["fp8"][0] == {"unet": {FP8, torch.bfloat16}, "te": {FP8}}
    assert runs["unet"][0] == {"unet": {FP8, torch.bfloat16}, "te": {torch.bfloat16}}
    assert runs["fp8"][3].dtype == torch.bfloat16 and runs["fp8"][3].conv_in.weight.dtype == torch.bfloat16
    # The same step, close to the bf16 one: float8 moves it a little, not somewhere else.
    _, loss_ref, grads_ref, _ = runs["bf16"]
    for name in ("fp8", "unet"):
        _, loss, grads, unet = runs[name]
        assert torch.isfinite(loss) and abs(loss.item() - loss_ref.item()) < 0.05 * loss_ref.item() + 1e-3
        assert torch.nn.functional.cosine_similarity(grads.float(), grads_ref.float(), dim=0) > 0.95
        # no broadcast of float8 weights, under the names the adapters gave them
        ignored = unet._ddp_params_and_buffers_to_ignore
        assert "conv_out.weight" in ignored and any(n.endswith("to_q.base_layer.weight") for n in ignored)
    bf16_bytes = sum(p.numel() * p.element_size() for p in runs["bf16"][3].parameters())
    fp8_bytes = sum(p.numel() * p.element_size() for p in runs["fp8"][3].parameters())
    assert fp8_bytes < 0.6 * bf16_bytes


@pytest.mark.parametrize("model", ["sd15", "sdxl"])
def test_an_fp8_run_samples_writes_its_lora_and_says_so_in_the_metadata(tmp_path, tiny_models, images, model):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle --s 2 --d 11\n")
    files = {}
    for name, overrides in (("fp8", [("fp8_base", "true"), ("sample_prompts", str(prompts)),
                                     ("sample_every_n_steps", "2"), ("sample_compare_base", "true")]), ("plain", [])):
        (tmp_path / name).mkdir()
        tiny_trainer(tmp_path / name, tiny_models[model], images, ("mixed_precision", "bf16"), *overrides,
                     max_train_steps=2).run()
        with safe_open(str(tmp_path / name / "out" / "lora.safetensors"), "pt") as f:
            files[name] = (f.metadata(), {k: f.get_tensor(k) for k in f.keys()})
    (meta, tensors), (plain_meta, plain_tensors) = files["fp8"], files["plain"]
    assert meta["ss_fp8_base"] == "True" and meta["ss_fp8_base_unet"] == "False" and plain_meta["ss_fp8_base"] == "False"
    assert tensors.keys() == plain_tensors.keys() and any(k.endswith("lora_up.weight") for k in tensors)
    assert all(t.dtype == plain_tensors[k].dtype for k, t in tensors.items())  # adapters never in float8
    assert sorted(p.name for p in (tmp_path / "fp8" / "out" / "sample").glob("*_00_11.png"))  # sampling ran


def test_fp8_base_refuses_dora_with_one_line(tmp_path, tiny_models, images):
    from library.config import build_config

    path = tiny_config(tmp_path, tiny_models["sd15"], images)
    with pytest.raises(UserError, match=r"\[training\] fp8_base: .*DoRA|dora") as err:
        build_config(str(path), [("fp8_base", "true"), ("network_type", "dora")])
    assert "\n" not in str(err.value)
