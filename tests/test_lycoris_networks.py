"""DoRA, LoHa and LoKr networks: trained end to end (with APT), written in LyCORIS's layout and
checked with the `lycoris-lora` package's own merging code, the independent loader for these files."""
from __future__ import annotations

import contextlib
import io
import json
import re
import sys
from pathlib import Path

import lycoris.utils as lycoris_utils  # the independent implementation (requirements-dev.txt)
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from library.config import build_config
from library.config.options import ModelOptions
from library.errors import UserError
from library.lora.index import NameIndex
from library.lora.kohya_file import write_lora
from library.lora.network import LoraNetwork, NetworkSpec
from library.lora.weights import load_weights
from library.models.loader import load_models
from library.train.loop import Trainer
from tests.helpers import tiny_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

TYPES = ("dora", "loha", "lokr")
SUFFIXES = {
    "lora": {"lora_down.weight", "lora_up.weight", "alpha"},
    "dora": {"lora_down.weight", "lora_up.weight", "alpha", "dora_scale"},
    "loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"},
    "lokr": {"lokr_w1", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "alpha"},  # w2 whole or split, by layer size
}


@pytest.fixture(autouse=True)
def _keep_thread_count():
    """One thread here (and cpu_threads = 1 in the runs): on tiny models thread hand-offs cost more
    than they save on a shared machine. The rest of the session keeps its own setting."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


_LOADED: dict[str, object] = {}


def fresh_bundle(path):
    """A model loaded from `path`, as a copy of one loaded once (loading builds tokenizers, VAE...)."""
    import copy

    if str(path) not in _LOADED:
        _LOADED[str(path)] = load_models(ModelOptions(pretrained_model_name_or_path=str(path)))
    return copy.deepcopy(_LOADED[str(path)])


def components_of(bundle) -> dict[str, torch.nn.Module]:
    return {"unet": bundle.unet, **{f"te{i + 1}": te for i, te in enumerate(bundle.text_encoders)}}


def lycoris_merge(bundle, tensors: dict[str, torch.Tensor]) -> int:
    """Merge a file into a freshly loaded model with lycoris.utils.merge; returns the module count.

    lycoris walks `named_modules()` and forms kohya names from the paths; each layer is presented
    under the path its kohya name spells (SGM paths for SDXL, `text_model.` for the text encoders,
    which transformers 5 no longer has), so the names are those of the file, not recomputed here."""
    index = NameIndex.for_model(bundle)
    comps = components_of(bundle)
    lookup = {c: dict(m.named_modules()) for c, m in comps.items()}
    holders = {c: torch.nn.Module() for c in comps}
    for name in {k.split(".", 1)[0] for k in tensors}:
        target = index.targets[name]
        mods = lookup[target.component]
        layer = mods.get(target.path) or mods[target.path.removeprefix("text_model.")]
        prefix = "lora_unet_" if target.component == "unet" else ("lora_te_" if bundle.arch != "sdxl" else
                                                                    f"lora_{target.component}_")
        holders[target.component].add_module(name.removeprefix(prefix), layer)
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        lycoris_utils.merge([holders[c] for c in comps if c != "unet"], holders["unet"], dict(tensors), 1.0)
    return int(re.search(r"(\d+) Modules been merged", out.getvalue())[1])


def peft_merged(network: LoraNetwork) -> dict[str, torch.Tensor]:
    """Each trained layer's weight as peft's own merge computes it (then unmerged again)."""
    out = {}
    with torch.no_grad():
        for name, (_, layer) in network.layers.items():
            layer.merge(adapter_names=["default"])
            out[name] = layer.get_base_layer().weight.detach().float().clone()
            layer.unmerge()
    return out


def layer_weights(bundle, names) -> dict[str, torch.Tensor]:
    index = NameIndex.for_model(bundle)
    comps = components_of(bundle)
    lookup = {c: dict(m.named_modules()) for c, m in comps.items()}
    out = {}
    for name in names:
        t = index.targets[name]
        layer = lookup[t.component].get(t.path) or lookup[t.component][t.path.removeprefix("text_model.")]
        out[name] = layer.weight.detach().float()
    return out


def train(tmp_path, model_path, images, network: dict, *overrides):
    cfg_path = tiny_config(tmp_path, model_path, images)
    options = [("save_precision", "float"), ("learning_rate", "5e-3"), ("max_train_steps", "1"),
               ("train_batch_size", "1"), ("cpu_threads", "1"), ("log_with", "none"), *[(k, str(v)) for k, v in network.items()],
               *overrides]
    trainer = Trainer(build_config(str(cfg_path), options))
    return trainer, trainer.run()


def reference_equals_base(trainer, fresh) -> None:
    """APT's reference pass (adapters switched off through LoraNetwork.set_enabled) predicts
    exactly what the base model predicts, and the adapters are on again afterwards."""
    with torch.no_grad():
        for p in trainer.parts.network.parameters():  # every adapter parameter changes the prediction
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)
    gen = torch.Generator().manual_seed(0)
    latents, context = torch.randn(1, 4, 8, 8, generator=gen), torch.randn(1, 77, 32, generator=gen)
    t = torch.tensor([500])
    unet = trainer.parts.bundle.unet
    with torch.no_grad():
        tuned = unet(latents, t, context).sample
        with trainer.probe.adapters(False):  # what APT's reference pass runs under
            reference = unet(latents, t, context).sample
        base = fresh.unet(latents, t, context).sample
        again = unet(latents, t, context).sample
    assert close(reference, base, 1e-6)
    assert float((tuned - base).abs().max()) > 1e-3
    assert torch.equal(again, tuned)


@pytest.mark.parametrize("network_type,arch", [(t, a) for t in TYPES for a in ("sd15", "sdxl")] + [("lora", "sd15")])
def test_trained_file_merges_in_lycoris_to_the_weights_trained_here(tmp_path, tiny_models, images, arch,
                                                                     network_type):
    # alpha = rank: lycoris-lora 4.1.3's merge_to applies alpha / rank twice to LoHa and LoKr
    # (get_weight already scales, get_diff_weight scales again; its forward and the WebUIs scale
    # once). With scale 1 the merge is exact; test_lycoris_forward_* checks other alphas.
    network = {"network_type": network_type, "network_dim": 4, "network_alpha": 4.0}
    if arch == "sd15":  # LoCon convolutions and the text encoder on one of the two models
        network.update(conv_dim=2, conv_alpha=2.0, network_train_unet_only="false")
    trainer, path = train(tmp_path, tiny_models[arch], images, network, ("apt", "true"))
    assert len(trainer.losses) == 1 and all(torch.isfinite(torch.tensor(trainer.losses)))
    tensors = load_file(str(path))
    names = set(trainer.parts.network.layers)
    assert {k.split(".", 1)[0] for k in tensors} == names
    assert {k.split(".", 1)[1] for k in tensors} == SUFFIXES[network_type]
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    args = json.loads(meta["ss_network_args"])
    assert meta["ss_network_module"] == ("networks.lora" if network_type == "lora" else "lycoris.kohya")
    assert args.get("algo") == {"lora": None, "dora": "lora", "loha": "loha", "lokr": "lokr"}[network_type]
    assert args.get("dora_wd") == ("True" if network_type == "dora" else None)
    if arch == "sd15":
        assert args["conv_dim"] == "2" and args["conv_alpha"] == "2.0"
        assert any(".".join(k.split(".")[:1]).endswith("conv1") for k in tensors)
        assert any(k.startswith("lora_te_") for k in tensors)

    expected = peft_merged(trainer.parts.network)
    fresh = fresh_bundle(tiny_models[arch])
    base = {k: v.clone() for k, v in layer_weights(fresh, names).items()}
    assert lycoris_merge(fresh, tensors) == len(names)
    merged = layer_weights(fresh, names)
    ours = load_weights(path)
    assert ours.network_type == network_type
    for name in sorted(names):
        assert not torch.equal(expected[name], base[name]), name  # every module was trained
        assert close(merged[name], expected[name]), name
        assert close(ours.modules[name].apply(base[name]), expected[name]), name  # our reader agrees as well
    if arch == "sd15":
        reference_equals_base(trainer, fresh_bundle(tiny_models[arch]))


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> bool:
    """Equal within fp32 rounding of weights of size ~1 (one comparison, cheaper than assert_close)."""
    a, b = a.detach(), b.detach()
    return a.shape == b.shape and float((a - b).abs().max()) <= tol * max(1.0, float(b.abs().max()))



def random_network(model_path, network_type: str, seed: int = 0, **spec):
    """A tiny model with a network of `network_type` whose every parameter is random (alpha != rank)."""
    bundle = fresh_bundle(model_path)
    settings = dict(dim=4, alpha=3.0, conv_dim=2, conv_alpha=1.5, train_text_encoders=True, network_type=network_type)
    network = LoraNetwork(bundle.unet, bundle.text_encoders, bundle.arch, NetworkSpec(**{**settings, **spec}))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in network.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.2)
    return bundle, network


@pytest.mark.parametrize("network_type", ("lora",) + TYPES)
def test_lycoris_forward_of_our_file_matches_ours_with_alpha_other_than_rank(tiny_models, network_type):
    """LyCORIS's own modules, built from the file's tensors, compute the same layer output as our
    reader's merged weight: linear and 1x1/3x3 convolution layers, text encoder, LoKr split and whole."""
    from lycoris.modules import get_module, make_module

    bundle, network = random_network(tiny_models["sd15"], network_type)
    tensors = {k: v.float() for k, v in network.kohya_state_dict().items()}
    ours = load_weights_from(tensors, network)
    picked = ["lora_unet_down_blocks_0_attentions_0_proj_in", "lora_unet_down_blocks_1_resnets_0_conv1",
              "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_ff_net_0_proj",
              "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k",
              "lora_te_text_model_encoder_layers_1_self_attn_q_proj"]
    if network_type == "lokr":
        shapes = {n: (ours.modules[n].rank is None) for n in picked}
        assert set(shapes.values()) == {True, False}  # both LoKr forms (w2 whole, w2 split) among them
    gen = torch.Generator().manual_seed(1)
    for name in picked:
        _, layer = network.layers[name]
        base = layer.get_base_layer()
        kind, params = get_module(tensors, name)
        module = make_module(kind, params, name, base)
        assert module is not None, name
        x = torch.randn(2, base.in_channels, 6, 6, generator=gen) if isinstance(base, torch.nn.Conv2d) \
            else torch.randn(2, 3, base.in_features, generator=gen)
        with torch.no_grad():
            theirs = module(x)
            weight = ours.modules[name].apply(base.weight)
            if isinstance(base, torch.nn.Conv2d):
                mine = torch.nn.functional.conv2d(x, weight, base.bias, base.stride, base.padding)
            else:
                mine = torch.nn.functional.linear(x, weight, base.bias)
            peft = layer(x)
        assert close(theirs, mine, 1e-5), name
        assert close(peft, mine, 1e-5), name


def load_weights_from(tensors, network):
    from library.lora.weights import from_tensors

    return from_tensors(tensors, {}, "test", network.index)


def test_merge_lora_into_a_checkpoint_equals_lycoris_merge(tiny_models, tmp_path):
    """tools/merge_lora.py with a LoKr, a LoHa and a DoRA file (in this order) writes what
    lycoris's merge of the same files gives: SDXL single file with both text encoders (TE2's q/k/v
    are one stacked weight there), DoRA's magnitude orientation included."""
    import merge_lora

    fresh = fresh_bundle(tiny_models["sdxl"])
    files, names = [], set()
    for seed, network_type in enumerate(("lokr", "loha", "dora")):
        # no conv layers (the SD1.5 runs above merge those): the text encoders are the point here
        _, network = random_network(tiny_models["sdxl"], network_type, seed, alpha=4.0, conv_dim=None,
                                    conv_alpha=None)
        path = tmp_path / f"{network_type}.safetensors"
        write_lora(path, network.kohya_state_dict(torch.float32), {"ss_base_model_version": "sdxl_base_v1-0"})
        tensors = load_file(str(path))
        if network_type == "dora":  # LyCORIS's orientation: one magnitude per output channel
            for name, (_, layer) in network.layers.items():
                weight = layer.get_base_layer().weight
                assert tensors[f"{name}.dora_scale"].shape == (weight.shape[0],) + (1,) * (weight.ndim - 1), name
        assert lycoris_merge(fresh, tensors) == len(network.layers)
        files.append(str(path))
        names |= set(network.layers)
    assert any(n.startswith("lora_te2_") and n.endswith("q_proj") for n in names)
    out = tmp_path / "merged.safetensors"
    assert merge_lora.main(["--model", str(tiny_models["sdxl_single"]), "--lora", *files, "--out", str(out)]) == 0
    merged = layer_weights(load_models(ModelOptions(pretrained_model_name_or_path=str(out))), names)
    expected = layer_weights(fresh, names)
    for name in names:
        assert close(merged[name], expected[name]), name


# --- configuration: kohya's spelling and bad input -------------------------------------------------

def network_config(tmp_path, tiny_models, **network):
    from tests.helpers import write_config

    tables = {"model": {"pretrained_model_name_or_path": str(tiny_models["sd15"])}, "network": network}
    return build_config(str(write_config(tmp_path / "c.toml", tables)), [], need_dataset=False).network


def test_kohya_lycoris_network_args_are_mapped(tmp_path, tiny_models):
    net = network_config(tmp_path, tiny_models, network_module="lycoris.kohya", network_dim=8,
                         network_args=["algo=lokr", "factor=4", "conv_dim=4", "conv_alpha=1", "use_tucker=False"])
    assert (net.network_type, net.lokr_factor, net.conv_dim, net.conv_alpha) == ("lokr", 4, 4, 1.0)
    net = network_config(tmp_path, tiny_models, network_module="lycoris.kohya",
                         network_args=["algo=locon", "dora_wd=True"])
    assert net.network_type == "dora"
    assert network_config(tmp_path, tiny_models, network_module="lycoris.kohya",
                          network_args=["algo=loha"]).network_type == "loha"
    assert network_config(tmp_path, tiny_models, network_type="loha").network_type == "loha"
    assert network_config(tmp_path, tiny_models).network_type == "lora"


@pytest.mark.parametrize("network,message", [
    ({"network_module": "lycoris.kohya", "network_args": ["algo=ia3"]},
     "[network] network_args: algo=ia3 is not supported; valid: lora, locon, dora, loha, lokr"),
    ({"network_args": ["algo=loha"]}, 'network_args: algo needs network_module = "lycoris.kohya"'),
    ({"network_module": "lycoris.kohya", "network_args": ["algo=loha", "dora_wd=True"]},
     "dora_wd=True works with algo=lora/locon only"),
    ({"network_module": "lycoris.kohya", "network_args": ["algo=lokr", "decompose_both=True"]},
     "network_args: decompose_both=True is not supported"),
    ({"network_module": "lycoris.kohya", "network_args": ["algo=lokr", "rank_scale=2"]},
     "network_args: unknown network argument 'rank_scale'; valid: algo, dora_wd"),
    ({"network_module": "lycoris.kohya", "network_args": ["algo=lokr"], "network_type": "loha"},
     "network_args: sets network_type = 'lokr' but"),
    ({"network_type": "lokr", "lokr_factor": 0}, "[network] lokr_factor: 0 is only valid with"),
    ({"network_type": "lora", "lokr_factor": 4}, "[network] lokr_factor: 4 is only valid with"),
    ({"network_type": "loha", "network_dropout": 0.1}, "[network] network_dropout: loha has no dropout"),
    ({"network_type": "boft"}, "[network] network_type: expected one of 'lora', 'dora', 'loha', 'lokr'"),
])
def test_bad_network_settings_are_one_line_errors(tmp_path, tiny_models, network, message):
    with pytest.raises(UserError) as err:
        network_config(tmp_path, tiny_models, **network)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("factor,message", [
    (3, "[network] lokr_factor: 3 does not divide the 32 inputs of lora_unet_down_blocks_0_attentions_0_proj_in"),
    (8, "[network] lokr_factor: 8 is above the square root of the 32 inputs of lora_unet_down_blocks_0_attentions_0"),
])
def test_a_lokr_factor_that_does_not_fit_a_layer_is_refused(tiny_models, factor, message):
    with pytest.raises(UserError) as err:
        random_network(tiny_models["sd15"], "lokr", lokr_factor=factor)
    assert message in str(err.value) and "\n" not in str(err.value)
    _, network = random_network(tiny_models["sd15"], "lokr", lokr_factor=4)  # 4 divides every size (32..256)
    assert {m.file_tensors()["lokr_w1"].shape[0] for m in network.file_modules().values()} == {4}


def test_network_weights_keep_the_weight_change_and_refuse_another_type(tiny_models, tmp_path):
    """Continuing from a file: a different alpha is absorbed exactly (LoKr: whole and split w2);
    a file of another type is a clear error."""
    _, source = random_network(tiny_models["sd15"], "lokr", seed=3)
    weights = load_weights_from(source.kohya_state_dict(torch.float32), source)
    bundle, target = random_network(tiny_models["sd15"], "lokr", seed=4, alpha=1.0, conv_alpha=0.5)
    target.load_modules(weights.modules, "source.safetensors")
    gen = torch.Generator().manual_seed(0)
    loaded = target.file_modules()
    assert {m.rank is None for m in loaded.values()} == {True, False}
    for name, (_, layer) in target.layers.items():
        weight = torch.randn(layer.get_base_layer().weight.shape, generator=gen)
        assert close(loaded[name].apply(weight), weights.modules[name].apply(weight)), name
    _, loha = random_network(tiny_models["sd15"], "loha")
    with pytest.raises(UserError, match=r"is a lokr module; network_type is 'loha'; set network_type = \"lokr\""):
        loha.load_modules(weights.modules, "source.safetensors")


# --- tools ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lycoris_files(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("lycoris")
    out = {}
    for network_type in TYPES:
        _, network = random_network(tiny_models["sd15"], network_type)
        out[network_type] = root / f"{network_type}.safetensors"
        write_lora(out[network_type], network.kohya_state_dict(torch.float32), {"ss_base_model_version": "sd_v1"})
    return out


def run(tool, argv, capsys) -> tuple[int, str, str]:
    from library.utils.toolmain import run_tool

    code = run_tool(tool.main, [str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_resize_extract_and_lora_merging_refuse_other_types(lycoris_files, tiny_models, tmp_path, capsys):
    import extract_lora
    import merge_lora
    import resize_lora

    code, _, err = run(resize_lora, [lycoris_files["loha"], tmp_path / "r.safetensors", "--rank", "2"], capsys)
    assert code == 2 and err.strip() == (f"error: {lycoris_files['loha']}: a loha file; resize_lora handles plain "
                                         "LoRA (lora_down/lora_up) only")
    code, _, err = run(extract_lora, ["--base", tiny_models["sd15_single"], "--tuned", tiny_models["sd15_single"],
                                      "--rank", "4", "--out", tmp_path / "e.safetensors", "--network_type", "lokr"],
                       capsys)
    assert code == 2 and err.startswith("error: --network_type lokr: extract_lora handles plain LoRA only")
    code, _, err = run(merge_lora, ["--lora", lycoris_files["dora"], "--out", tmp_path / "m.safetensors"], capsys)
    assert code == 2 and "a dora file; merging LoRAs into one LoRA (without --model) handles plain LoRA" in err
    assert not any(tmp_path.iterdir())


def test_convert_and_inspect_understand_lycoris_files(lycoris_files, tmp_path, capsys):
    import convert_lora
    import inspect_lora

    for network_type, path in lycoris_files.items():
        out = tmp_path / f"{network_type}.safetensors"
        code, _, _ = run(convert_lora, [path, out, "--to", "kohya", "--save_precision", "fp16"], capsys)
        assert code == 0
        before, after = load_file(str(path)), load_file(str(out))
        assert before.keys() == after.keys() and all(after[k].dtype == torch.float16 for k in after)
        assert all(torch.equal(before[k].half(), after[k]) for k in before)
        code, _, err = run(convert_lora, [path, tmp_path / "d.safetensors", "--to", "diffusers"], capsys)
        assert code == 2 and f"a {network_type} file; --to diffusers (the PEFT layout) handles plain LoRA" in err
        code, report, _ = run(inspect_lora, [path, "--json"], capsys)
        rep = json.loads(report)
        assert code == 0 and rep["network_type"] == network_type and rep["modules"] == 289
        assert rep["modules_per_prefix"] == {"lora_te": 12, "lora_unet": 277}
        verdicts = rep["compatibility"]
        assert verdicts["comfyui"]["loads"]
        if network_type == "dora":  # diffusers' own converter accepts kohya DoRA files
            assert verdicts["diffusers"]["loads"] and not verdicts["a1111"]["loads"]
            assert "normalises per input channel" in verdicts["a1111"]["problems"][0]
        else:
            assert verdicts["a1111"]["loads"] and not verdicts["diffusers"]["loads"]
    code, text, _ = run(inspect_lora, [lycoris_files["lokr"], "--no_diffusers_check"], capsys)
    assert "network:       lokr" in text and "whole (" in text  # LoKr modules with both factors whole


# --- reading the other forms LyCORIS writes -----------------------------------------------------------

@pytest.mark.parametrize("algo,settings", [
    ("loha", {"use_tucker": True}),
    ("lokr", {"use_tucker": True, "factor": 4}),
    ("lokr", {"decompose_both": True, "factor": 4}),
    ("locon", {"weight_decompose": True, "wd_on_out": False}),  # DoRA, older per-input orientation
    ("loha", {"weight_decompose": True}),                       # DoRA on LoHa ("DoHa")
])
def test_reader_merges_lycoris_files_of_other_forms_as_lycoris_does(algo, settings):
    """Files LyCORIS writes with other options (Tucker factors, LoKr with both factors split,
    per-input DoRA magnitudes, DoRA on LoHa): our reader's merged weight equals LyCORIS's."""
    from lycoris.modules import LoConModule, LohaModule, LokrModule

    from library.lora.lycoris import build_module

    cls = {"locon": LoConModule, "loha": LohaModule, "lokr": LokrModule}[algo]
    torch.manual_seed(0)
    for layer in (torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.Linear(16, 32)):
        if settings.get("use_tucker") and isinstance(layer, torch.nn.Linear):
            continue  # Tucker factors exist for spatial kernels only
        # lora_dim = alpha: lycoris's merge_to applies alpha / rank twice to LoHa/LoKr (see above)
        module = cls("lora_unet_x", layer, 1.0, lora_dim=2, alpha=2, **settings)
        with torch.no_grad():
            for p in module.parameters():
                if p is not layer.weight and p is not layer.bias:
                    p.copy_(torch.randn_like(p) * 0.3)
            expected, _ = module.get_merged_weight(1.0, layer.weight.shape, "cpu")
        parts = {k: v.detach() for k, v in module.custom_state_dict().items()}
        if settings.get("use_tucker"):
            assert any(k.endswith("_t2") for k in parts)
        ours = build_module(parts, "lora_unet_x", "test")
        assert ours.kind == ("dora" if settings.get("weight_decompose") else algo.replace("locon", "lora"))
        assert close(ours.apply(layer.weight), expected.float()), (algo, settings, type(layer).__name__)
