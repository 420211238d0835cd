"""The TensorRT runner (effc.runtime.tensorrt_runner): without tensorrt or a GPU a trt artifact runs its
model.onnx in ONNX Runtime and says so; the engine path's decisions (which profile, whether the
artifact's engine fits this machine, where an engine built at open is cached) as pure functions; and, on a
TensorRT host, an engine built, run and compared with ONNX Runtime, and the rebuild of a mismatched one."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from effc.errors import EffcError
from effc.runtime import open as open_artifact
from effc.runtime.manifest import MANIFEST, file_hashes, read_manifest, seal, sha256_tree
from effc.runtime.tensorrt_runner import CACHE_ENV, cache_path, profile_index
from effc.targets import trt_config
from effc.targets.trt_engine import Host, engine_mismatch, host_missing
from tests import trt_tiny

X = np.random.default_rng(1).standard_normal((3, 4)).astype(np.float32)
H200 = Host("10.9.0.34", "NVIDIA H200", "9.0")


@pytest.fixture
def artifact(tmp_path):
    return trt_tiny.make(tmp_path / "tiny-trt")


@pytest.fixture
def no_tensorrt(monkeypatch):
    """This machine as one without tensorrt, whatever is installed (None in sys.modules: ImportError)."""
    monkeypatch.setitem(sys.modules, "tensorrt", None)


def test_without_tensorrt_runs_onnxruntime_and_says_why(artifact, no_tensorrt):
    with open_artifact(artifact) as session:
        assert session.backend.startswith("onnxruntime CPUExecutionProvider (tensorrt is not installed: "
                                          "pip install 'effc[gpu]'")
        y = session.run({"x": X})["y"]
    plain = ort.InferenceSession(str(artifact / "model.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(y, plain.run(["y"], {"x": X})[0])  # the same model.onnx, the same kernels
    np.testing.assert_allclose(y, trt_tiny.reference(X), rtol=1e-6, atol=1e-6)  # fp32, 4-term dot products
    assert (y > 0).any() and (y == 0).any()  # Relu active on both sides: the comparison covers it


def test_without_tensorrt_never_imports_torch(artifact):
    code = ("import sys; sys.modules['tensorrt'] = None; import numpy as np; import effc.runtime as rt; "
            f"s = rt.open({str(artifact)!r}); s.run({{'x': np.ones((2, 4), np.float32)}}); "
            "print('torch' in sys.modules, s.backend)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.startswith("False onnxruntime")


def test_onnxruntime_providers_asked_for_run_onnxruntime(artifact):
    """What compile-time verification asks for: ONNX Runtime CPU, the same numbers on every machine."""
    from effc.runtime.session import Session

    with Session(artifact, providers=["CPUExecutionProvider"]) as session:
        assert session.backend == ("onnxruntime CPUExecutionProvider (ONNX Runtime providers CPUExecutionProvider "
                                   "were asked for)")
        np.testing.assert_allclose(session.run({"x": X})["y"], trt_tiny.reference(X), rtol=1e-6, atol=1e-6)


def test_tensorrt_asked_for_where_it_is_missing_is_one_line(artifact, no_tensorrt):
    from effc.runtime.session import Session

    with pytest.raises(EffcError, match=r"^providers ask for TensorRT, but tensorrt is not installed: pip install "
                                        r"'effc\[gpu\]' on a machine with an NVIDIA GPU and CUDA$"):
        Session(artifact, providers=["TensorRT"])


def test_taps_run_on_onnxruntime(artifact, no_tensorrt):
    """The layer-wise debugger's intermediate values come from ONNX Runtime (an engine fuses them away)."""
    from effc.runtime.session import Session

    tapped = Session(artifact, taps=["pre"])
    values = tapped.run({"x": X})
    np.testing.assert_allclose(values["pre"], X @ trt_tiny.W + trt_tiny.B, rtol=1e-6, atol=1e-6)
    assert tapped.backend.startswith("onnxruntime")


LLAMA_FEEDS = {"input_ids": np.arange(14, dtype=np.int64).reshape(2, 7) % 100,
               "attention_mask": np.ones((2, 7), np.int64)}


@pytest.fixture(scope="module")
def nf4_trt(tmp_path_factory):
    """A compiled trt artifact whose linears are NF4 plugin nodes (~45 s on 2 cores)."""
    import effc

    out = tmp_path_factory.mktemp("trt") / "nf4"
    effc.compile("examples.models:tiny_llama", out, target="trt", passes=["nf4"])
    return out


def test_compiled_plugin_artifact_runs_its_reference_functions_in_onnxruntime(nf4_trt, no_tensorrt):
    import onnx

    from effc.targets.trt_plugins import plugin_of

    model = onnx.load(str(nf4_trt / "model.onnx"))
    called = {n.op_type for n in model.graph.node if plugin_of(n) is not None}
    assert called and called <= {f.name for f in model.functions}  # plugin nodes, each with its function
    feeds = LLAMA_FEEDS
    with open_artifact(nf4_trt) as session:
        assert session.backend.startswith("onnxruntime CPUExecutionProvider (tensorrt is not installed")
        logits = session.run(feeds)["logits"]
    plain = ort.InferenceSession(str(nf4_trt / "model.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(logits, plain.run(["logits"], feeds)[0])


def test_no_gpu_is_named(monkeypatch):
    """tensorrt present but no CUDA device: the reason names the GPU, not the package."""
    import types

    import torch

    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert host_missing().startswith("no CUDA GPU is visible (torch.cuda.is_available() is False)")


TWO = {"profiles": [{"ids": {"min": [1, 1], "opt": [1, 64], "max": [4, 128]}},
                    {"ids": {"min": [1, 129], "opt": [2, 256], "max": [2, 512]}}]}


@pytest.mark.parametrize("shape, index", [((1, 1), 0), ((4, 128), 0), ((2, 129), 1), ((1, 512), 1)])
def test_profile_is_the_one_holding_the_shapes(shape, index):
    assert profile_index(Path("a"), TWO, {"ids": shape}) == index


@pytest.mark.parametrize("shape", [(3, 300), (1, 513), (5, 8)])
def test_shapes_outside_every_profile_are_one_line(shape):
    with pytest.raises(EffcError) as e:
        profile_index(Path("art"), TWO, {"ids": shape})
    msg = str(e.value)
    assert "\n" not in msg
    assert f"ids {shape[0]}x{shape[1]} (profiles: 1x1..4x128 or 1x129..2x512)" in msg
    assert "of art" in msg and "--input-shapes" in msg


def test_inputs_fitting_different_profiles_are_named():
    config = {"profiles": [{"a": {"min": [1], "opt": [1], "max": [2]}, "b": {"min": [1], "opt": [1], "max": [2]}},
                           {"a": {"min": [3], "opt": [3], "max": [4]}, "b": {"min": [3], "opt": [3], "max": [4]}}]}
    with pytest.raises(EffcError, match=r"fit no single profile 0: a 1\.\.2, b 1\.\.2; 1: a 3\.\.4, b 3\.\.4"):
        profile_index(Path("art"), config, {"a": (1,), "b": (4,)})


ENTRY = {"file": "engine.plan", "tensorrt": "10.9.0.34", "gpu": "NVIDIA H200", "compute_capability": "9.0"}


@pytest.mark.parametrize("here, reason", [
    (H200, None),
    (Host("10.9.0.34", "NVIDIA H100 80GB HBM3", "9.0"), "built on NVIDIA H200, this GPU is NVIDIA H100 80GB HBM3"),
    (Host("10.9.0.34", "NVIDIA A100-SXM4-80GB", "8.0"),
     "built for compute capability 9.0 (NVIDIA H200), this GPU is 8.0 (NVIDIA A100-SXM4-80GB)"),
    (Host("10.11.0.33", "NVIDIA H200", "9.0"), "built with TensorRT 10.9.0.34, this machine has 10.11.0.33"),
])
def test_engine_fits_only_its_tensorrt_and_gpu(here, reason):
    got = engine_mismatch(ENTRY, here)
    assert got == (None if reason is None else f"its engine.plan was {reason}")


def test_no_engine_is_a_mismatch_naming_build_engine():
    assert "effc build-engine" in engine_mismatch(None, H200)


def test_engines_built_at_open_are_cached_per_graph_config_and_machine(artifact, monkeypatch, tmp_path):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    manifest = read_manifest(artifact)
    path = cache_path(manifest, H200)
    assert path.parent == tmp_path / "cache"
    assert path.name.endswith("-trt10.9.0.34-sm90-NVIDIA-H200.plan")
    other_profiles = dict(manifest, files=dict(manifest["files"], **{trt_config.FILE: "0" * 64}))
    others = [cache_path(other_profiles, H200), cache_path(manifest, Host("10.9.0.34", "NVIDIA H100", "9.0")),
              cache_path(manifest, Host("10.8.0.43", "NVIDIA H200", "9.0"))]
    assert len({path, *others}) == 4


# --- on a TensorRT host ---------------------------------------------------------------------------------

MISSING = host_missing()  # None on a TensorRT host
tensorrt_host = pytest.mark.skipif(MISSING is not None, reason=f"needs tensorrt and a CUDA GPU: {MISSING}")


# TensorRT runs fp32 matmuls in TF32 by default (10-bit mantissa, ~5e-4 relative per product).
ENGINE_TOL = {"rtol": 2e-3, "atol": 2e-3}


@pytest.mark.gpu
@tensorrt_host
def test_engine_runs_and_matches_onnxruntime(artifact, tmp_path):
    from effc.targets.trt_engine import build_engine

    info = build_engine(artifact, timing_cache=tmp_path / "timing.cache", progress=lambda line: None)
    assert (tmp_path / "timing.cache").stat().st_size > 0
    manifest = read_manifest(artifact)  # engine.plan is hashed with the rest
    assert manifest["engine"]["file"] == info["file"] == "engine.plan" and "engine.plan" in manifest["files"]
    with open_artifact(artifact) as session:
        assert session.backend == f"tensorrt {info['tensorrt']} on {info['gpu']}: engine.plan"
        for batch in (1, 3, 8):  # across the profile's range 1..8
            x = np.random.default_rng(batch).standard_normal((batch, 4)).astype(np.float32)
            np.testing.assert_allclose(session.run({"x": x})["y"], trt_tiny.reference(x), **ENGINE_TOL)
        with pytest.raises(EffcError, match=r"x 9x4 \(profiles: 1x4\.\.8x4\)"):
            session.run({"x": np.zeros((9, 4), np.float32)})


@pytest.mark.gpu
@tensorrt_host
def test_engine_for_another_gpu_is_rebuilt_and_cached_not_written_into_the_artifact(artifact, tmp_path, monkeypatch):
    from effc.targets.trt_engine import build_engine

    build_engine(artifact, timing_cache=tmp_path / "timing.cache", progress=lambda line: None)
    manifest = json.loads((artifact / MANIFEST).read_text())
    manifest["engine"]["gpu"] = "Some Other GPU"
    (artifact / MANIFEST).write_text(json.dumps(seal(manifest)))
    before = sha256_tree(artifact)
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    said = "engine built here, cached at {} (its engine.plan was built on Some Other GPU, this GPU is "
    with open_artifact(artifact) as session:
        np.testing.assert_allclose(session.run({"x": X})["y"], trt_tiny.reference(X), **ENGINE_TOL)
        (cached,) = (tmp_path / "cache").glob("*.plan")
        assert said.format(cached) in session.backend
    built = cached.stat().st_mtime_ns
    with open_artifact(artifact) as session:  # the cached engine, not built again
        assert said.format(cached) in session.backend
    assert cached.stat().st_mtime_ns == built
    assert sha256_tree(artifact) == before


@pytest.mark.gpu
@tensorrt_host
def test_plugin_engine_matches_its_reference_functions(nf4_trt, tmp_path):
    """The NF4 plugin (the Triton kernel's PTX, embedded AOT) in an engine, against ONNX Runtime running the
    plugin's reference function on the same model.onnx."""
    import shutil

    from effc.targets.trt_engine import build_engine

    art = shutil.copytree(nf4_trt, tmp_path / "nf4")
    build_engine(art, timing_cache=tmp_path / "timing.cache", progress=lambda line: None)
    feeds = LLAMA_FEEDS
    with open_artifact(art) as session:
        assert session.backend.startswith("tensorrt ")
        got = session.run(feeds)["logits"]
    want = ort.InferenceSession(str(art / "model.onnx"), providers=["CPUExecutionProvider"]).run(["logits"], feeds)[0]
    # TF32 GEMMs and the kernel's own accumulation order: 1% of the logits' range, and the same top-1.
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-2 * np.abs(want).max())
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.95


@pytest.mark.gpu
@tensorrt_host
def test_engine_for_another_gpu_that_cannot_be_rebuilt_is_refused_naming_both(artifact, tmp_path, monkeypatch):
    from effc.targets.trt_engine import build_engine

    build_engine(artifact, timing_cache=tmp_path / "timing.cache", progress=lambda line: None)
    config = json.loads((artifact / trt_config.FILE).read_text())
    (artifact / trt_config.FILE).write_text(json.dumps(dict(config, tensorrt_min_version="99.0")))  # unbuildable
    manifest = json.loads((artifact / MANIFEST).read_text())
    manifest["engine"]["gpu"] = "Some Other GPU"
    manifest["files"] = file_hashes(artifact)
    (artifact / MANIFEST).write_text(json.dumps(seal(manifest)))
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    with pytest.raises(EffcError) as e:
        open_artifact(artifact)
    msg = str(e.value)
    assert "\n" not in msg and "its engine.plan was built on Some Other GPU, this GPU is " in msg
    assert "no engine could be built here (this artifact needs TensorRT 99.0 or newer" in msg
    assert f"run `effc build-engine {artifact}` on a machine like this one" in msg
