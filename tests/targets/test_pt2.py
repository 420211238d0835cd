"""The torch target: the post-pass program as an AOTInductor package with effc's C++ NF4 kernel,
opened by effc.runtime like any artifact; checked against the post-pass PyTorch graph (which runs the
reference op) within 1e-4, on the default model and on a random Llama with LoRA."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from unittest import mock

import numpy as np
import pytest

import effc
from effc.errors import EffcError
from effc.runtime import open as open_artifact
from effc.targets.pt2 import TorchTarget
from tests.artifacts import rewrite_manifest_hashes
from tests.test_cli import one_line_error, run

if (_why := TorchTarget().available()) is not None:
    pytest.skip(_why, allow_module_level=True)


@pytest.fixture(scope="module")
def nf4_artifact(default_model, tmp_path_factory):
    model, adapter = default_model
    out = tmp_path_factory.mktemp("pt2") / "nf4"
    report = effc.compile(str(model), out, adapters=[str(adapter)], passes=["merge_lora", "nf4"], target="torch",
                          atol=1e-4, rtol=0)
    return out, report


def test_merge_then_nf4_on_default(nf4_artifact):
    out, report = nf4_artifact
    assert report.verification["max_abs"] < 1e-4
    assert "quantized_rounding" not in report.verification  # equal to the graph, not merely as accurate
    assert report.ops["effc_native::nf4_linear"] == 28 and "aten::linear" in report.ops  # lm_head stays float
    target = json.loads((out / "manifest.json").read_text())["target"]
    assert target["format"] == "aoti" and target["native_library"] == "ops/effc_native.so"
    assert (out / "ops" / "effc_native.so").is_file()


def test_runs_in_a_fresh_process(nf4_artifact, tmp_path):
    """Another process, without effc's compiler: the runtime loads the artifact's own op library.
    Batch and length other than the example's (the dims are dynamic)."""
    out, _ = nf4_artifact
    feeds = {"input_ids": np.arange(21, dtype=np.int64).reshape(3, 7) % 50, "attention_mask": np.ones((3, 7), np.int64)}
    np.savez(tmp_path / "in.npz", **feeds)
    code = ("import sys, numpy as np; from effc.runtime import open; s = open(sys.argv[1]); "
            "f = dict(np.load(sys.argv[2])); np.save(sys.argv[3], s.run(f)['logits']); "
            "print('effc.native' in sys.modules, 'effc.pipeline' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code, str(out), str(tmp_path / "in.npz"), str(tmp_path / "out.npy")],
                          capture_output=True, text=True, check=True)
    assert proc.stdout.split() == ["False", "False"]
    with open_artifact(out) as session:
        here = session.run(feeds)["logits"]
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), here, rtol=0, atol=1e-6)


def test_merge_then_nf4_with_lora_on_llama(hf_dir, tmp_path):
    from tests.passes.test_merge_lora import make_adapter

    adapter = make_adapter("llama", tmp_path / "lora", seed=3)
    report = effc.compile(str(hf_dir("llama")), tmp_path / "q", adapters=[str(adapter)], passes=["merge_lora", "nf4"],
                          target="torch", atol=1e-4, rtol=0)
    assert report.verification["max_abs"] < 1e-4
    assert report.ops["effc_native::nf4_linear"] > 0


def test_falls_back_to_exported_program(default_model, tmp_path):
    """When AOTInductor cannot compile, the ExportedProgram is saved instead, says why, and still runs."""
    model, _ = default_model

    def fail(*args, **kwargs):
        raise RuntimeError("C++ compile error in generated code")

    with mock.patch("torch._inductor.aoti_compile_and_package", fail):
        report = effc.compile(str(model), tmp_path / "ep", passes=["nf4"], target="torch", atol=1e-4, rtol=0)
    assert report.verification["max_abs"] < 1e-5  # the saved program computes the graph
    target = json.loads((tmp_path / "ep" / "manifest.json").read_text())["target"]
    assert target["format"] == "exported_program" and "C++ compile error" in target["aoti_error"]


def _copy_with_target(artifact, out, **changes):
    """A copy of the artifact whose manifest's target entry says something else (hashes re-made)."""
    shutil.copytree(artifact, out)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["target"].update(changes)
    (out / "manifest.json").write_text(json.dumps(manifest))
    rewrite_manifest_hashes(out)
    return out


def test_other_torch_version_is_refused(nf4_artifact, tmp_path):
    out = _copy_with_target(nf4_artifact[0], tmp_path / "copy", torch="1.0.0")
    with pytest.raises(EffcError, match=r"built with torch 1\.0\.0.*install torch==1\.0\.0"):
        open_artifact(out)


def test_artifact_for_another_cpu_is_refused(nf4_artifact, tmp_path):
    """Inductor's kernels use the build machine's vector ISA: a CPU without it is refused in one line."""
    out = _copy_with_target(nf4_artifact[0], tmp_path / "copy", inductor_isa="avx512")
    with mock.patch("torch.backends.cpu.get_cpu_capability", return_value="AVX2"):
        with pytest.raises(EffcError, match="compiled for AVX512 CPUs and this CPU has AVX2; recompile"):
            open_artifact(out)


def test_unsupported_ops_are_refused(default_model, tmp_path):
    model, _ = default_model
    result = run("compile", str(model), "--passes", "int8", "--target", "torch", "-o", str(tmp_path / "x"))
    one_line_error(result, "effc::int8_embedding has no translation for target torch", "targets that have it: onnx, ort",
                   "--target onnx or ort")
    assert not (tmp_path / "x").exists()


def test_debugger_needs_onnx(nf4_artifact):
    with pytest.raises(EffcError, match="debugger reads ONNX"):
        effc.runtime.session.Session(nf4_artifact[0], taps=["x"])


def test_package_calls_the_native_kernel(nf4_artifact):
    """The compiled package calls effc_native::nf4_linear for each NF4 layer (AOTInductor's proxy calls
    are listed in its wrapper.json), rather than a decomposition of the reference op."""
    import zipfile

    with zipfile.ZipFile(nf4_artifact[0] / "model.pt2") as zf:
        calls = "".join(zf.read(n).decode() for n in zf.namelist() if n.endswith(".wrapper.json"))
    assert calls.count('"effc_native::nf4_linear"') == 28


def test_compute_dtype_bfloat16(default_model, tmp_path):
    """nf4.compute_dtype=bfloat16 (QLoRA's bnb_4bit_compute_dtype): casts around each NF4 layer, the
    native kernel multiplies in bfloat16 like the reference op; the ONNX targets refuse it in one line."""
    model, _ = default_model
    report = effc.compile(str(model), tmp_path / "bf16", passes=["nf4"], pass_config=["nf4.compute_dtype=bfloat16"],
                          target="torch", atol=1e-4, rtol=0)
    # bfloat16 roundings flip where float32 inputs differ by 1e-7, so the artifact is not equal to the
    # graph; it passes as equally accurate, and stays within 40 dB SQNR of it.
    assert report.verification["outputs"][0]["sqnr_db"] > 40
    assert report.ops["effc_native::nf4_linear"] == 28 and report.ops["aten::to.dtype"] >= 2 * 28  # in and out of each layer
    fp32 = report.accuracy_vs_eager["outputs"][0]["sqnr_db"]
    assert 5 < fp32 < 40  # bfloat16 activations cost accuracy on top of NF4, but not all of it
    result = run("compile", str(model), "--passes", "nf4", "--pass-config", "nf4.compute_dtype=bfloat16",
                 "--target", "ort", "-o", str(tmp_path / "x"))
    one_line_error(result, "computes in bfloat16", "--target torch")
    assert not (tmp_path / "x").exists()
