"""Our LoRA files in diffusers (an independent loader), conversions, resize, merge, extract, inspect."""
from __future__ import annotations

import json
import logging
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from library.config.options import ModelOptions
from library.lora.kohya_file import write_lora
from library.lora.network import ADAPTER, NetworkSpec
from library.lora.weights import load_weights
from library.models.loader import load_models
from tests.helpers import random_lora

TOOLS = Path(__file__).resolve().parents[1] / "tools"
sys.path.insert(0, str(TOOLS))

import convert_lora  # noqa: E402
import extract_lora  # noqa: E402
import inspect_lora  # noqa: E402
import merge_lora  # noqa: E402
import resize_lora  # noqa: E402
import sample_lora  # noqa: E402

SPEC = NetworkSpec(dim=4, alpha=3.0, conv_dim=2, conv_alpha=1.5, train_unet=True, train_text_encoders=True)


def lora_model(path: Path, seed: int = 0):
    """A tiny model with random (non-zero) LoRA weights on every target, alpha != rank."""
    return random_lora(path, SPEC, seed)


@pytest.fixture(scope="module")
def trained(tiny_models, tmp_path_factory):
    """For sd15 and sdxl: (model folder, bundle with LoRA active, network, kohya file)."""
    out = {}
    root = tmp_path_factory.mktemp("loras")
    for arch in ("sd15", "sdxl"):
        bundle, network = lora_model(tiny_models[arch])
        path = root / f"{arch}.safetensors"
        write_lora(path, network.kohya_state_dict(torch.float32),
                   {"ss_base_model_version": bundle.base_model_version})
        out[arch] = (tiny_models[arch], bundle, network, path)
    return out


def inputs(bundle, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    cfg = bundle.unet.config
    x = torch.randn(2, 4, 8, 8, generator=g)
    ctx = torch.randn(2, 77, cfg.cross_attention_dim, generator=g)
    kw = {}
    if bundle.arch == "sdxl":
        pooled = bundle.text_encoders[1].config.projection_dim
        kw["added_cond_kwargs"] = {"text_embeds": torch.randn(2, pooled, generator=g),
                                   "time_ids": torch.tensor([[64, 64, 0, 0, 64, 64]] * 2, dtype=torch.float32)}
    ids = bundle.tokenizers[0](["a red circle", "a photo of sks"], padding="max_length", max_length=77,
                               return_tensors="pt").input_ids
    return x, torch.tensor([500, 20]), ctx, kw, ids


@torch.no_grad()
def outputs(unet, encoders, bundle):
    x, t, ctx, kw, ids = inputs(bundle)
    result = {"unet": unet(x, t, ctx, **kw).sample}
    for i, te in enumerate(encoders):
        out = te(ids, output_hidden_states=True)
        result[f"te{i + 1}"] = out.hidden_states[-2]
        if hasattr(out, "text_embeds"):
            result[f"te{i + 1}_pooled"] = out.text_embeds
    return result


@contextmanager
def failing_on_warnings():
    """diffusers and peft only warn about keys they could not place: make that a failure."""
    records: list[str] = []

    class Catch(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    handler = Catch(level=logging.WARNING)
    loggers = [logging.getLogger(n) for n in ("diffusers", "peft")]
    old = [(lg.level, lg.propagate) for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.WARNING)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for lg, (level, prop) in zip(loggers, old):
        lg.removeHandler(handler)
        lg.setLevel(level)
    relevant = [str(w.message) for w in caught if "lora" in str(w.message).lower() or "key" in str(w.message).lower()]
    assert not records and not relevant, records + relevant


def diffusers_pipeline(folder: Path, arch: str):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    cls = StableDiffusionXLPipeline if arch == "sdxl" else StableDiffusionPipeline
    return cls.from_pretrained(str(folder), local_files_only=True)


def assert_same(a: dict, b: dict, atol: float = 1e-5):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=atol), (k, (a[k] - b[k]).abs().max().item())


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
@pytest.mark.parametrize("layout", ["kohya", "diffusers"])
def test_diffusers_loads_the_file_and_matches_our_model(trained, tmp_path, arch, layout):
    from diffusers.loaders.lora_pipeline import StableDiffusionLoraLoaderMixin, StableDiffusionXLLoraLoaderMixin

    folder, bundle, network, path = trained[arch]
    if layout == "diffusers":
        converted = tmp_path / "peft.safetensors"
        assert convert_lora.main([str(path), str(converted), "--to", "diffusers"]) == 0
        path = converted
    state = load_file(str(path))
    if layout == "kohya":  # diffusers' kohya converter raises on any key it cannot rename
        if arch == "sdxl":
            StableDiffusionXLLoraLoaderMixin.lora_state_dict(dict(state), unet_config=bundle.unet.config)
        else:
            StableDiffusionLoraLoaderMixin.lora_state_dict(dict(state))
    pipe = diffusers_pipeline(folder, arch)
    with failing_on_warnings():
        pipe.load_lora_weights(str(path))
    encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if arch == "sdxl" else [])
    theirs = outputs(pipe.unet, encoders, bundle)
    ours = outputs(bundle.unet, bundle.text_encoders, bundle)
    network.set_enabled(False)
    base = outputs(bundle.unet, bundle.text_encoders, bundle)
    network.set_enabled(True)
    assert not torch.allclose(ours["unet"], base["unet"], atol=1e-3)  # the LoRA does change the model
    assert_same(ours, theirs)


def test_round_trip_kohya_diffusers_kohya_is_exact(trained, tmp_path):
    for arch in ("sd15", "sdxl"):
        path = trained[arch][3]
        peft, back = tmp_path / f"{arch}_peft.safetensors", tmp_path / f"{arch}_back.safetensors"
        assert convert_lora.main([str(path), str(peft), "--to", "diffusers"]) == 0
        assert convert_lora.main([str(peft), str(back), "--to", "kohya"]) == 0
        a, b = load_file(str(path)), load_file(str(back))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_reads_diffusers_path_names_and_files_without_alpha(trained, tmp_path):
    _, bundle, network, path = trained["sdxl"]
    state = load_file(str(path))
    index = network.index
    renamed = {}
    for key, value in state.items():
        name, _, suffix = key.partition(".")
        target = index.targets[name]
        if target.component == "unet":  # how some trainers spell SDXL: diffusers paths
            name = "lora_unet_" + target.path.replace(".", "_")
        if suffix != "alpha":
            renamed[f"{name}.{suffix}"] = value
    other = tmp_path / "other.safetensors"
    save_file(renamed, str(other))
    weights = load_weights(other)
    assert weights.arch == "sdxl" and weights.style == "kohya + kohya (other path names)"
    assert set(weights.modules) == set(network.layers)
    assert all(m.alpha == m.rank for m in weights.modules.values())  # no alpha: scale 1
    fixed = tmp_path / "fixed.safetensors"
    assert convert_lora.main([str(other), str(fixed), "--to", "kohya"]) == 0
    keys = load_file(str(fixed))
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.alpha" in keys


def test_resize_to_the_same_rank_reproduces_the_weights(trained, tmp_path):
    path = trained["sd15"][3]
    out = tmp_path / "resized.safetensors"
    assert resize_lora.main([str(path), str(out), "--rank", "4", "--quiet"]) == 0
    a, b = load_weights(path), load_weights(out)
    for name, mod in a.modules.items():
        assert b.modules[name].rank == mod.rank and b.modules[name].scale == pytest.approx(mod.scale)
        assert torch.allclose(b.modules[name].delta(), mod.delta(), atol=1e-5), name
    smaller = tmp_path / "r2.safetensors"
    assert resize_lora.main([str(path), str(smaller), "--rank", "1", "--quiet"]) == 0
    c = load_weights(smaller)
    assert {m.rank for m in c.modules.values()} == {1}
    mod = next(iter(a.modules))
    assert c.modules[mod].scale == pytest.approx(a.modules[mod].scale)  # the scale is kept
    dyn = tmp_path / "dyn.safetensors"
    assert resize_lora.main([str(path), str(dyn), "--dynamic", "sv_fro", "--param", "0.999", "--quiet"]) == 0
    assert max(m.rank for m in load_weights(dyn).modules.values()) <= 4


def test_resize_prints_the_retained_share(trained, tmp_path, capsys):
    path = trained["sd15"][3]
    assert resize_lora.main([str(path), str(tmp_path / "r.safetensors"), "--rank", "2"]) == 0
    out = capsys.readouterr().out
    assert "lora_unet_down_blocks_0_attentions_0_proj_in" in out and "4->2" in out and "retained" in out


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_merge_into_a_single_file_equals_the_lora_at_runtime(trained, tiny_models, tmp_path, arch):
    folder, bundle, network, path = trained[arch]
    merged = tmp_path / "merged.safetensors"
    assert merge_lora.main(["--model", str(tiny_models[f"{arch}_single"]), "--lora", f"{path}:1.0",
                            "--out", str(merged)]) == 0
    result = load_models(ModelOptions(pretrained_model_name_or_path=str(merged)))
    assert_same(outputs(bundle.unet, bundle.text_encoders, bundle), outputs(result.unet, result.text_encoders, bundle),
                atol=2e-5)


def test_merge_into_a_folder_with_multiplier(trained, tmp_path):
    folder, bundle, network, path = trained["sd15"]
    merged = tmp_path / "merged"
    assert merge_lora.main(["--model", str(folder), "--lora", f"{path}:0.5", "--out", str(merged)]) == 0
    assert (merged / "model_index.json").is_file() and (merged / "tokenizer" / "vocab.json").is_file()
    result = load_models(ModelOptions(pretrained_model_name_or_path=str(merged)))
    half_bundle, half_network = lora_model(folder)  # the same seed: the same LoRA weights
    for _, layer in half_network.layers.values():
        layer.scaling[ADAPTER] *= 0.5  # multiplier 0.5 at runtime
    assert_same(outputs(half_bundle.unet, half_bundle.text_encoders, half_bundle),
                outputs(result.unet, result.text_encoders, half_bundle), atol=2e-5)


def test_lora_plus_lora(trained, tiny_models, tmp_path):
    folder, bundle, network, path = trained["sd15"]
    bundle2, network2 = lora_model(folder, seed=5)
    second = tmp_path / "second.safetensors"
    write_lora(second, network2.kohya_state_dict(torch.float32), {})
    a, b = load_weights(path), load_weights(second)
    concat = tmp_path / "concat.safetensors"
    assert merge_lora.main(["--lora", f"{path}:0.7", f"{second}:0.3", "--concat", "--out", str(concat)]) == 0
    svd = tmp_path / "svd.safetensors"
    assert merge_lora.main(["--lora", f"{path}:0.7", f"{second}:0.3", "--rank", "8", "--out", str(svd)]) == 0
    for out, rank in ((concat, None), (svd, 8)):
        merged = load_weights(out)
        for name, mod in a.modules.items():
            expected = 0.7 * mod.delta() + 0.3 * b.modules[name].delta()
            assert torch.allclose(merged.modules[name].delta(), expected, atol=1e-5), (out.name, name)
            assert merged.modules[name].rank == mod.rank + b.modules[name].rank if out == concat else \
                merged.modules[name].rank == min(rank, *expected.flatten(1).shape)


def test_extract_recovers_a_merged_lora(trained, tiny_models, tmp_path):
    folder, bundle, network, path = trained["sdxl"]
    merged = tmp_path / "merged.safetensors"
    assert merge_lora.main(["--model", str(tiny_models["sdxl_single"]), "--lora", str(path),
                            "--out", str(merged)]) == 0
    out = tmp_path / "extracted.safetensors"
    assert extract_lora.main(["--base", str(tiny_models["sdxl_single"]), "--tuned", str(merged), "--rank", "4",
                              "--conv_rank", "2", "--out", str(out), "--save_precision", "float"]) == 0
    original, extracted = load_weights(path), load_weights(out)
    assert set(extracted.modules) == set(original.modules)
    for name, mod in original.modules.items():
        assert torch.allclose(extracted.modules[name].delta(), mod.delta(), atol=1e-4), name


def test_inspect_reports_and_verdicts(trained, tmp_path, capsys):
    path = trained["sdxl"][3]
    assert inspect_lora.main([str(path), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["architecture"] == "sdxl" and rep["unet_naming"] == "sgm" and rep["layout"] == "kohya"
    assert rep["modules_per_prefix"] == {"lora_te1": 12, "lora_te2": 12, "lora_unet": 257}
    assert rep["ranks"] == {"2": 38, "4": 243} and rep["alphas"] == {"1.5": 38, "3.0": 243}
    assert all(v["loads"] for v in rep["compatibility"].values())
    state = load_file(str(path))
    broken = {k: v for k, v in state.items() if "te2_text_model_encoder_layers_0_self_attn_v_proj" not in k}
    broken["lora_unet_extra.weight"] = torch.zeros(1)
    bad = tmp_path / "bad.safetensors"
    save_file(broken, str(bad))
    assert inspect_lora.main([str(bad), "--json"]) == 0
    verdict = json.loads(capsys.readouterr().out)["compatibility"]
    assert not verdict["a1111"]["loads"] and any("TE2 attention" in p for p in verdict["a1111"]["problems"])
    assert not verdict["diffusers"]["loads"]
    sd15_state = load_file(str(trained["sd15"][3]))
    sgm = {}
    index = trained["sd15"][2].index
    from library.models.ldm_names import unet_path_to_ldm

    for key, value in sd15_state.items():
        name, _, suffix = key.partition(".")
        t = index.targets[name]
        if t.component == "unet":
            name = "lora_unet_" + unet_path_to_ldm(t.path, trained["sd15"][1].unet.config).replace(".", "_")
        sgm[f"{name}.{suffix}"] = value
    sgm_file = tmp_path / "sgm.safetensors"
    save_file(sgm, str(sgm_file))
    assert inspect_lora.main([str(sgm_file), "--no_diffusers_check"]) == 0
    text = capsys.readouterr().out
    assert "SD1.x/2.x UNet with SGM names" in text and "AUTOMATIC1111/Forge  loads" in text


def test_tools_fail_with_one_line(tmp_path, capsys):
    from library.utils.toolmain import run_tool

    assert run_tool(inspect_lora.main, [str(tmp_path / "missing.safetensors")]) == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'missing.safetensors'}: no such LoRA file"
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x01" * 20)
    assert run_tool(convert_lora.main, [str(junk), str(tmp_path / "o.safetensors"), "--to", "kohya"]) == 2
    assert "junk.safetensors" in capsys.readouterr().err
    assert run_tool(resize_lora.main, [str(junk), str(tmp_path / "o.safetensors")]) == 2
    assert "give --rank R" in capsys.readouterr().err


def test_sample_lora_writes_lora_and_base_images_for_the_same_seeds(trained, tmp_path):
    import numpy as np
    from PIL import Image

    folder, bundle, network, path = trained["sd15"]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# two prompts\na red circle --d 5 --s 3\na photo of sks --d 6 --s 3 --l 4\n")
    out = tmp_path / "samples"
    assert sample_lora.main(["--model", str(folder), "--lora", str(path), "--prompts", str(prompts), "--out", str(out),
                             "--compare_base", "--sampler", "ddim"]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["sd15_00_5.png", "sd15_00_5_base.png", "sd15_01_6.png", "sd15_01_6_base.png", "sd15_grid.png"]
    lora_img = np.asarray(Image.open(out / "sd15_00_5.png"), dtype=np.float32)
    base_img = np.asarray(Image.open(out / "sd15_00_5_base.png"), dtype=np.float32)
    assert np.abs(lora_img - base_img).mean() > 1  # the LoRA changes the image
    # Multiplier 0 gives exactly the base model: switching the merged LoRA off restores the weights.
    zero = tmp_path / "zero"
    assert sample_lora.main(["--model", str(folder), "--lora", f"{path}:0", "--prompts", "a red circle --d 5 --s 3",
                             "--out", str(zero), "--name", "z", "--sampler", "ddim"]) == 0
    assert np.array_equal(np.asarray(Image.open(zero / "z_00_5.png"), dtype=np.float32), base_img)


def test_sample_lora_reads_prompts_past_77_tokens_as_training_does(trained, tmp_path):
    import numpy as np
    from PIL import Image

    folder, _, _, path = trained["sd15"]
    head = "a red circle on a white background, " + "small, " * 40  # past one CLIP window
    images = {}
    for tail in ("in a blue square", "in a green field"):
        for length in ("75", "225"):
            out = tmp_path / f"{length}-{tail[5:]}"
            assert sample_lora.main(["--model", str(folder), "--lora", str(path), "--prompts",
                                     f"{head}{tail} --d 5 --s 2", "--out", str(out), "--name", "s", "--sampler",
                                     "ddim", "--max_token_length", length]) == 0
            images[length, tail] = np.asarray(Image.open(out / "s_00_5.png"), dtype=np.float32)
    # Cut at 75 tokens the two prompts are one; read whole, their different endings change the image.
    assert np.array_equal(images["75", "in a blue square"], images["75", "in a green field"])
    assert np.abs(images["225", "in a blue square"] - images["225", "in a green field"]).mean() > 0.5


def test_sample_lora_errors_are_one_line(trained, tmp_path, capsys):
    from library.utils.toolmain import run_tool

    folder, _, _, path = trained["sd15"]
    assert run_tool(sample_lora.main, ["--model", str(folder), "--lora", str(path), "--prompts",
                                       str(tmp_path / "missing.txt"), "--out", str(tmp_path)]) == 2
    assert "missing.txt: no such file" in capsys.readouterr().err
    assert run_tool(sample_lora.main, ["--model", str(folder), "--lora", str(path), "--prompts", "a cat",
                                       "--out", str(tmp_path), "--precision", "fp16"]) == 2
    assert '--precision "fp16" needs a CUDA GPU' in capsys.readouterr().err
