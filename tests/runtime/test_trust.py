"""The artifact cannot point outside itself (README, "Trust"): the manifest covers its own content,
every file it names is a hashed file inside the artifact, outputs are checked against the declared
shapes and dtypes, a signing key refuses unsigned or wrongly signed artifacts, and the torch target's
native library is hashed right before it is loaded."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import effc
from effc.errors import EffcError
from effc.runtime import open as open_artifact
from effc.runtime.manifest import MANIFEST, read_manifest, seal, write_manifest
from effc.runtime.session import Session
from tests.test_cli import one_line_error, run

FEEDS = {"input_ids": np.arange(14, dtype=np.int64).reshape(2, 7), "attention_mask": np.ones((2, 7), np.int64)}


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("keys")
    (root / "key").write_bytes(b"\x01secret key bytes\n")
    (root / "other").write_bytes(b"another key")
    return root / "key", root / "other"


@pytest.fixture(scope="module")
def built(tmp_path_factory, keys) -> tuple[Path, Path]:
    """A tiny GPT-2 for the onnx target, unsigned and (through the CLI) signed."""
    root = tmp_path_factory.mktemp("trust")
    effc.compile("examples.models:tiny_gpt2", root / "plain", target="onnx")
    result = run("compile", "examples.models:tiny_gpt2", "--target", "onnx", "-o", root / "signed",
                 "--sign-key", keys[0])
    assert result.exit_code == 0, result.output
    return root / "plain", root / "signed"


def copy(artifact: Path, tmp_path: Path, name: str = "copy") -> Path:
    return Path(shutil.copytree(artifact, tmp_path / name))


def edit(artifact: Path, reseal: bool, **fields) -> None:
    """Change manifest fields; with reseal, also rewrite manifest_sha256 (what a determined editor does),
    keeping any signature."""
    manifest = json.loads((artifact / MANIFEST).read_text())
    manifest.update(fields)
    if reseal:
        manifest = {**seal(manifest), **({"signature": manifest["signature"]} if "signature" in manifest else {})}
    (artifact / MANIFEST).write_text(json.dumps(manifest))


def test_untouched_artifacts_open_and_run(built, keys):
    plain, signed = built
    manifest = read_manifest(plain)
    assert manifest["format_version"] == 2 and len(manifest["manifest_sha256"]) == 64 and "signature" not in manifest
    assert "hmac_sha256" in read_manifest(signed)["signature"]
    with open_artifact(plain) as s:
        assert s.run(FEEDS)["logits"].shape == (2, 7, 512)
    with open_artifact(signed, sign_key=keys[0]) as s:  # the key file's path
        assert s.run(FEEDS)["logits"].dtype == np.float32
    with open_artifact(signed, sign_key=keys[0].read_bytes()):  # or its bytes
        pass
    with open_artifact(signed):  # without a key there is nothing to check the signature with
        pass


@pytest.mark.parametrize("field, value", [
    ("source", {"spec": "someone-else/model", "kind": "hf_dir", "sha256": "0" * 64, "adapters": []}),
    ("passes", [{"name": "int8", "config": {}}]),
    ("verification", {"passed": True, "max_abs": 0.0, "atol": 1e-4, "rtol": 1e-3}),
])
def test_edited_manifest_field_is_refused(built, tmp_path, field, value):
    art = copy(built[0], tmp_path)
    edit(art, reseal=False, **{field: value})
    with pytest.raises(EffcError, match="tampered with: manifest.json does not match its manifest_sha256"):
        open_artifact(art)
    one_line_error(run("inspect", art), "manifest_sha256")


def test_old_format_is_refused_with_recompile(built, tmp_path):
    art = copy(built[0], tmp_path)
    manifest = json.loads((art / MANIFEST).read_text())
    del manifest["manifest_sha256"]
    (art / MANIFEST).write_text(json.dumps(dict(manifest, format_version=1)))
    with pytest.raises(EffcError, match="artifact format 1, this effc reads 2; recompile it"):
        read_manifest(art)


@pytest.mark.parametrize("model_file", ["../x.onnx", "/ABS/x.onnx", "sub/../../x.onnx", "..\\x.onnx", "C:x.onnx"])
def test_model_file_outside_is_refused(built, tmp_path, model_file):
    """Even with the manifest's hash rewritten to match, and the outside file really there."""
    art = copy(built[0], tmp_path)
    shutil.copyfile(art / "model.onnx", tmp_path / "x.onnx")
    edit(art, reseal=True, model_file=model_file.replace("/ABS", str(tmp_path)))
    with pytest.raises(EffcError, match="points outside itself: model_file .* must be a relative path inside"):
        open_artifact(art)
    np.savez(tmp_path / "in.npz", **FEEDS)
    one_line_error(run("run", art, "--inputs", tmp_path / "in.npz"), "points outside itself")


def test_model_file_must_be_hashed(built, tmp_path):
    """A file the manifest does not hash is refused even where file hashes are not checked."""
    art = copy(built[0], tmp_path)
    shutil.copyfile(art / "model.onnx", art / "other.onnx")
    edit(art, reseal=True, model_file="other.onnx")
    with pytest.raises(EffcError, match="model_file 'other.onnx' is not a file manifest.json hashes"):
        Session(art, verify_hashes=False)


def test_symlink_out_of_the_artifact_is_refused(built, tmp_path):
    art = copy(built[0], tmp_path)
    outside = tmp_path / "elsewhere.onnx"
    (art / "model.onnx").rename(outside)
    (art / "model.onnx").symlink_to(outside)  # same bytes, so the file hash alone would pass
    with pytest.raises(EffcError, match=r"points outside itself: model_file 'model.onnx' is a link to .*elsewhere"):
        open_artifact(art)
    (art / "model.onnx").unlink()
    shutil.move(outside, art / "model.onnx")
    (art / "report.json").rename(tmp_path / "report.json")
    (art / "report.json").symlink_to(tmp_path / "report.json")
    with pytest.raises(EffcError, match=r"points outside itself: report.json is a link"):
        open_artifact(art)


@pytest.mark.parametrize("rel", ["../lora.safetensors", "adapters/../../lora.safetensors", "/tmp/lora.safetensors",
                                 "adapters/unlisted.safetensors"])
def test_adapter_file_outside_is_refused(built, tmp_path, rel):
    art = copy(built[0], tmp_path)
    edit(art, reseal=True, adapters={"default": "lora", "files": {"lora": rel}, "inputs": []})
    with pytest.raises(EffcError, match="adapter lora '.*' (must be a relative path inside|is not a file manifest.json hashes)"):
        open_artifact(art)


def test_onnx_external_data_outside_is_refused(tmp_path):
    """ONNX Runtime itself refuses external data outside the model's directory; effc surfaces one line."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    art = tmp_path / "ext"
    art.mkdir()
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
                              [numpy_helper.from_array(np.full((4, 4), 3, np.float32), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save_model(model, str(art / "model.onnx"), save_as_external_data=True, location="w.bin", size_threshold=0)
    (art / "w.bin").rename(tmp_path / "w.bin")
    proto = onnx.load(str(art / "model.onnx"), load_external_data=False)
    next(e for e in proto.graph.initializer[0].external_data if e.key == "location").value = "../w.bin"
    onnx.save(proto, str(art / "model.onnx"))
    io = {"inputs": [{"name": "x", "dtype": "float32", "shape": [1, 4]}],
          "outputs": [{"name": "y", "dtype": "float32", "shape": [1, 4]}]}
    write_manifest(art, {"target": {"name": "onnx"}, "runner": "onnxruntime", "model_file": "model.onnx", **io})
    with pytest.raises(EffcError, match="onnxruntime could not load .*[Ee]xternal data"):
        open_artifact(art)


@pytest.mark.parametrize("change, message", [
    (lambda y: y.astype(np.float64), r"output logits came back as float64\[2, 7, 512\], but the artifact declares "
                                     r"float32\[batch, sequence, 512\] for batch=2, sequence=7"),
    (lambda y: y[0], r"came back as float32\[7, 512\]"),
    (lambda y: y[..., :511], r"came back as float32\[2, 7, 511\]"),
    (lambda y: y[:1], r"came back as float32\[1, 7, 512\]"),
    (lambda y: y[:, :3], r"came back as float32\[2, 3, 512\]"),
])
def test_wrong_output_is_refused(built, change, message):
    with open_artifact(built[0]) as session:
        underlying = session._session

        class Wrong:
            def run(self, names, feeds):
                return [change(v) for v in underlying.run(names, feeds)]

        session._session = Wrong()
        with pytest.raises(EffcError, match=message):
            session.run(FEEDS)


def test_signing(built, keys, tmp_path):
    plain, signed = built
    key, other = keys
    with pytest.raises(EffcError, match="is not signed with this key"):
        open_artifact(signed, sign_key=other)
    with pytest.raises(EffcError, match="is not signed, and a signing key was given"):
        open_artifact(plain, sign_key=key)
    # Rewriting a field and its manifest_sha256 fools the hash, not the signature.
    art = copy(signed, tmp_path)
    edit(art, reseal=True, passes=[{"name": "cleanup", "config": {}}])
    open_artifact(art).close()
    with pytest.raises(EffcError, match="is not signed with this key"):
        open_artifact(art, sign_key=key)
    (tmp_path / "empty").write_bytes(b"")
    with pytest.raises(EffcError, match="signing key .*empty"):
        open_artifact(signed, sign_key=tmp_path / "empty")


def test_signing_on_the_command_line(built, keys, tmp_path):
    plain, signed = built
    key, other = keys
    np.savez(tmp_path / "in.npz", **FEEDS)
    assert run("run", signed, "--inputs", tmp_path / "in.npz", "--sign-key", key).exit_code == 0
    one_line_error(run("run", signed, "--inputs", tmp_path / "in.npz", "--sign-key", other), "not signed with this key")
    one_line_error(run("run", plain, "--inputs", tmp_path / "in.npz", "--sign-key", key), "is not signed")
    one_line_error(run("inspect", signed, "--sign-key", tmp_path / "missing"), "cannot read the signing key")
    from click.testing import CliRunner

    from effc.cli import main

    result = CliRunner().invoke(main, ["inspect", str(plain)], env={"EFFC_SIGN_KEY": str(key)})
    one_line_error(result, "is not signed")
    result = CliRunner().invoke(main, ["inspect", str(signed)], env={"EFFC_SIGN_KEY": str(key)})
    assert result.exit_code == 0 and "signed:    HMAC-SHA256, verified with the given key" in result.output, result.output
    assert "signed:    no" in run("inspect", plain).output
    # A key that cannot be read stops a compile before the model is loaded, and writes nothing.
    one_line_error(run("compile", "examples.models:tiny_gpt2", "-o", tmp_path / "out", "--sign-key", tmp_path / "no"),
                   "cannot read the signing key")
    assert not (tmp_path / "out").exists()


def _planted_torch_artifact(built, tmp_path) -> Path:
    """A torch-target manifest around stand-in files (building a real one takes a C++ compiler and a minute)."""
    import torch

    art = tmp_path / "pt2"
    (art / "ops").mkdir(parents=True)
    (art / "model.pt2").write_bytes(b"not a package")
    (art / "ops" / "effc_native.so").write_bytes(b"\x7fELF the library that was built")
    manifest = read_manifest(built[0])
    target = {"name": "torch", "torch": torch.__version__, "format": "aoti", "native_library": "ops/effc_native.so"}
    write_manifest(art, {"target": target, "runner": "torch", "model_file": "model.pt2", "inputs": manifest["inputs"],
                         "outputs": manifest["outputs"]})
    return art


@pytest.fixture
def no_native(monkeypatch):
    """The library is never loaded in this process (another test may have loaded the real one)."""
    torch = pytest.importorskip("torch")
    calls = []

    def load_library(path):
        calls.append(path)
        raise RuntimeError("stop here")

    monkeypatch.setattr("effc.runtime.torch_program.registered", lambda op: False)
    monkeypatch.setattr(torch.ops, "load_library", load_library)
    return calls


@pytest.mark.parametrize("verify_hashes", [True, False])
def test_native_library_is_hashed_before_it_is_loaded(built, tmp_path, no_native, verify_hashes):
    art = _planted_torch_artifact(built, tmp_path)
    (art / "ops" / "effc_native.so").write_bytes(b"\x7fELF a library swapped in afterwards")
    with pytest.raises(EffcError, match="sha256 of ops/effc_native.so does not match manifest.json"):
        Session(art, verify_hashes=verify_hashes)
    assert no_native == []


def test_native_library_is_loaded_when_its_hash_matches(built, tmp_path, no_native):
    art = _planted_torch_artifact(built, tmp_path)
    with pytest.raises(RuntimeError, match="stop here"):
        Session(art)
    assert no_native == [str(art / "ops" / "effc_native.so")]


def test_native_library_outside_is_refused(built, tmp_path, no_native):
    art = _planted_torch_artifact(built, tmp_path)
    manifest = json.loads((art / MANIFEST).read_text())
    shutil.copyfile(art / "ops" / "effc_native.so", tmp_path / "evil.so")
    manifest["target"]["native_library"] = str(tmp_path / "evil.so")
    (art / MANIFEST).write_text(json.dumps(seal(manifest)))
    with pytest.raises(EffcError, match="target.native_library .* must be a relative path inside"):
        Session(art, verify_hashes=False)
    assert no_native == []
