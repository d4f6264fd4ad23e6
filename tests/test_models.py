"""Model loading: shipped configs, CLIP tokenizer, single-file layout, detection, clear errors."""
from __future__ import annotations

import json

import pytest
import torch

from library.config.options import ModelOptions
from library.errors import UserError
from library.models import shipped
from library.models.loader import load_models, plan_model
from library.models.families import detect_architecture
from library.models.single_file import read_safetensors_header


def opts(path, **kw) -> ModelOptions:
    return ModelOptions(pretrained_model_name_or_path=str(path), **kw)


def test_clip_tokenizer_is_the_real_vocabulary():
    tok = shipped.load_tokenizer(shipped.tree("sd15") / "tokenizer")
    assert len(tok) == 49408
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    padded = tok("a cat", padding="max_length", max_length=77).input_ids
    assert len(padded) == 77 and padded[-1] == 49407  # SD1 pads with <|endoftext|>
    tok2 = shipped.load_tokenizer(shipped.tree("sdxl") / "tokenizer_2")
    assert tok2("a cat", padding="max_length", max_length=77).input_ids[-1] == 0  # SDXL TE2 pads with "!"


@pytest.mark.parametrize("name,facts", [
    ("sd15", {"unet": {"sample_size": 64, "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2,
                       "cross_attention_dim": 768, "attention_head_dim": 8},
              "vae": {"block_out_channels": [128, 256, 512, 512], "latent_channels": 4, "scaling_factor": 0.18215},
              "text_encoder": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                               "num_attention_heads": 12, "hidden_act": "quick_gelu", "vocab_size": 49408}}),
    ("sdxl", {"unet": {"sample_size": 128, "block_out_channels": [320, 640, 1280],
                       "transformer_layers_per_block": [1, 2, 10], "attention_head_dim": [5, 10, 20],
                       "cross_attention_dim": 2048, "use_linear_projection": True, "addition_embed_type": "text_time",
                       "addition_time_embed_dim": 256, "projection_class_embeddings_input_dim": 2816},
              "vae": {"scaling_factor": 0.13025},
              "text_encoder_2": {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
                                 "num_attention_heads": 20, "hidden_act": "gelu", "projection_dim": 1280}}),
])
def test_shipped_configs_match_the_public_values(name, facts):
    for component, values in facts.items():
        data = json.loads((shipped.tree(name) / component / "config.json").read_text())
        for key, value in values.items():
            assert data[key] == value, (name, component, key)
    sched = json.loads((shipped.tree(name) / "scheduler" / "scheduler_config.json").read_text())
    assert (sched["beta_start"], sched["beta_end"], sched["beta_schedule"], sched["num_train_timesteps"],
            sched["steps_offset"]) == (0.00085, 0.012, "scaled_linear", 1000, 1)


@pytest.mark.parametrize("arch,family,width", [("sd15", "sd1", 32), ("sdxl", "sdxl", 32)])
def test_detects_architecture_from_single_file(tiny_models, arch, family, width):
    header = read_safetensors_header(tiny_models[f"{arch}_single"])
    found = detect_architecture({k: v["shape"] for k, v in header.items() if k != "__metadata__"}, "x")
    assert (found.arch, found.unet_width, found.in_channels) == (family, width, 4)
    plan = plan_model(opts(tiny_models[f"{arch}_single"]))
    assert plan.config_tree.name == f"tiny_{arch}" and plan.native_resolution == 64


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_single_file_and_folder_load_the_same_weights(tiny_models, arch):
    a = load_models(opts(tiny_models[arch]))
    b = load_models(opts(tiny_models[f"{arch}_single"]))
    assert a.arch == b.arch == ("sdxl" if arch == "sdxl" else "sd1")
    pairs = [(a.unet, b.unet), (a.vae, b.vae)] + list(zip(a.text_encoders, b.text_encoders))
    for x, y in pairs:
        sx, sy = x.state_dict(), y.state_dict()
        assert sx.keys() == sy.keys()
        for key in sx:
            assert torch.equal(sx[key], sy[key]), key
    assert a.tokenizers[0]("a dog").input_ids == b.tokenizers[0]("a dog").input_ids


def test_diffusers_from_single_file_reads_our_original_layout(tiny_models):
    from diffusers import StableDiffusionXLPipeline

    tree = shipped.tree("tiny_sdxl")
    pipe = StableDiffusionXLPipeline.from_single_file(
        str(tiny_models["sdxl_single"]), config=str(tree), local_files_only=True,
        tokenizer=shipped.load_tokenizer(tree / "tokenizer"), tokenizer_2=shipped.load_tokenizer(tree / "tokenizer_2"))
    ref = load_models(opts(tiny_models["sdxl"]))
    for key, value in ref.text_encoders[1].state_dict().items():
        assert torch.equal(pipe.text_encoder_2.state_dict()[key], value), key


def test_arch_override_and_folder_detection(tiny_models):
    assert plan_model(opts(tiny_models["sdxl"])).arch == "sdxl"
    assert plan_model(opts(tiny_models["sd15"])).arch == "sd1"
    assert plan_model(opts(tiny_models["sd15"], model_arch="sd2")).arch == "sd2"


def test_separate_vae_file(tiny_models, tmp_path):
    from safetensors.torch import save_file

    base = load_models(opts(tiny_models["sd15"]))
    changed = {k: v + 0.5 for k, v in base.vae.state_dict().items()}
    vae_file = tmp_path / "vae.safetensors"
    save_file(changed, str(vae_file))  # diffusers key layout
    with_vae = load_models(opts(tiny_models["sd15"], vae=str(vae_file)))
    key = "decoder.conv_out.weight"
    assert torch.allclose(with_vae.vae.state_dict()[key], changed[key])


def test_corrupt_and_foreign_files_give_one_line_errors(tmp_path, tiny_models):
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(tiny_models["sd15_single"].read_bytes()[:5000])
    with pytest.raises(UserError, match="cut.safetensors"):
        load_models(opts(truncated))
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 4)
    with pytest.raises(UserError, match="not a readable .safetensors file"):
        plan_model(opts(junk))
    from safetensors.torch import save_file

    other = tmp_path / "other.safetensors"
    save_file({"weight": torch.zeros(2)}, str(other))
    with pytest.raises(UserError, match="no Stable Diffusion UNet found"):
        plan_model(opts(other))
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    with pytest.raises(UserError, match="not a diffusers model folder"):
        plan_model(opts(empty_dir))


def test_inpainting_checkpoint_is_refused(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "inpaint.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 9, 3, 3),
               "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight": torch.zeros(77, 768),
               "first_stage_model.decoder.conv_out.weight": torch.zeros(3, 128, 3, 3)}, str(path))
    with pytest.raises(UserError, match="9 input channels"):
        plan_model(opts(path))


def test_make_tiny_model_tool_writes_a_folder_and_a_single_file(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "tools/make_tiny_model.py", "--arch", "sdxl", "--out", str(tmp_path / "m"),
                           "--single_file", str(tmp_path / "m.safetensors")], cwd=repo, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    folder, single = load_models(opts(tmp_path / "m")), load_models(opts(tmp_path / "m.safetensors"))
    assert folder.arch == single.arch == "sdxl"
    a, b = folder.unet.state_dict(), single.unet.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
