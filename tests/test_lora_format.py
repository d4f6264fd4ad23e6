"""The LoRA file format: golden name tables, diffusers as an independent loader, round trips."""
from __future__ import annotations

import hashlib
import logging
import struct
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from library.lora.kohya_file import data_section
from library.lora.names import text_encoder_targets, unet_targets
from library.models import shipped

GOLDEN = Path(__file__).parent / "golden"


def full_size_models(tree_name: str):
    """(arch, UNet, text encoders) of a shipped full-size architecture on the meta device (no weights)."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tree = shipped.tree(tree_name)
    arch = "sdxl" if tree_name == "sdxl" else "sd1"
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(shipped.read_json(tree / "unet" / "config.json"))
        encoders = [CLIPTextModel(CLIPTextConfig.from_pretrained(str(tree / "text_encoder")))]
        if arch == "sdxl":
            encoders.append(CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(str(tree / "text_encoder_2"))))
    return arch, unet, encoders


def full_size_table(tree_name: str) -> list[str]:
    """'name kind in out [kernel]' for every module of the full-size architecture (conv included),
    with the module shapes read from meta-device models built from the shipped configs."""
    arch, unet, encoders = full_size_models(tree_name)
    models = {"unet": dict(unet.named_modules())}
    for i, te in enumerate(encoders):
        models[f"te{i + 1}"] = dict(te.named_modules())
    targets = unet_targets(unet.config, arch, include_conv=True) + \
        text_encoder_targets(arch, [te.config.num_hidden_layers for te in encoders])
    rows = []
    for t in targets:
        mods = models[t.component]
        module = mods.get(t.path) or mods[t.path.removeprefix("text_model.")]
        if isinstance(module, torch.nn.Conv2d):
            kh, kw = module.kernel_size
            rows.append(f"{t.name} conv {module.in_channels} {module.out_channels} {kh}x{kw}"
                        f"{' conv_set' if t.conv_set else ''}")
        else:
            rows.append(f"{t.name} linear {module.in_features} {module.out_features}{' conv_set' if t.conv_set else ''}")
    return sorted(rows)


@pytest.mark.parametrize("name,total,with_conv,counts", [
    ("sd15", 264, 350, {"lora_unet": 192, "lora_te": 72}),
    ("sdxl", 986, 1052, {"lora_unet": 722, "lora_te1": 72, "lora_te2": 192}),
])
def test_full_size_name_tables_are_golden(name, total, with_conv, counts):
    rows = full_size_table(name)
    golden = (GOLDEN / f"{name}_lora_modules.txt").read_text().split("\n")[:-1]
    assert rows == golden
    names = [r.split()[0] for r in rows]
    plain = [r for r in rows if "conv_set" not in r]
    assert len(plain) == total and len(rows) == with_conv
    assert Counter("_".join(r.split()[0].split("_")[:2]) for r in plain) == counts
    assert not any("encoder_layers" in n and "text_model_encoder_layers" not in n for n in names)
    assert all("." not in n for n in names)


def test_golden_tables_spell_the_facts():
    sd15 = {r.split()[0]: r.split()[1:] for r in (GOLDEN / "sd15_lora_modules.txt").read_text().split("\n") if r}
    sdxl = {r.split()[0]: r.split()[1:] for r in (GOLDEN / "sdxl_lora_modules.txt").read_text().split("\n") if r}
    assert sd15["lora_unet_down_blocks_0_attentions_0_proj_in"] == ["conv", "320", "320", "1x1"]  # SD1.5: 1x1 conv
    assert sd15["lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn2_to_k"] == ["linear", "768", "320"]
    assert sd15["lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_0_proj"] == ["linear", "1280", "10240"]
    assert sd15["lora_te_text_model_encoder_layers_11_mlp_fc2"] == ["linear", "3072", "768"]
    assert sd15["lora_unet_down_blocks_0_resnets_0_conv1"] == ["conv", "320", "320", "3x3", "conv_set"]
    assert sdxl["lora_unet_input_blocks_4_1_proj_in"] == ["linear", "640", "640"]  # SDXL: linear projections
    assert sdxl["lora_unet_middle_block_1_transformer_blocks_9_attn2_to_k"] == ["linear", "2048", "1280"]
    assert sdxl["lora_unet_output_blocks_0_1_transformer_blocks_9_ff_net_2"] == ["linear", "5120", "1280"]
    assert sdxl["lora_te2_text_model_encoder_layers_31_self_attn_out_proj"] == ["linear", "1280", "1280"]
    assert sdxl["lora_te1_text_model_encoder_layers_0_self_attn_q_proj"] == ["linear", "768", "768"]
    for extra in ("lora_unet_input_blocks_3_0_op", "lora_unet_input_blocks_6_0_op", "lora_unet_output_blocks_2_2_conv",
                  "lora_unet_output_blocks_5_2_conv", "lora_unet_input_blocks_1_0_in_layers_2",
                  "lora_unet_input_blocks_1_0_out_layers_3", "lora_unet_input_blocks_1_0_emb_layers_1",
                  "lora_unet_input_blocks_4_0_skip_connection"):
        assert "conv_set" in sdxl[extra], extra
    assert not any(n.startswith(("lora_unet_down_blocks", "lora_unet_up_blocks", "lora_unet_mid_block")) for n in sdxl)
    assert not any(n.startswith(("lora_unet_input_blocks", "lora_unet_output_blocks")) for n in sd15)
    for layer in range(32):  # TE2 attention always as a full q/k/v/out set (A1111 skips partial sets)
        for m in ("q_proj", "k_proj", "v_proj", "out_proj"):
            assert f"lora_te2_text_model_encoder_layers_{layer}_self_attn_{m}" in sdxl


def test_sshs_model_hash_is_the_data_section_sha256(tmp_path, tiny_models):
    from safetensors import safe_open

    from library.lora.kohya_file import write_lora

    tensors = {"lora_unet_x.lora_down.weight": torch.randn(2, 3), "lora_unet_x.lora_up.weight": torch.randn(3, 2),
               "lora_unet_x.alpha": torch.tensor(1.0)}
    path = tmp_path / "l.safetensors"
    digest = write_lora(path, tensors, {"ss_output_name": "x"})
    blob = path.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    assert digest == hashlib.sha256(blob[8 + n:]).hexdigest() == hashlib.sha256(data_section(blob)).hexdigest()
    with safe_open(str(path), "pt") as f:
        assert f.metadata()["sshs_model_hash"] == digest
    write_lora(path, tensors, {"ss_output_name": "other name"})  # the hash ignores the metadata
    with safe_open(str(path), "pt") as f:
        assert f.metadata()["sshs_model_hash"] == digest


# --- DoRA, LoHa, LoKr (LyCORIS's layout) ----------------------------------------------------------

GOLDEN_SPEC = dict(dim=8, alpha=4.0, conv_dim=4, conv_alpha=2.0, train_text_encoders=True)


def lycoris_shape_table(tree_name: str, network_type: str) -> tuple[dict[str, str], dict[str, dict]]:
    """The tensors every module of a full-size file of `network_type` holds, as the network writes
    them (peft layers on meta-device models): ({layer class: "suffix shape ..."}, {name: shapes})."""
    from library.lora.network import LoraNetwork, NetworkSpec

    arch, unet, encoders = full_size_models(tree_name)
    network = LoraNetwork(unet, encoders, arch, NetworkSpec(network_type=network_type, **GOLDEN_SPEC))
    modules = dict(line.split(" ", 1) for line in (GOLDEN / f"{tree_name}_lora_modules.txt").read_text().splitlines())
    classes, shapes = {}, {}
    for name, module in network.file_modules().items():
        shapes[name] = {k: list(v.shape) for k, v in sorted(module.file_tensors().items())}
        row = " ".join(f"{k}{v}".replace(" ", "") for k, v in shapes[name].items())
        assert classes.setdefault(modules[name], row) == row, name  # one layout per layer class
    return classes, shapes


@pytest.mark.parametrize("network_type", ["dora", "loha", "lokr"])
def test_full_size_lycoris_tables_are_golden(network_type):
    """Every tensor name and shape of full-size SD1.5 and SDXL files (network_dim 8, alpha 4,
    conv_dim 4, conv_alpha 2, text encoders on): the golden file lists each layer class of the
    module tables once, so together they spell out every tensor."""
    golden = (GOLDEN / f"{network_type}_shapes.txt").read_text().splitlines()
    for tree_name in ("sd15", "sdxl"):
        classes, shapes = lycoris_shape_table(tree_name, network_type)
        assert sorted(f"{tree_name} {cls} | {row}" for cls, row in classes.items()) == \
            [line for line in golden if line.startswith(f"{tree_name} ")]
        names = [r.split()[0] for r in (GOLDEN / f"{tree_name}_lora_modules.txt").read_text().splitlines()]
        assert sorted(shapes) == names
