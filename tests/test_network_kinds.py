"""A network kind added from outside the core (library.config.network_kinds.register_network_kind)
is validated, listed and trained end to end like the shipped ones."""
from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
from safetensors import safe_open
from safetensors.torch import load_file

from library.config import build_config
from library.config.cli import help_text
from library.config.network_kinds import network_kind, register_network_kind, unregister_network_kind
from library.errors import UserError
from tests.helpers import run_main, tiny_config, write_config


@pytest.fixture
def gaussian_lora():
    """LoRA whose down factor starts from peft's gaussian init (std 1 / rank) instead of kaiming's
    uniform one; selected by network_type = "gauss_lora" or kohya's algo=gauss. Its file module is
    named by its full path, as a kind from another package would name its own."""
    lora = network_kind("lora")
    kind = replace(lora, name="gauss_lora", summary="LoRA, gaussian init", algos=("gauss",), dora=None,
                   peft_kwargs=lambda spec: {**lora.peft_kwargs(spec), "init_lora_weights": "gaussian"},
                   file_module="library.lora.weights:LoraModule", state_keys=())
    register_network_kind(kind)
    yield kind
    unregister_network_kind(kind.name)


def network_of(tmp_path, tiny_models, **network):
    tables = {"model": {"pretrained_model_name_or_path": str(tiny_models["sd15"])}, "network": network}
    return build_config(str(write_config(tmp_path / "n.toml", tables)), [], need_dataset=False).network


def test_a_registered_kind_is_an_option_value_until_removed(gaussian_lora, tmp_path, tiny_models):
    assert network_of(tmp_path, tiny_models, network_type="Gauss_LoRA").network_type == "gauss_lora"
    assert network_of(tmp_path, tiny_models, network_module="lycoris.kohya",
                      network_args=["algo=gauss"]).network_type == "gauss_lora"
    assert "one of 'lora', 'dora', 'loha', 'lokr', 'gauss_lora'" in help_text()
    with pytest.raises(UserError, match="dora_wd=True works with algo=lora/locon only"):
        network_of(tmp_path, tiny_models, network_module="lycoris.kohya", network_args=["algo=gauss", "dora_wd=1"])
    with pytest.raises(ValueError, match="already selects 'lora'"):
        register_network_kind(replace(gaussian_lora, name="other", algos=("locon",)))
    unregister_network_kind("gauss_lora")
    try:
        with pytest.raises(UserError, match="expected one of 'lora', 'dora', 'loha', 'lokr', got 'gauss_lora'"):
            network_of(tmp_path, tiny_models, network_type="gauss_lora")
    finally:
        register_network_kind(gaussian_lora)


def test_a_registered_kind_trains_end_to_end(gaussian_lora, tmp_path, tiny_models, images):
    config = tiny_config(tmp_path, tiny_models["sd15"], images)
    code, _, err = run_main(["--config", str(config), "--log_with", "none", "--network_type", "gauss_lora",
                             "--max_train_steps", "2", "--train_batch_size", "1", "--cpu_threads", "1",
                             "--save_precision", "float"])
    assert code == 0, err
    path = tmp_path / "out" / "lora.safetensors"
    tensors = load_file(str(path))
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    # a LoRA file: kohya's tensors and metadata, which every loader reads
    assert {k.split(".", 1)[1] for k in tensors} == {"lora_down.weight", "lora_up.weight", "alpha"}
    assert meta["ss_network_module"] == "networks.lora" and json.loads(meta["ss_network_args"]) == {}
    assert (meta["ss_network_dim"], meta["ss_network_alpha"], meta["ss_steps"]) == ("4", "2.0", "2")
    names = {k.split(".", 1)[0] for k in tensors}
    assert len(names) > 10 and all(n.startswith("lora_unet_") for n in names)
    for name in names:
        down, up = tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"]
        assert float(up.abs().max()) > 0, name  # trained (lora_up starts at zero)
        # gaussian init (std 1 / 4): values beyond kaiming-uniform's bound 1 / sqrt(fan_in), which
        # two steps at lr 1e-3 cannot reach from the default init
        assert float(down.abs().max()) > 1 / math.sqrt(math.prod(down.shape[1:])) + 0.05, name
