"""Presets run, the embedded default job runs as README says, and every option is documented."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from library.config.dataset import COMMON, DATASET_LEVEL, SUBSET_ONLY
from library.config.loader import all_options
from tests.helpers import run_main, write_config

REPO = Path(__file__).resolve().parents[1]


def test_every_option_and_dataset_key_is_documented():
    text = (REPO / "docs" / "configuration.md").read_text()
    sys.path.insert(0, str(REPO / "tools"))
    import update_config_docs

    assert update_config_docs.render(text) == text, "run python tools/update_config_docs.py"
    ours, kohya = text.split("<!-- generated:kohya -->")  # the kohya table names sd-scripts' options
    documented = set(re.findall(r"^\| `([a-z_.0-9]+)` \|", ours, flags=re.M))
    expected = set(all_options()) | set(COMMON) | set(DATASET_LEVEL) | set(SUBSET_ONLY)
    assert expected - documented == set(), "undocumented"
    assert documented - expected == set(), "documented but not an option"


@pytest.mark.parametrize("preset,model", [("sd15", "sd15_single"), ("sdxl", "sdxl"), ("sdxl_lowvram", "sdxl_single"),
                                          ("sdxl_8gb", "sdxl_single")])
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


def test_readme_starts_with_the_two_commands():
    blocks = (REPO / "README.md").read_text().split("```")
    assert blocks[0].startswith("# ") and blocks[1].startswith("bash\n") and blocks[3].startswith("bash\n")
    demo, tests = blocks[1].strip().splitlines()[1], blocks[3].strip().splitlines()[1]
    assert "pip install -r requirements.txt" in demo and demo.endswith("train_apt_lora.py --config presets/demo.toml")
    assert "requirements-dev.txt" in tests and tests.endswith("python -m pytest -q")
    assert tests.split("&& ", 2)[-1] in (REPO / ".ci" / "run").read_text()
    assert (REPO / "presets" / "demo.toml").is_file()
