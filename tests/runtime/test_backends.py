"""The runner registry (effc.runtime.backends): the manifest names the runner, the runner's library
is imported only then, and a missing library is one line with the install hint, nothing written."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

import effc
from effc.errors import EffcError
from effc.runtime import open as open_artifact
from effc.runtime.backends import BACKENDS
from effc.runtime.manifest import MANIFEST, seal
from effc.runtime.session import Session

FEEDS = {"input_ids": np.arange(14, dtype=np.int64).reshape(2, 7), "attention_mask": np.ones((2, 7), np.int64)}

# effc.cli.main with `library` unimportable, as on a machine where it is not installed.
WITHOUT = "import sys; sys.modules[{library!r}] = None; sys.argv = ['effc', *{argv!r}]; from effc.cli import main; main()"


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    root = tmp_path_factory.mktemp("backends")
    effc.compile("examples.models:tiny_gpt2", root / "onnx", target="onnx")
    effc.compile("examples.models:tiny_gpt2", root / "ort", target="ort")
    np.savez(root / "in.npz", **FEEDS)
    return root


def manifest(artifact):
    return json.loads((artifact / MANIFEST).read_text())


def test_manifest_names_its_runner(artifacts):
    for target in ("onnx", "ort"):
        assert manifest(artifacts / target)["runner"] == "onnxruntime"
        with open_artifact(artifacts / target) as session:
            assert session.run(FEEDS)["logits"].shape[:2] == (2, 7)


def test_optimized_at_build_time_is_read_from_the_target_info(artifacts):
    """The ort target records its optimization level: the runner does not optimize its graph again."""
    assert "optimization_level" in manifest(artifacts / "ort")["target"]
    assert "optimization_level" not in manifest(artifacts / "onnx")["target"]


@pytest.mark.parametrize("runner, message", [
    (None, "names no runner in its manifest .*recompile"),
    ("coreml", "runs on 'coreml', which this effc has no runner for .*onnxruntime, torch, tensorrt"),
])
def test_unknown_or_missing_runner_is_refused(artifacts, tmp_path, runner, message):
    import shutil

    art = shutil.copytree(artifacts / "onnx", tmp_path / "copy")
    m = manifest(art)
    m.pop("runner")
    if runner:
        m["runner"] = runner
    (art / MANIFEST).write_text(json.dumps(seal(m)))
    with pytest.raises(EffcError, match=message):
        open_artifact(art)


def test_missing_library_is_one_line_and_nothing_is_written(artifacts):
    out = artifacts / "out.npz"
    argv = ["run", str(artifacts / "onnx"), "--inputs", str(artifacts / "in.npz"), "--save-outputs", str(out)]
    proc = subprocess.run([sys.executable, "-c", WITHOUT.format(library="onnxruntime", argv=argv)],
                          capture_output=True, text=True)
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert len(lines) == 1 and "runs on onnxruntime, which is not installed here: pip install onnxruntime" in lines[0]
    assert not out.exists()


def as_torch(artifacts, tmp_path):
    """A copy of the onnx artifact whose manifest says it runs on torch (built with torch 9.9.9)."""
    import shutil

    art = shutil.copytree(artifacts / "onnx", tmp_path / "copy")
    m = manifest(art)
    m.update(runner="torch", target={"name": "torch", "torch": "9.9.9", "format": "aoti"})
    (art / MANIFEST).write_text(json.dumps(seal(m)))
    return art


def test_torch_install_hint_names_the_build_version(artifacts, tmp_path):
    art = as_torch(artifacts, tmp_path)
    code = ("import sys; sys.modules['torch'] = None\n"
            "from effc.runtime import open\n"
            f"try: open({str(art)!r})\n"
            "except Exception as e: print(type(e).__name__, e)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == f"EffcError {art} runs on torch, which is not installed here: pip install torch==9.9.9"


def test_taps_are_a_runner_capability(artifacts, tmp_path):
    """The debugger's taps: the onnxruntime runner returns them, the torch runner says it cannot."""
    with Session(artifacts / "onnx", taps=["input_ids"]) as session:
        assert set(session.run(FEEDS)) == {o.name for o in session.outputs} | {"input_ids"}
    with pytest.raises(EffcError, match="runs on torch, which cannot expose intermediate values; the layer-wise "
                                        "debugger reads ONNX artifacts"):
        Session(as_torch(artifacts, tmp_path), taps=["x"])
    assert set(BACKENDS) == {"onnxruntime", "torch", "tensorrt"}


def test_running_an_onnx_artifact_never_imports_torch(artifacts):
    code = (f"import sys, numpy as np; from effc.runtime import open\n"
            f"with open({str(artifacts / 'onnx')!r}) as s: s.run(dict(np.load({str(artifacts / 'in.npz')!r})))\n"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
