"""Training with the data features: several datasets, regularisation, caches."""
from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from library.config import build_config
from library.data.buckets import crop_offset
from library.train.loop import Trainer
from tests.helpers import make_images, tiny_config, write_config


def test_two_resolutions_and_a_regularisation_subset(tmp_path, tiny_models):
    a = make_images(tmp_path / "a", 2)
    b = make_images(tmp_path / "b", 2, size=(96, 64))
    reg = make_images(tmp_path / "reg", 3, caption="a shape")
    tables = {"model": {"pretrained_model_name_or_path": str(tiny_models["sdxl"])},
              "network": {"network_dim": 4},
              "training": {"max_train_steps": 8, "train_batch_size": 2, "prior_loss_weight": 0.5},
              "saving": {"output_dir": str(tmp_path / "out")}}
    datasets = [{"resolution": 64, "subsets": [{"image_dir": str(a)}, {"image_dir": str(reg), "is_reg": True}]},
                {"resolution": [96, 64], "batch_size": 1, "subsets": [{"image_dir": str(b)}]}]
    cfg = build_config(str(write_config(tmp_path / "c.toml", tables, datasets)), [])
    trainer = Trainer(cfg)
    seen_shapes, weights = set(), []
    assemble = trainer.parts.batches.assemble

    def spy(samples):
        batch = assemble(samples)
        seen_shapes.add(tuple(batch.latents.shape[-2:]))
        weights.extend(batch.weights.tolist())
        return batch

    trainer.parts.batches.assemble = spy
    trainer.run()
    assert seen_shapes == {(8, 8), (8, 12)}  # 64x64 and 96x64 images, 8x smaller latents
    assert 0.5 in weights and 1.0 in weights
    assert sum(1 for r in trainer.parts.data.records if r.subset.is_reg) == 2  # balanced to the 2 training images
    from safetensors import safe_open

    with safe_open(str(tmp_path / "out" / "lora.safetensors"), "pt") as f:
        meta = f.metadata()
    tags = json.loads(meta["ss_tag_frequency"])
    assert tags["reg"] == {"a shape": 2} and tags["a"]["a shape"] == 2
    datasets = json.loads(meta["ss_datasets"])
    assert [d["resolution"] for d in datasets] == [[64, 64], [96, 64]]
    assert datasets[0]["subsets"][1]["is_reg"] is True and datasets[1]["batch_size_per_device"] == 1
    assert meta["ss_num_reg_images"] == "2" and meta["ss_num_train_images"] == "4"


def test_disk_latent_cache_reused_and_training_identical(tmp_path, tiny_models, images):
    results, caches = [], []
    runs = ([("cache_latents", "true")], [("cache_latents_to_disk", "true")], [("cache_latents_to_disk", "true")])
    for run, extra in enumerate(runs):
        d = tmp_path / f"r{run}"
        d.mkdir()
        cfg = build_config(str(tiny_config(d, tiny_models["sd15"], images)), [("save_precision", "float"), *extra])
        trainer = Trainer(cfg)
        cache = trainer.parts.batches.cache
        if run == 1:
            assert cache.encoded == 4 and cache.hits == 0
        if run == 2:
            assert cache.encoded == 0 and cache.hits == 4
        caches.append(cache)
        results.append(load_file(str(trainer.run())))
    # A latent read back from disk is the one the memory cache holds, so training is bit for bit the same.
    for key, (latents, _) in caches[0].entries.items():
        assert torch.equal(caches[2].entries[key][0], latents)
    assert all(torch.equal(results[0][k], results[1][k]) and torch.equal(results[1][k], results[2][k])
               for k in results[0])
    # The cache holds what live encoding computes, up to the float rounding of a different VAE batch size.
    # (Compared on the latents: three Adam steps amplify such rounding in the weights unpredictably per CPU.)
    data = trainer.parts.data
    for (index, flipped), (latents, _) in caches[0].entries.items():
        left, top = crop_offset(data.placements[index], False, None)
        pixels, _ = data.pixels(index, left, top, flipped)
        with torch.no_grad():
            live = caches[0].encode(pixels[None]).cpu()[0]
        assert torch.allclose(live, latents, rtol=1e-4, atol=1e-4 * latents.abs().max().item())


def test_sdxl_text_encoder_cache_equals_live_conditioning(tmp_path, tiny_models, images):
    cfg = build_config(str(tiny_config(tmp_path, tiny_models["sdxl"], images)),
                       [("cache_text_encoder_outputs", "true")])
    trainer = Trainer(cfg)
    cache = trainer.parts.denoiser.conditioning.cache
    captions = [r.caption for r in trainer.parts.data.records]
    assert set(cache.entries) == set(captions)
    cached = cache.get(captions)
    for te in trainer.parts.bundle.text_encoders:
        te.to(trainer.parts.device)
    with torch.no_grad():
        live = trainer.parts.denoiser.conditioning.local.encode(captions)
    assert cached.hidden_states.shape == (4, 77, 96) and cached.pooled.shape == (4, 64)
    assert torch.equal(cached.hidden_states, live.hidden_states.cpu())
    assert torch.equal(cached.pooled, live.pooled.cpu())
    for te in trainer.parts.bundle.text_encoders:
        te.to("cpu")
    trainer.run()  # trains with the text encoders off the device


def test_folder_convention_trains(tmp_path, tiny_models):
    make_images(tmp_path / "train" / "3_sks shape", 2)
    tables = {"model": {"pretrained_model_name_or_path": str(tiny_models["sd15"])},
              "data": {"train_data_dir": str(tmp_path / "train")},
              "general": {"resolution": 64},
              "training": {"max_train_steps": 2}, "saving": {"output_dir": str(tmp_path / "out")}}
    cfg = build_config(str(write_config(tmp_path / "c.toml", tables)), [])
    trainer = Trainer(cfg)
    assert trainer.parts.data.batches_per_epoch() == 6
    trainer.run()
