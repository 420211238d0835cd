"""`effc build-engine` (effc.targets.trt_engine.build_engine): every refusal is one line, exit 2 from the
CLI, with the artifact unchanged; on a TensorRT host, the engine written into the artifact, hashed, and the
manifest's engine entry. Running engines is tested in tests/runtime/test_tensorrt_runner.py."""

from __future__ import annotations

import sys
import types

import pytest
from click.testing import CliRunner

from effc.cli import main
from effc.errors import EffcError
from effc.runtime.manifest import read_manifest, sha256_tree
from effc.targets.trt_engine import build_engine, host_missing
from tests import trt_tiny


def cli(*args):
    return CliRunner().invoke(main, ["build-engine", *map(str, args)])


def one_line(result, *needles):
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.fixture
def no_tensorrt(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)


def test_without_tensorrt_one_line_and_nothing_written(tmp_path, no_tensorrt):
    art = trt_tiny.make(tmp_path / "a")
    before = sha256_tree(art)
    with pytest.raises(EffcError, match=r"^tensorrt is not installed: pip install 'effc\[gpu\]' on a machine with "
                                        r"an NVIDIA GPU and CUDA$"):
        build_engine(art)
    one_line(cli(art, "--timing-cache", tmp_path / "t.cache"), "tensorrt is not installed", "effc[gpu]")
    assert sha256_tree(art) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # no timing cache beside it either


def test_without_a_gpu_one_line(tmp_path, monkeypatch):
    import torch

    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    art = trt_tiny.make(tmp_path / "a")
    before = sha256_tree(art)
    one_line(cli(art), "no CUDA GPU is visible", "NVIDIA GPU")
    assert sha256_tree(art) == before


def test_not_a_trt_artifact(tmp_path):
    art = trt_tiny.make(tmp_path / "onnx", runner="onnxruntime")
    before = sha256_tree(art)
    one_line(cli(art), "compiled for --target onnx, not trt", "--target trt")
    assert sha256_tree(art) == before


def test_signed_artifact_needs_its_key(tmp_path):
    key = tmp_path / "key"
    key.write_bytes(b"k" * 32)
    art = trt_tiny.make(tmp_path / "a", sign_key=key.read_bytes())
    before = sha256_tree(art)
    one_line(cli(art), "is signed: give its key with --sign-key")
    other = tmp_path / "other"
    other.write_bytes(b"o" * 32)
    one_line(cli(art, "--sign-key", other), "not signed with this key")
    assert sha256_tree(art) == before


def test_tampered_artifact_is_refused_before_tensorrt(tmp_path):
    art = trt_tiny.make(tmp_path / "a")
    (art / "trt_build.json").write_text("{}")
    one_line(cli(art), "sha256 of trt_build.json does not match")


def test_not_an_artifact(tmp_path):
    one_line(cli(tmp_path), "not an effc artifact")


MISSING = host_missing()  # None on a TensorRT host


@pytest.mark.gpu
@pytest.mark.skipif(MISSING is not None, reason=f"needs tensorrt and a CUDA GPU: {MISSING}")
def test_engine_written_into_the_artifact_and_hashed(tmp_path):
    import tensorrt as trt
    import torch

    key = tmp_path / "key"
    key.write_bytes(b"k" * 32)
    art = trt_tiny.make(tmp_path / "a", sign_key=key.read_bytes())
    lines = []
    info = build_engine(art, sign_key=key, progress=lines.append)
    assert lines and lines[0].startswith("building the TensorRT engine")
    assert (tmp_path / "timing.cache").is_file()  # the config's default, beside the artifact, not inside it
    manifest = read_manifest(art, sign_key=key)  # every file hashed, re-signed with the key
    entry = manifest["engine"]
    major, minor = torch.cuda.get_device_capability()
    assert entry["tensorrt"] == info["tensorrt"] == trt.__version__
    assert entry["gpu"] == info["gpu"] == torch.cuda.get_device_name()
    assert entry["compute_capability"] == info["compute_capability"] == f"{major}.{minor}"
    assert "engine.plan" in manifest["files"] and info["seconds"] > 0
    engine = trt.Runtime(trt.Logger(trt.Logger.ERROR)).deserialize_cuda_engine((art / "engine.plan").read_bytes())
    assert engine.get_tensor_profile_shape("x", 0) == [(1, 4), (2, 4), (8, 4)]  # trt_build.json's profile
    result = cli(art, "--sign-key", key)  # again, over the first engine: the CLI's line
    assert result.exit_code == 0 and f"wrote {art}/engine.plan: TensorRT {trt.__version__}" in result.output
    read_manifest(art, sign_key=key)
