"""Shared fixtures: tiny models built once per session, small image folders, config writing."""
from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
# Under pytest-xdist (pytest.ini: -n auto) each worker owns one core: in-process runs then start one
# torch thread (library.train.setup.usable_cores), and subprocesses inherit the mask, so the workers
# do not oversubscribe the machine.
_worker = os.environ.get("PYTEST_XDIST_WORKER", "")
if _worker.startswith("gw") and hasattr(os, "sched_setaffinity"):
    _cores = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {_cores[int(_worker[2:]) % len(_cores)]})
    os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pytest  # noqa: E402

from library.utils.runtime import offline_and_quiet  # noqa: E402

offline_and_quiet()

from tests.helpers import make_images  # noqa: E402


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """Tiny SD1.5 and SDXL models as diffusers folders and original-format single files."""
    from safetensors.torch import save_file

    from library.models.families import to_original_state_dict
    from library.models.tiny import build_tiny_pipeline, save_diffusers

    root = tmp_path_factory.mktemp("models")
    out = {}
    for arch, family in (("sd15", "sd1"), ("sdxl", "sdxl")):
        pipe = build_tiny_pipeline(family, seed=0)
        folder = root / f"tiny-{arch}"
        save_diffusers(pipe, folder)
        encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if arch == "sdxl" else [])
        single = root / f"tiny-{arch}.safetensors"
        save_file(to_original_state_dict(family, pipe.unet, pipe.vae, encoders), str(single))
        out[arch] = folder
        out[f"{arch}_single"] = single
    return out


@pytest.fixture
def images(tmp_path) -> Path:
    """Four 64 px images with .txt captions."""
    return make_images(tmp_path / "images", 4)


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """accelerate keeps process-wide state; tests that train in-process each start clean."""
    yield
    try:
        from accelerate.state import AcceleratorState, PartialState

        AcceleratorState._reset_state(reset_partial_state=True)
        PartialState._reset_state()
    except ImportError:
        pass


def pytest_configure(config):
    # registered here rather than in pytest.ini, which other branches edit too
    config.addinivalue_line("markers", "browser: drives the web UI in headless Chromium "
                                       "(tests/test_webui_browser.py); run alone with -m browser")
