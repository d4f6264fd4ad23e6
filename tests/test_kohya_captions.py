"""Captions as kohya users write them: long captions in 75-token chunks, wildcards, multi-line files."""
from __future__ import annotations

import json
import logging
import random
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from library.config.dataset import SubsetSpec
from library.config.loader import build_config
from library.config.options import ModelOptions
from library.data.captions import expand_wildcards, process_caption
from library.errors import UserError
from library.models.conditioning import chunk_ids
from library.models.loader import load_models
from tests.helpers import make_images, tiny_config

LONG = ", ".join(f"tag{i} word{i}" for i in range(30))  # 189 CLIP tokens: three chunks, the last one part text


@pytest.fixture(scope="module")
def bundles(tiny_models):
    return {arch: load_models(ModelOptions(pretrained_model_name_or_path=str(tiny_models[arch])))
            for arch in ("sd15", "sdxl")}


def test_chunk_ids_by_hand():
    # window 6 = BOS + 4 tokens + EOS; caption ids BOS=1, EOS=2, PAD=0, tokens 5..10 (6 tokens), length 2 + 3 * 4
    ids = torch.tensor([[1, 5, 6, 7, 8, 9, 10, 2, 0, 0, 0, 0, 0, 0]])
    chunks = chunk_ids(ids, 6, eos=2, pad=0)[0].tolist()
    assert chunks[0] == [1, 5, 6, 7, 8, 2]    # cut inside the text: its last position becomes EOS
    assert chunks[1] == [1, 9, 10, 2, 0, 0]   # the text's own EOS, then padding: left as it is
    assert chunks[2] == [1, 2, 0, 0, 0, 0]    # past the text: BOS EOS PAD...
    same = torch.tensor([[1, 5, 6, 7, 8, 9, 10, 2, 2, 2, 2, 2, 2, 2]])  # pad == eos (SD1.x): plain wrapping
    assert chunk_ids(same, 6, eos=2, pad=2)[0].tolist() == [[1, 5, 6, 7, 8, 2], [1, 9, 10, 2, 2, 2],
                                                           [1, 2, 2, 2, 2, 2]]


def _by_hand(encoder, tok, caption: str, layer):
    """Each 77-position chunk encoded on its own, put together in kohya's layout."""
    ids = tok([caption], padding="max_length", max_length=227, truncation=True, return_tensors="pt").input_ids[0]
    eos, pad = tok.eos_token_id, tok.pad_token_id
    chunks = []
    for start in (1, 76, 151):
        chunk = torch.cat([ids[:1], ids[start:start + 75], ids[-1:]])
        if pad != eos:
            if chunk[-2] not in (eos, pad):
                chunk[-1] = eos
            if chunk[1] == pad:
                chunk[1] = eos
        chunks.append(chunk)
    outs = [encoder(c[None], output_hidden_states=True) for c in chunks]
    states = [layer(o) for o in outs]
    joined = torch.cat([states[0][:, :1]] + [s[:, 1:76] for s in states] + [states[-1][:, -1:]], dim=1)
    return joined, outs


@torch.no_grad()
def test_sd15_chunked_embeddings_equal_the_chunks_encoded_by_hand(bundles):
    b = bundles["sd15"]
    text = b.family.caption_encoder(b.tokenizers, b.text_encoders, 1, 225)
    cond = text.encode([LONG])
    expected, _ = _by_hand(b.text_encoders[0], b.tokenizers[0], LONG, lambda o: o.last_hidden_state)
    assert cond.hidden_states.shape == (1, 227, b.text_encoders[0].config.hidden_size)
    assert torch.allclose(cond.hidden_states, expected, atol=1e-5)
    plain = b.family.caption_encoder(b.tokenizers, b.text_encoders, 1).encode([LONG]).hidden_states
    assert plain.shape[1] == 77
    # the first 76 positions are the first chunk's: what the 77-token encoding sees up to its last token
    assert torch.allclose(cond.hidden_states[:, :76], plain[:, :76], atol=1e-5)
    skip2 = b.family.caption_encoder(b.tokenizers, b.text_encoders, 2, 150).encode([LONG]).hidden_states
    assert skip2.shape[1] == 152


@torch.no_grad()
def test_sdxl_chunked_embeddings_and_pooled_from_the_first_chunk(bundles):
    b = bundles["sdxl"]
    text = b.family.caption_encoder(b.tokenizers, b.text_encoders, 1, 225)
    cond = text.encode([LONG, "short"])
    h1, _ = _by_hand(b.text_encoders[0], b.tokenizers[0], LONG, lambda o: o.hidden_states[-2])
    h2, outs2 = _by_hand(b.text_encoders[1], b.tokenizers[1], LONG, lambda o: o.hidden_states[-2])
    assert cond.hidden_states.shape[1] == 227
    assert torch.allclose(cond.hidden_states[:1], torch.cat([h1, h2], dim=-1), atol=1e-5)
    assert torch.allclose(cond.pooled[:1], outs2[0].text_embeds, atol=1e-5)
    assert b.tokenizers[1].pad_token_id != b.tokenizers[1].eos_token_id  # the fix-up path was exercised


def test_long_caption_warnings_name_the_image_and_follow_the_limit(tmp_path, caplog):
    from library.data.dataset import TrainingData
    from library.data.summary import log_dataset

    folder = make_images(tmp_path / "img", 2)
    (folder / "img00.txt").write_text(LONG)
    path = tmp_path / "d.toml"
    path.write_text(f'[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = "{folder}"\n')
    from library.config.dataset import parse_blueprint
    import tomllib

    data = TrainingData(parse_blueprint(tomllib.loads(path.read_text()), str(path), tmp_path), native_resolution=64,
                        default_batch_size=1, seed=0)
    with caplog.at_level(logging.WARNING):
        log_dataset(data)
    lines = [r.getMessage() for r in caplog.records if "tokens" in r.getMessage()]
    assert len(lines) == 1 and "img00.png" in lines[0] and "(max_token_length = 225 reads all of it)" in lines[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        log_dataset(data, 225)
    assert not [r for r in caplog.records if "tokens" in r.getMessage()]


def test_max_token_length_trains_with_cache_and_apt(tmp_path, tiny_models):
    """SDXL with 225 tokens: cached text outputs, APT's attention alignment over every chunk, samples."""
    from tests.helpers import run_main

    folder = make_images(tmp_path / "img", 2, caption=LONG)
    path = tiny_config(tmp_path, tiny_models["sdxl"], folder, max_train_steps=2, max_token_length=225, apt=True)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(LONG + " --s 2 --w 64 --h 64\n")
    code, _, err = run_main(["--config", str(path), "--log_with", "none", "--cache_text_encoder_outputs", "true",
                             "--apt.reference_every", "1", "--sample_prompts", str(prompts),
                             "--sample_every_n_steps", "2"])
    assert code == 0, err
    assert list((tmp_path / "out" / "sample").glob("*.png"))


def test_max_token_length_must_be_kohya_value(tmp_path, tiny_models, images):
    path = tiny_config(tmp_path, tiny_models["sd15"], images)
    with pytest.raises(UserError, match="max_token_length"):
        build_config(str(path), [("max_token_length", "100")])


# --- wildcards and multi-line captions ---------------------------------------------------------

def subset(**kw) -> SubsetSpec:
    return SubsetSpec(image_dir="x", **kw)


def test_wildcards_as_kohya():
    seen = {expand_wildcards("a {red|blue|green} ball, {{literal}}", random.Random(i)) for i in range(60)}
    assert seen == {f"a {c} ball, {{literal}}" for c in ("red", "blue", "green")}
    assert expand_wildcards("first {x|y}\nsecond {p|q}", None) == "first x"      # no RNG: first line, first choice
    lines = {expand_wildcards("one\ntwo\nthree", random.Random(i)) for i in range(40)}
    assert lines == {"one", "two", "three"}
    off = subset()
    assert process_caption("a {red|blue} ball", off, 1, random.Random(0)) == "a {red|blue} ball"


def test_prefix_suffix_separators_with_wildcards():
    sub = subset(enable_wildcard=True, caption_prefix="sks", caption_suffix="end", shuffle_caption=True,
                 keep_tokens_separator="|||", secondary_separator=";;;")
    out = {process_caption("front ||| a;;;b, c, d ||| tail\nother line", sub, 1, random.Random(i)) for i in range(60)}
    assert "sks other line end" in out   # the prefix/suffix go on the line drawn
    firsts = [o for o in out if o.startswith("sks front")]
    assert firsts and all(o.endswith("tail end") for o in firsts)       # kohya's fixed suffix part
    assert all("a,b" in o for o in firsts)                               # kept together, then joined
    assert len(firsts) > 1                                               # the middle part is shuffled


def test_multiline_caption_files_read_every_line_with_wildcards(tmp_path):
    from library.data.dataset import TrainingData
    from library.config.dataset import parse_blueprint

    folder = make_images(tmp_path / "img", 1)
    (folder / "img00.txt").write_text("a {red|blue} disc\n\nthe second line\n")
    doc = {"datasets": [{"resolution": 64, "subsets": [{"image_dir": str(folder), "enable_wildcard": True}]}]}
    data = TrainingData(parse_blueprint(doc, "d.toml", tmp_path), native_resolution=64, default_batch_size=1, seed=3)
    seen = {data.sample(0, epoch, "s", with_pixels=False).caption for epoch in range(1, 40)}
    assert seen == {"a red disc", "a blue disc", "the second line"}
    # deterministic per (seed, epoch, image): a rebuilt dataset (a resumed run) draws the same
    again = TrainingData(parse_blueprint(doc, "d.toml", tmp_path), native_resolution=64, default_batch_size=1,
                         seed=3)
    assert [again.sample(0, e, "s", with_pixels=False).caption for e in range(1, 10)] == \
        [data.sample(0, e, "s", with_pixels=False).caption for e in range(1, 10)]
    assert data.fixed_sample(0, with_pixels=False).caption == "a red disc"
    doc["datasets"][0]["subsets"][0]["enable_wildcard"] = False
    plain = TrainingData(parse_blueprint(doc, "d.toml", tmp_path), native_resolution=64, default_batch_size=1, seed=3)
    assert plain.sample(0, 1, "s", with_pixels=False).caption == "a {red|blue} disc"


def test_text_cache_refuses_wildcards(tmp_path, tiny_models):
    folder = make_images(tmp_path / "img", 2)
    path = tiny_config(tmp_path, tiny_models["sd15"], folder)
    path.write_text(path.read_text().replace("[[datasets.subsets]]", "[[datasets.subsets]]\nenable_wildcard = true"))
    with pytest.raises(UserError, match="enable_wildcard changes captions during training, so "
                                        "cache_text_encoder_outputs cannot be used"):
        build_config(str(path), [("cache_text_encoder_outputs", "true")])


def test_resume_is_exact_with_wildcards(tmp_path, tiny_models):
    """The line and choices drawn depend on (seed, epoch, image) only: a run resumed in the middle of an
    epoch trains on the captions the uninterrupted run saw (an unseeded draw would make them differ)."""
    from library.train.loop import Trainer

    folder = make_images(tmp_path / "img", 4, caption="a {red|blue|green} disc\na plain {shape|thing}")
    fp32 = [("save_precision", "float"), ("mixed_precision", "no"), ("log_with", "none"),
            ("max_data_loader_n_workers", "0")]

    def config(where, steps):
        where.mkdir()
        path = tiny_config(where, tiny_models["sd15"], folder, max_train_steps=steps)
        path.write_text(path.read_text().replace("[[datasets.subsets]]",
                                                 "[[datasets.subsets]]\nenable_wildcard = true"))
        return path

    straight = config(tmp_path / "a", 4)
    Trainer(build_config(str(straight), fp32)).run()
    split = config(tmp_path / "b", 3)   # batch 2 of 4 images: stops in the middle of epoch 2
    Trainer(build_config(str(split), [*fp32, ("save_state", "true")])).run()
    Trainer(build_config(str(split), [*fp32, ("resume", "latest"), ("max_train_steps", "4")])).run()
    a, b = load_file(str(tmp_path / "a" / "out" / "lora.safetensors")), load_file(str(tmp_path / "b" / "out" /
                                                                                         "lora.safetensors"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6


def test_attention_alignment_mask_spans_every_chunk(bundles):
    """APT's token mask is built on the ids in caption order, so it covers the caption's tokens in every
    chunk (and the end marker) and leaves out the padding after it."""
    from library.apt.losses import token_mask

    b = bundles["sd15"]
    text = b.family.caption_encoder(b.tokenizers, b.text_encoders, 1, 225)
    ids = text.tokenize([LONG, "short"])[0]
    n = len(b.tokenizers[0](LONG, add_special_tokens=False).input_ids)
    assert ids.shape == (2, 227) and 150 < n < 225
    mask = token_mask(ids, b.tokenizers[0].eos_token_id, True, [])
    assert mask[0].tolist() == [1.0] * (n + 2) + [0.0] * (225 - n)   # BOS, the tokens of all chunks, EOS
    assert mask[1].sum() == 3                                        # BOS, "short", EOS


def test_check_dataset_counts_against_max_token_length(tmp_path, capsys):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    import check_dataset

    folder = make_images(tmp_path / "img", 2)
    (folder / "img00.txt").write_text(LONG)
    ds = tmp_path / "ds.toml"
    ds.write_text(f'[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = "{folder}"\n')
    assert check_dataset.main(["--dataset_config", str(ds), "--json"]) == 0
    assert [c["image"] for c in json.loads(capsys.readouterr().out)["long_captions"]] == [str(folder / "img00.png")]
    assert check_dataset.main(["--dataset_config", str(ds), "--json", "--max_token_length", "225"]) == 0
    assert json.loads(capsys.readouterr().out)["long_captions"] == []
    assert check_dataset.main(["--dataset_config", str(ds), "--max_token_length", "150"]) == 0
    assert "captions longer than 150 tokens (1;" in capsys.readouterr().out
