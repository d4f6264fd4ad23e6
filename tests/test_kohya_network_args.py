"""networks.lora's arguments: per-block ranks and learning rates, LoRA+, rank/module dropout."""
from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from library.config.loader import build_config
from library.config.options import ModelOptions
from library.errors import UserError
from library.lora.kohya_file import write_lora
from library.lora.network import ADAPTER, LoraNetwork, NetworkSpec
from library.lora.weights import load_weights
from library.models.loader import load_models
from tests.helpers import tiny_config, tiny_trainer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import convert_lora  # noqa: E402
import inspect_lora  # noqa: E402
import merge_lora  # noqa: E402
import resize_lora  # noqa: E402


@pytest.fixture(scope="module")
def bundles(tiny_models):
    return {arch: load_models(ModelOptions(pretrained_model_name_or_path=str(tiny_models[arch])))
            for arch in ("sd15", "sdxl")}


# --- the blocks ---------------------------------------------------------------------------------

# Hand-read from the original UNets' block lists (ldm/sgm input_blocks, middle_block, output_blocks):
# SD1.x: IN01 = first down ResNet+attention, IN03 = first downsampler, MID = 12, OUT02 holds the first
# upsampler; SDXL: slot 0 is BASE, its first down block has no attention, the middle block is split.
EXPECTED = {
    "sd15": {"down_blocks.0.attentions.0.proj_in": "IN01", "down_blocks.0.downsamplers.0.conv": "IN03",
             "down_blocks.1.attentions.1.proj_out": "IN05", "down_blocks.3.resnets.1.conv1": "IN11",
             "mid_block.attentions.0.proj_in": "MID", "mid_block.resnets.1.conv2": "MID",
             "up_blocks.0.resnets.0.conv1": "OUT00", "up_blocks.0.upsamplers.0.conv": "OUT02",
             "up_blocks.3.attentions.2.proj_out": "OUT11"},
    "sdxl": {"down_blocks.0.resnets.0.conv1": "IN01", "down_blocks.0.downsamplers.0.conv": "IN03",
             "down_blocks.1.attentions.0.proj_in": "IN04", "down_blocks.2.attentions.1.proj_out": "IN08",
             "mid_block.resnets.0.conv1": "MID00", "mid_block.attentions.0.proj_in": "MID01",
             "mid_block.resnets.1.conv1": "MID02", "up_blocks.0.attentions.0.proj_in": "OUT00",
             "up_blocks.0.upsamplers.0.conv": "OUT02", "up_blocks.2.resnets.2.conv1": "OUT08"},
}


@pytest.mark.parametrize("arch, count", [("sd15", 25), ("sdxl", 23)])
def test_block_index_follows_the_real_unet(bundles, arch, count):
    bundle = bundles[arch]
    family, unet = bundle.family, bundle.unet
    labels = family.lora_blocks(unet.config)
    assert len(labels) == count
    for path, label in EXPECTED[arch].items():
        assert labels[family.lora_block_index(path, unet.config)] == label, path
    # In a real forward pass the blocks run in index order: input blocks, middle, output blocks.
    spec = NetworkSpec(dim=2, alpha=2.0, conv_dim=2, conv_alpha=2.0)
    from library.lora.names import unet_targets

    order: list[int] = []
    modules = dict(unet.named_modules())
    hooks = []
    for target in unet_targets(unet.config, family, spec.trains_conv):
        index = family.lora_block_index(target.path, unet.config)
        assert index is not None, target.path
        hooks.append(modules[target.path].register_forward_hook(lambda m, i, o, k=index: order.append(k)))
    x = torch.randn(1, 4, 8, 8)
    ctx = torch.randn(1, 77, unet.config.cross_attention_dim)
    kw = {}
    if arch == "sdxl":
        kw["added_cond_kwargs"] = {"text_embeds": torch.randn(1, bundle.text_encoders[1].config.projection_dim),
                                   "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
    with torch.no_grad():
        unet(x, torch.tensor([10]), ctx, **kw)
    for h in hooks:
        h.remove()
    assert order == sorted(order)
    used = {labels[i] for i in order}
    # every block that holds a layer has LoRA targets; the conv_in/BASE/OUT slots hold none
    assert used == set(labels) - {"IN00", "BASE", "OUT"}


def _spec_with_blocks(labels, **kw):
    dims = tuple(0 if label == "IN05" else 1 + i % 3 for i, label in enumerate(labels))
    alphas = tuple(0.5 * (1 + i % 2) for i in range(len(labels)))
    return NetworkSpec(dim=4, alpha=4.0, block_dims=dims, block_alphas=alphas, train_text_encoders=True, **kw), \
        dims, alphas


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_block_dims_are_the_ranks_in_the_file(bundles, tiny_models, arch, tmp_path):
    bundle = load_models(ModelOptions(pretrained_model_name_or_path=str(tiny_models[arch])))
    family, config = bundle.family, bundle.unet.config
    labels = family.lora_blocks(config)
    spec, dims, alphas = _spec_with_blocks(labels)
    network = LoraNetwork(bundle.unet, bundle.text_encoders, bundle.arch, spec)
    state = network.kohya_state_dict(torch.float32)
    checked = Counter()
    for name, (target, layer) in network.layers.items():
        down, alpha = state[f"{name}.lora_down.weight"], state[f"{name}.alpha"]
        if target.component == "unet":
            block = family.lora_block_index(target.path, config)
            assert down.shape[0] == dims[block] and alpha.item() == alphas[block], name
            checked[labels[block]] += 1
        else:
            assert down.shape[0] == 4 and alpha.item() == 4.0  # text encoders keep network_dim/alpha
    assert "IN05" not in checked and checked["IN04"] > 0   # rank 0: no LoRA in that block
    path = tmp_path / "mixed.safetensors"
    write_lora(path, state, {"ss_base_model_version": bundle.base_model_version})
    read = load_weights(path)
    assert {m.rank for m in read.modules.values()} == {1, 2, 3, 4}


def test_lr_weights_and_loraplus_become_parameter_groups(tiny_models, images, tmp_path):
    trainer = tiny_trainer(tmp_path, tiny_models["sd15"], images, ("network_args", '["down_lr_weight=1,0.5,0,0.25", '
                           '"mid_lr_weight=2", "up_lr_weight=zeros+0.1", "block_lr_zero_threshold=0.2", '
                           '"loraplus_lr_ratio=16"]'), ("learning_rate", "0.001"))
    groups = {g["name"]: g["lr"] for g in trainer.parts.optimizer.param_groups}
    # IN00 (conv_in) and IN03 (a downsampler, conv only) have no LoRA here; IN01 = 0.5; IN02 = 0 -> no
    # LoRA; the input blocks after the list get 1; every output block 0.1, at most the threshold -> none
    assert groups["unet_IN01"] == pytest.approx(5e-4) and groups["unet_IN01_plus"] == pytest.approx(8e-3)
    assert "unet_IN02" not in groups and not any(n.startswith("unet_OUT") for n in groups)
    assert groups["unet_IN04"] == pytest.approx(1e-3) and groups["unet_IN08_plus"] == pytest.approx(1.6e-2)
    assert groups["unet_MID"] == pytest.approx(2e-3) and groups["unet_MID_plus"] == pytest.approx(3.2e-2)
    labels = trainer.parts.network.plan.labels
    assert {labels[b] for b in trainer.parts.network.blocks.values()} == {"IN01", "IN04", "IN05", "IN07", "IN08", "MID"}
    # the up (B) matrices, and only they, are in the LoRA+ groups
    plus = {id(p) for g in trainer.parts.optimizer.param_groups if g["name"].endswith("_plus") for p in g["params"]}
    for _, layer in trainer.parts.network.layers.values():
        assert id(layer.lora_B[ADAPTER].weight) in plus and id(layer.lora_A[ADAPTER].weight) not in plus
    from library.train.metrics import LearningRates

    logged = LearningRates(trainer.parts.optimizer)(None)
    assert logged["lr/unet_MID_plus"] == pytest.approx(3.2e-2)


def test_network_args_spelling_equals_the_options(tiny_models, images, tmp_path):
    path = tiny_config(tmp_path, tiny_models["sd15"], images)
    args = build_config(str(path), [("network_args", '["block_dims=' + ",".join(["2"] * 25) + '", '
                                     '"loraplus_unet_lr_ratio=4", "rank_dropout=0.1", "module_dropout=0.2", '
                                     '"down_lr_weight=sine+0.5"]')]).network
    assert args.block_dims == (2,) * 25 and args.loraplus_unet_lr_ratio == 4 and args.down_lr_weight == "sine+0.5"
    assert args.rank_dropout == 0.1 and args.module_dropout == 0.2


@pytest.mark.parametrize("override, needle", [
    (("network_args", '["block_dims=4,4"]'), "block_dims: 2 values, but this SD1.x UNet has 25 blocks"),
    (("network_args", '["down_lr_weight=wavy"]'), "down_lr_weight: 'wavy' is not"),
    (("network_args", '["block_alphas=1,2"]'), "block_alphas: set block_dims too"),
    (("network_args", '["rank_dropout=1.5"]'), "rank_dropout: 1.5 is out of range"),
])
def test_bad_block_arguments_are_one_line(tiny_models, images, tmp_path, override, needle):
    from library.train.loop import Trainer

    path = tiny_config(tmp_path, tiny_models["sd15"], images)
    with pytest.raises(UserError) as exc:
        Trainer(build_config(str(path), [("log_with", "none"), override]))
    assert needle in str(exc.value) and "\n" not in str(exc.value)


def test_lokr_refuses_loraplus(tiny_models, images, tmp_path):
    path = tiny_config(tmp_path, tiny_models["sd15"], images)
    with pytest.raises(UserError, match="loraplus_lr_ratio: LoRA\\+ speeds up"):
        build_config(str(path), [("network_type", "lokr"), ("loraplus_lr_ratio", "4")])


def test_rank_and_module_dropout_hooks(bundles, tiny_models):
    bundle = load_models(ModelOptions(pretrained_model_name_or_path=str(tiny_models["sd15"])))
    network = LoraNetwork(bundle.unet, bundle.text_encoders, bundle.arch,
                          NetworkSpec(dim=8, alpha=8.0, rank_dropout=0.5, module_dropout=0.3))
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    down = network.layers[name][1].lora_A[ADAPTER]
    x = torch.randn(3, 5, down.in_features)
    plain = torch.nn.functional.linear(x, down.weight)
    torch.manual_seed(0)
    outs = [down(x) for _ in range(200)]
    skipped = [o for o in outs if not o.any()]
    assert 30 < len(skipped) < 90                       # module dropout ~ 0.3 of the calls
    for o in outs:
        if o.any():
            kept = o != 0                                # per (sample, rank), the same at every position
            assert torch.equal(kept, kept[:, :1, :].expand_as(kept))
            assert torch.allclose(o[kept], 2.0 * plain[kept])    # kept ranks scaled by 1 / (1 - 0.5)
    down.eval()
    assert torch.equal(down(x), plain)                  # no dropout outside training
    down.train()
    with torch.no_grad():
        assert torch.equal(down(x), plain)


def test_loha_gets_peft_rank_dropout(tiny_models, images, tmp_path):
    trainer = tiny_trainer(tmp_path, tiny_models["sd15"], images, ("network_type", "loha"),
                           ("rank_dropout", "0.25"), ("module_dropout", "0.1"))
    layer = next(iter(trainer.parts.network.layers.values()))[1]
    assert layer.rank_dropout[ADAPTER] == 0.25 and layer.module_dropout[ADAPTER] == 0.1


def test_mixed_rank_file_trains_and_works_with_the_tools(tiny_models, images, tmp_path, capsys):
    """A file with per-block ranks, trained end to end, read back by inspect, resize, merge and convert."""
    from tests.helpers import run_main

    path = tiny_config(tmp_path, tiny_models["sdxl"], images)
    dims = ",".join(str(1 + i % 3) for i in range(23))
    code, _, err = run_main(["--config", str(path), "--log_with", "none", "--network_args",
                             f'["block_dims={dims}", "conv_block_dims={dims}"]', "--max_train_steps", "1"])
    assert code == 0, err
    lora = tmp_path / "out" / "lora.safetensors"
    meta = json.loads(__import__("safetensors").safe_open(str(lora), "pt").metadata()["ss_network_args"])
    assert meta["block_dims"] == dims
    assert inspect_lora.main([str(lora), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["ranks"]) == {"1", "2", "3"} and all(v["loads"] for v in report["compatibility"].values())
    resized = tmp_path / "resized.safetensors"
    assert resize_lora.main([str(lora), str(resized), "--rank", "2", "--quiet"]) == 0
    before, after = load_weights(lora), load_weights(resized)
    for name, mod in before.modules.items():
        assert after.modules[name].rank == min(mod.rank, 2)
        if mod.rank <= 2:
            assert torch.allclose(after.modules[name].delta(), mod.delta(), atol=1e-4), name
    converted = tmp_path / "diffusers.safetensors"
    assert convert_lora.main([str(lora), str(converted), "--to", "diffusers"]) == 0
    back = tmp_path / "back.safetensors"
    assert convert_lora.main([str(converted), str(back), "--to", "kohya"]) == 0
    again = load_weights(back)
    for name, mod in before.modules.items():
        assert torch.allclose(again.modules[name].delta(), mod.delta(), atol=1e-5), name
    merged = tmp_path / "merged.safetensors"
    assert merge_lora.main(["--model", str(tiny_models["sdxl_single"]), "--lora", str(lora),
                            "--out", str(merged)]) == 0
    state = load_file(str(lora))
    assert {state[k].shape[0] for k in state if k.endswith("lora_down.weight") and "unet" in k} == {1, 2, 3}


# Every network argument networks.lora reads (create_network and parse_block_lr_kwargs in
# sd-scripts' networks/lora.py at commit 48d368fa557731ad0488c07304dfeba8c07910eb).
NETWORKS_LORA_ARGS = ("conv_dim", "conv_alpha", "block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas",
                      "down_lr_weight", "mid_lr_weight", "up_lr_weight", "block_lr_zero_threshold", "rank_dropout",
                      "module_dropout", "loraplus_lr_ratio", "loraplus_unet_lr_ratio",
                      "loraplus_text_encoder_lr_ratio")


def test_every_networks_lora_argument_is_an_option():
    from library.config.loader import all_options
    from library.config.network_args import mapped

    arguments = mapped()
    for name in NETWORKS_LORA_ARGS:
        option, _ = arguments[name]
        assert option == name and option in all_options()
