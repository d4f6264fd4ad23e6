"""torch_compile: the UNet trains through torch.compile (accelerate's dynamo plugin) to the same
LoRA as without it, and a backend that fails leaves the run uncompiled instead of stopping it."""
from __future__ import annotations

import pytest
import torch
import torch._dynamo
from safetensors.torch import load_file

from tests.helpers import tiny_trainer


def trained(tmp_path, tiny_models, images, name, *overrides, apt="true"):
    from accelerate.state import AcceleratorState, PartialState

    AcceleratorState._reset_state(reset_partial_state=True)  # each run its own dynamo settings
    PartialState._reset_state()
    torch._dynamo.reset()
    folder = tmp_path / name
    folder.mkdir()
    trainer = tiny_trainer(folder, tiny_models["sd15"], images, ("apt", apt), *overrides, max_train_steps=2)
    trainer.run()
    return trainer, load_file(str(folder / "out" / "lora.safetensors"))


@pytest.fixture(autouse=True)
def _dynamo_errors_restored():
    was = torch._dynamo.config.suppress_errors
    torch._dynamo.config.suppress_errors = False
    yield
    torch._dynamo.config.suppress_errors = was
    torch._dynamo.reset()


def test_a_compiled_unet_trains_to_the_same_lora(tmp_path, tiny_models, images):
    _, plain = trained(tmp_path, tiny_models, images, "plain")
    compiled, weights = trained(tmp_path, tiny_models, images, "compiled", ("torch_compile", "true"),
                                ("dynamo_backend", "eager"))
    assert type(compiled.parts.wrapped[0]).__name__ == "OptimizedModule"  # the UNet went through torch.compile
    assert torch._dynamo.config.suppress_errors  # the documented fallback is on
    assert weights.keys() == plain.keys()
    for key in plain:
        torch.testing.assert_close(weights[key], plain[key], rtol=1e-3, atol=1e-5)


def test_a_backend_that_fails_leaves_the_unet_uncompiled(tmp_path, tiny_models, images, monkeypatch):
    from torch._dynamo.backends import registry

    calls = []

    def broken(graph, example_inputs):
        calls.append(len(example_inputs))
        raise RuntimeError("no C++ compiler here")

    monkeypatch.setitem(registry._COMPILER_FNS, "eager", broken)
    _, weights = trained(tmp_path, tiny_models, images, "broken", ("torch_compile", "true"),
                         ("dynamo_backend", "eager"), apt="false")
    assert calls  # compiling was tried and failed...
    monkeypatch.undo()
    _, plain = trained(tmp_path, tiny_models, images, "plain", apt="false")
    assert weights.keys() == plain.keys()  # ...and the run trained on, uncompiled, to the same LoRA
    for key in plain:
        torch.testing.assert_close(weights[key], plain[key], rtol=1e-3, atol=1e-5)
