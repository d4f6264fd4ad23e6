"""Presets run, the embedded default job runs as README says, and every option is documented."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from library.config.dataset import COMMON, DATASET_LEVEL, SUBSET_ONLY
from library.config.loader import all_options
from tests.helpers import run_main, write_config

REPO = Path(__file__).resolve().parents[1]


def test_every_option_and_dataset_key_is_documented():
    text = (REPO / "docs" / "configuration.md").read_text()
    sys.path.insert(0, str(REPO / "tools"))
    import update_config_docs

    assert update_config_docs.render(text) == text, "run python tools/update_config_docs.py"
    documented = set(re.findall(r"^\| `([a-z_.0-9]+)` \|", text, flags=re.M))
    expected = set(all_options()) | set(COMMON) | set(DATASET_LEVEL) | set(SUBSET_ONLY)
    assert expected - documented == set(), "undocumented"
    assert documented - expected == set(), "documented but not an option"


@pytest.mark.parametrize("preset,model", [("sd15", "sd15_single"), ("sdxl", "sdxl"), ("sdxl_lowvram", "sdxl_single")])
def test_presets_run_once_model_and_dataset_are_given(tmp_path, tiny_models, images, preset, model):
    ds = write_config(tmp_path / "ds.toml", {}, [{"resolution": 64, "subsets": [{"image_dir": str(images)}]}])
    code, _, err = run_main(["--config", str(REPO / "presets" / f"{preset}.toml"),
                             "--pretrained_model_name_or_path", str(tiny_models[model]), "--dataset_config", str(ds),
                             "--max_train_steps", "1", "--output_dir", str(tmp_path / "out")])
    assert code == 0, err
    assert (tmp_path / "out" / f"{preset}_lora.safetensors").is_file()


def test_presets_without_model_say_what_is_missing():
    code, _, err = run_main(["--config", str(REPO / "presets" / "sdxl.toml")])
    assert code == 2 and "pretrained_model_name_or_path: required option missing" in err


def test_dataset_example_parses(tmp_path):
    from library.config.dataset import parse_blueprint
    from library.config.loader import read_toml

    bp = parse_blueprint(read_toml(REPO / "presets" / "dataset_example.toml"), "example", REPO)
    sub = bp.datasets[0].subsets[0]
    assert (sub.num_repeats, sub.keep_tokens, sub.caption_extension) == (10, 1, ".txt")
    assert bp.datasets[0].subsets[1].is_reg


def test_embedded_default_job_as_in_readme(tmp_path):
    """README's first command minus the install: make the tiny model, run presets/tiny.toml."""
    model = tmp_path / "tiny-sd15"
    subprocess.run([sys.executable, "tools/make_tiny_model.py", "--arch", "sd15", "--out", str(model)],
                   cwd=REPO, check=True, capture_output=True, timeout=300)
    proc = subprocess.run([sys.executable, "train_apt_lora.py", "--config", "presets/tiny.toml",
                           "--pretrained_model_name_or_path", str(model), "--output_dir", str(tmp_path / "out")],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    tensors = load_file(str(tmp_path / "out" / "tiny_lora.safetensors"))
    assert len(tensors) == 3 * 192
    readme = (REPO / "README.md").read_text().split("```")
    assert "make_tiny_model.py --arch sd15 --out models/tiny-sd15" in readme[1]
    assert "train_apt_lora.py --config presets/tiny.toml" in readme[1]
    assert "python -m pytest" in readme[3] and "python -m pytest" in (REPO / ".ci" / "run").read_text()
