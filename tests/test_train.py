"""End-to-end training on tiny SD1.5 and SDXL models, from folders and single files."""
from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from library.config import build_config
from library.errors import UserError
from library.lora.names import text_encoder_targets, unet_targets
from library.models import shipped
from library.train.diffusion import step_generator
from library.train.loop import Trainer
from tests.helpers import run_main, tiny_config


def lora_file(tmp_path):
    return tmp_path / "out" / "lora.safetensors"


def table_names(arch: str, conv: bool, te: bool) -> set[str]:
    tree = shipped.tree(f"tiny_{arch}")
    family = "sdxl" if arch == "sdxl" else "sd1"
    names = {t.name for t in unet_targets(shipped.read_json(tree / "unet" / "config.json"), family, conv)}
    if te:
        dirs = ["text_encoder"] + (["text_encoder_2"] if arch == "sdxl" else [])
        counts = [shipped.read_json(tree / d / "config.json")["num_hidden_layers"] for d in dirs]
        names |= {t.name for t in text_encoder_targets(family, counts)}
    return names


@pytest.mark.parametrize("model", ["sd15", "sd15_single", "sdxl", "sdxl_single"])
def test_tiny_run_writes_a_kohya_lora(tmp_path, tiny_models, images, model):
    cfg = build_config(str(tiny_config(tmp_path, tiny_models[model], images)), [])
    trainer = Trainer(cfg)
    out = trainer.run()
    assert out == lora_file(tmp_path) and out.is_file()
    assert len(trainer.losses) == 3 and all(torch.isfinite(torch.tensor(trainer.losses)))
    tensors = load_file(str(out))
    arch = model.split("_")[0]
    names = table_names(arch, conv=False, te=False)
    assert {k.rsplit(".", 2)[0] if k.endswith("weight") else k.rsplit(".", 1)[0] for k in tensors} == names
    assert set(tensors) == {f"{n}.{s}" for n in names for s in ("lora_down.weight", "lora_up.weight", "alpha")}
    assert all(k.startswith("lora_unet_") for k in tensors)
    if arch == "sdxl":
        assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight" in tensors
        assert "lora_unet_middle_block_1_transformer_blocks_1_ff_net_2.lora_up.weight" in tensors
    else:
        assert "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight" in tensors
        assert tensors["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"].ndim == 4  # 1x1 conv
    for name in names:
        assert float(tensors[f"{name}.alpha"]) == 2.0
        assert tensors[f"{name}.lora_down.weight"].shape[0] == 4
        assert tensors[f"{name}.lora_up.weight"].dtype == torch.float16  # save_precision default fp16
    # lora_up starts at zero: every module was actually trained.
    assert all(tensors[f"{n}.lora_up.weight"].abs().sum() > 0 for n in names)
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["ss_base_model_version"] == ("sdxl_base_v1-0" if arch == "sdxl" else "sd_v1")
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "2.0" and meta["ss_steps"] == "3"


def test_same_seed_same_weights_other_seed_other_weights(tmp_path, tiny_models, images):
    results = []
    for run, seed in enumerate([7, 7, 8]):
        d = tmp_path / f"run{run}"
        d.mkdir()
        path = tiny_config(d, tiny_models["sd15"], images, seed=seed)
        code, _, err = run_main(["--config", str(path), "--save_precision", "float"])
        assert code == 0, err
        results.append(load_file(str(lora_file(d))))
    assert results[0].keys() == results[1].keys()
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])
    assert any(not torch.equal(results[0][k], results[2][k]) for k in results[0])


def test_loss_decreases_on_a_fixed_batch(tmp_path, tiny_models, images):
    path = tiny_config(tmp_path, tiny_models["sd15"], images, max_train_steps=40)
    cfg = build_config(str(path), [("learning_rate", "1e-2"), ("network_dim", "8")])
    trainer = Trainer(cfg)
    ref = trainer.parts.data.epoch_batches(1)[0]
    batch = trainer.parts.batches.build(ref, 1, 0)

    def fixed_loss() -> float:
        with torch.no_grad():
            return trainer.parts.denoiser.loss(batch, step_generator(123, 0, 0)).loss.item()

    before = fixed_loss()
    trainer.run()
    after = fixed_loss()
    assert after < 0.8 * before, (before, after)


def test_loss_by_timestep_table_reports_ten_times_per_run_with_raw_losses(tmp_path, tiny_models, images):
    path = tiny_config(tmp_path, tiny_models["sd15"], images, max_train_steps=25)
    code, _, err = run_main(["--config", str(path), "--min_snr_gamma", "1", "--log_with", "none"])
    assert code == 0, err
    reports = [line for line in err.splitlines() if "loss by timestep" in line]
    # One report per tenth of the run (whatever the epoch length) and the last one at the end.
    assert len(reports) == 10 and "step 25/25" in reports[-1] and "step 3/25" in reports[0]
    # The per-sample values behind the table are the plain MSE, not the Min-SNR-weighted loss.
    trainer = Trainer(build_config(str(path), [("min_snr_gamma", "1")]))
    batch = trainer.parts.batches.build(trainer.parts.data.epoch_batches(1)[0], 1, 0)
    with torch.no_grad():
        result = trainer.parts.denoiser.loss(batch, step_generator(5, 0, 0))
        weighted, raw = result.loss, result.per_sample
        plain = trainer.parts.denoiser.loss(batch, step_generator(5, 0, 0), weighted=False).loss
    assert torch.allclose(raw.mean(), plain) and not torch.allclose(weighted, plain)


def test_text_encoders_and_conv_layers_with_separate_learning_rates(tmp_path, tiny_models, images):
    path = tiny_config(tmp_path, tiny_models["sdxl"], images, max_train_steps=2)
    cfg = build_config(str(path), [("network_train_unet_only", "false"), ("conv_dim", "2"), ("conv_alpha", "1"),
                                   ("text_encoder_lr", "[1e-5, 3e-5]"), ("unet_lr", "2e-4")])
    trainer = Trainer(cfg)
    lrs = {g["name"]: g["lr"] for g in trainer.parts.optimizer.param_groups}
    assert lrs == {"unet": 2e-4, "te1": 1e-5, "te2": 3e-5}
    trainer.run()
    tensors = load_file(str(lora_file(tmp_path)))
    names = table_names("sdxl", conv=True, te=True)
    assert {k.rsplit(".", 1)[0].removesuffix(".lora_down").removesuffix(".lora_up") for k in tensors} == names
    assert any(k.startswith("lora_te1_text_model_encoder_layers_0_self_attn_q_proj") for k in tensors)
    assert any(k.startswith("lora_te2_text_model_encoder_layers_1_mlp_fc2") for k in tensors)
    conv = "lora_unet_input_blocks_3_0_op"  # SDXL downsampler, 3x3: conv rank and alpha
    assert tensors[f"{conv}.lora_down.weight"].shape[:2] == (2, 32) and float(tensors[f"{conv}.alpha"]) == 1.0
    assert tensors[f"{conv}.lora_up.weight"].shape[2:] == (1, 1)
    skip = "lora_unet_output_blocks_0_0_skip_connection"  # 1x1 conv in a ResNet: linear rank and alpha
    assert tensors[f"{skip}.lora_down.weight"].shape[0] == 4 and float(tensors[f"{skip}.alpha"]) == 2.0
    assert not any("encoder_layers" in k and "text_model" not in k for k in tensors)


def test_network_weights_continues_from_a_file(tmp_path, tiny_models, images):
    first = tiny_config(tmp_path, tiny_models["sd15"], images)
    code, _, err = run_main(["--config", str(first), "--save_precision", "float"])
    assert code == 0, err
    saved = load_file(str(lora_file(tmp_path)))
    cfg = build_config(str(first), [("network_weights", str(lora_file(tmp_path)))])
    trainer = Trainer(cfg)
    state = trainer.parts.network.kohya_state_dict()
    assert all(torch.equal(state[k], saved[k]) for k in saved)
    wrong = build_config(str(first), [("network_weights", str(lora_file(tmp_path))), ("network_dim", "8")])
    with pytest.raises(UserError, match="rank 4 does not match the configured rank 8"):
        Trainer(wrong)


def test_accumulation_bf16_and_checkpointing_run(tmp_path, tiny_models, images):
    path = tiny_config(tmp_path, tiny_models["sdxl"], images, max_train_steps=2)
    cfg = build_config(str(path), [("gradient_accumulation_steps", "2"), ("mixed_precision", "bf16"),
                                   ("gradient_checkpointing", "true")])
    trainer = Trainer(cfg)
    assert trainer.parts.bundle.unet.dtype == torch.bfloat16
    assert trainer.parts.network.layers["lora_unet_input_blocks_4_1_proj_in"][1].lora_A["default"].weight.dtype == \
        torch.float32
    trainer.run()
    assert len(trainer.losses) == 2 and all(map(lambda v: v == v, trainer.losses))


@pytest.mark.parametrize("option,value,message", [
    ("mixed_precision", "fp16", 'mixed_precision = "fp16" needs a CUDA GPU'),
    ("attention", "xformers", 'attention = "xformers"'),
])
def test_gpu_only_options_fail_clearly_on_cpu(tmp_path, tiny_models, images, option, value, message):
    path = tiny_config(tmp_path, tiny_models["sd15"], images)
    code, _, err = run_main(["--config", str(path), f"--{option}", value])
    last = err.strip().splitlines()[-1]
    assert code == 2 and last.startswith("error: ") and message in last and "Traceback" not in err


def test_cpu_threads_use_the_cores_unless_chosen(monkeypatch):
    from library.train import setup
    from library.train.setup import set_cpu_threads, usable_cores

    assert 1 <= usable_cores() <= (__import__("os").cpu_count() or 1)
    before = torch.get_num_threads()
    try:
        monkeypatch.setattr(setup, "usable_cores", lambda: 8)
        assert set_cpu_threads(0, 1) == 8 and torch.get_num_threads() == 8  # not accelerate's OMP_NUM_THREADS=1
        assert set_cpu_threads(0, 2) == 4  # shared among two local DDP processes
        assert set_cpu_threads(3, 1) == 3 and torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)
